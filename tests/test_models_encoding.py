"""Tile encoding per format/compression, and parsing of model responses."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.detections import Detections
from pipeline.models.base import ModelError
from pipeline.models.encoding import VALID_COMPRESSIONS, check_format, decode_tile, encode_tile
from pipeline.models.results import (
    MalformedResponse,
    parse_feature_collection,
    parse_tfserving,
    to_feature_collection,
)

TILE = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (48, 1, 3))

MAGIC = {"NITF": b"NITF02.1", "GTIFF": b"II*\x00", "PNG": b"\x89PNG", "JPEG": b"\xff\xd8\xff"}


@pytest.mark.parametrize("fmt,comp", [(f, c) for f, cs in VALID_COMPRESSIONS.items() for c in cs])
def test_every_valid_combination_round_trips(fmt: str, comp: str) -> None:
    data = encode_tile(TILE, fmt, comp)
    assert data.startswith(MAGIC[fmt])
    back = decode_tile(data)
    assert back.shape == TILE.shape
    lossy = comp in ("JPEG", "J2K") or fmt == "JPEG"
    assert np.abs(back.astype(int) - TILE).max() <= (12 if lossy else 0)


def test_nitf_compression_is_written_in_the_image_header() -> None:
    from rasterio.io import MemoryFile

    for comp, code in (("NONE", "NC"), ("JPEG", "C3"), ("J2K", "C8")):
        with MemoryFile(encode_tile(TILE, "NITF", comp)) as memory, memory.open() as dataset:
            assert dataset.tags()["NITF_IC"] == code


@pytest.mark.parametrize("shape", [(48, 64, 3), (17, 5, 1), (40, 30, 4), (33, 20)])
def test_uncompressed_nitf_bytes_are_gdals(shape: tuple[int, ...]) -> None:
    from pipeline.models.encoding import _encode, _known_nitf, _nitf_header, tile_env

    tile = np.random.default_rng(len(shape)).integers(0, 256, shape, dtype=np.uint8)
    with tile_env():
        gdal = _encode(tile if tile.ndim == 3 else tile[..., None], "NITF", "NONE")
    assert _nitf_header(*(shape if len(shape) == 3 else (*shape, 1))) is not None  # the fast path
    assert encode_tile(tile, "NITF", "NONE") == gdal
    assert encode_tile(tile) == gdal  # NITF is the default, as in OSML
    for _ in range(2):  # first through GDAL, then from the header that GDAL's read confirmed
        np.testing.assert_array_equal(decode_tile(gdal).reshape(shape), tile)
    assert any(gdal.startswith(header) for header, _ in _known_nitf[len(gdal)])
    other = tile.copy()
    other.reshape(-1)[-1] ^= 0xFF  # same header, other pixels: still exact
    np.testing.assert_array_equal(decode_tile(encode_tile(other)).reshape(shape), other)


def test_encoding_builds_no_aws_session_with_keys_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """rasterio would build a boto3 session per in-memory dataset (15-40 ms a tile)."""
    import rasterio.session

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    built: list[object] = []
    original = rasterio.session.AWSSession.__init__

    def counting(self: object, *args: object, **kwargs: object) -> None:
        built.append(self)
        original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(rasterio.session.AWSSession, "__init__", counting)
    for fmt, comp in (("GTIFF", "NONE"), ("NITF", "JPEG"), ("PNG", "NONE")):
        decode_tile(encode_tile(TILE, fmt, comp))
    assert built == []


@pytest.mark.parametrize("fmt,comp", [("PNG", "LZW"), ("JPEG", "J2K"), ("NITF", "LZW"), ("GTIFF", "J2K")])
def test_invalid_combinations_name_both_fields(fmt: str, comp: str) -> None:
    expected = f"imageProcessorTileFormat {fmt} cannot use imageProcessorTileCompression {comp}"
    with pytest.raises(ModelError, match=expected):
        check_format(fmt, comp)


INVALID = [("PNG", "JPEG"), ("PNG", "LZW"), ("JPEG", "LZW"), ("JPEG", "J2K"), ("NITF", "LZW"),
           ("GTIFF", "J2K")]


@pytest.mark.parametrize("fmt,comp", INVALID)
def test_requests_with_an_invalid_combination_are_rejected_naming_both_fields(fmt: str, comp: str) -> None:
    from pipeline.request import ImageRequest, RequestError

    data = {"jobId": "j", "imageUrls": ["x.tif"], "imageProcessor": {"name": "e"},
            "imageProcessorTileFormat": fmt.lower(), "imageProcessorTileCompression": comp}
    for parse in (ImageRequest.parse, ImageRequest.from_message):  # strict and queue traffic
        with pytest.raises(RequestError, match=f"imageProcessorTileFormat {fmt} cannot use "
                                               f"imageProcessorTileCompression {comp}") as info:
            parse(data)  # type: ignore[operator]
        assert "\n" not in str(info.value)


def test_valid_combinations_pass_and_nitf_is_the_default() -> None:
    from graphs.image_job import model_spec
    from pipeline.models.base import ModelSpec
    from pipeline.request import ImageRequest

    base = {"jobId": "j", "imageUrls": ["x.tif"], "imageProcessor": {"name": "e"}}
    request = ImageRequest.parse(base)
    assert (request.tile_format, request.tile_compression) == ("NITF", "NONE")  # as OSML
    assert model_spec(request).tile_format == "NITF" and ModelSpec("X", "e").tile_format == "NITF"
    for fmt, comps in VALID_COMPRESSIONS.items():
        for comp in comps:
            parsed = ImageRequest.parse({**base, "imageProcessorTileFormat": fmt,
                                         "imageProcessorTileCompression": comp})
            assert (parsed.tile_format, parsed.tile_compression) == (fmt, comp)


def test_bands_a_format_cannot_hold_are_dropped() -> None:
    four = np.zeros((16, 16, 4), np.uint8)
    assert decode_tile(encode_tile(four, "JPEG", "NONE")).shape == (16, 16, 3)
    assert decode_tile(encode_tile(four[..., :2], "JPEG", "NONE")).shape == (16, 16, 1)
    assert decode_tile(encode_tile(four, "PNG", "NONE")).shape == (16, 16, 4)


def test_feature_collection_round_trip_and_deprecated_keys() -> None:
    found = Detections([[1, 2, 11, 12], [5, 5, 6, 7]], [0.9, 0.4], ["car", "ship"])
    parsed = parse_feature_collection(json.dumps(to_feature_collection(found)), 64, 64)
    np.testing.assert_array_equal(parsed.boxes, found.boxes)
    assert parsed.classes.tolist() == ["car", "ship"] and parsed.scores.tolist() == [0.9, 0.4]
    old = {"type": "FeatureCollection", "features": [
        {"type": "Feature",
         "properties": {"bounds_imcoords": [3, 4, 8, 9], "feature_types": {"a": 0.2, "b": 0.7}}},
        {"type": "Feature", "properties": {"imageGeometry": {"type": "Point", "coordinates": [10, 20]}}},
    ]}
    parsed = parse_feature_collection(json.dumps(old).encode(), 64, 64)
    assert parsed.boxes.tolist() == [[3, 4, 8, 9], [9.5, 19.5, 10.5, 20.5]]
    assert parsed.classes.tolist() == ["b", "object"] and parsed.scores.tolist() == [0.7, 1.0]


@pytest.mark.parametrize("body,message", [
    (b"<html>oops</html>", "not JSON"),
    (b'{"predictions": []}', "FeatureCollection"),
    (b'{"features": [{"properties": {"foo": 1}}]}', "neither imageGeometry"),
    (b'{"features": [{"properties": {"imageBBox": [NaN, 1, 2, 3]}}]}', "NaN"),
    (b'{"features": [{"properties": {"imageBBox": [1, 1, 200, 3]}}]}', "outside the 64x64 tile"),
    (b'{"features": [{"properties": {"imageBBox": [1, 1, 2]}}]}', "4 numbers"),
    (b'{"features": [{"properties": {"imageBBox": [1, 1, 2, 3], "featureClasses": [{"x": 1}]}}]}',
     "featureClasses"),
])
def test_malformed_responses_raise_one_line(body: bytes, message: str) -> None:
    with pytest.raises(MalformedResponse, match=message) as info:
        parse_feature_collection(body, 64, 64)
    assert "\n" not in str(info.value)


def test_tfserving_boxes_are_denormalised_and_thresholded_per_class() -> None:
    body = {"predictions": [
        {"detection_boxes": [[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.75, 1.0]],
         "detection_scores": [0.6, 0.6], "detection_classes": [1, 2]},
        {"detection_boxes": [], "detection_scores": [], "detection_classes": []},
    ]}
    thresholds = {"default": 0.5, "truck": 0.7}
    out = parse_tfserving(json.dumps(body), 100, 200, 2, thresholds, {1: "car", 2: "truck"})
    assert out[0].boxes.tolist() == [[20.0, 20.0, 40.0, 60.0]]
    assert out[0].classes.tolist() == ["car"] and len(out[1]) == 0
    with pytest.raises(MalformedResponse, match="predictions"):
        parse_tfserving(json.dumps(body), 100, 200, 3)
