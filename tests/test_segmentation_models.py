"""Segmentation models: the contract, encoded answers, the built-in segmenters on real imagery,
the HTTP target behind serve-model, and jobs over an RPC NITF, a SpaceNet GeoTIFF and S3."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import pytest
import rasterio
import rasterio.shutil
import shapely
from affine import Affine
from pyproj import Transformer
from rasterio.transform import RPCTransformer
from rio_cogeo.cogeo import cog_validate

import pipeline
from graphs.segment_job import run_segmentation
from pipeline.models import ModelError, ModelSpec
from pipeline.models.server import start_server
from pipeline.request import ImageRequest
from pipeline.segmentation.contract import (
    NPY_TYPE,
    PNG_TYPE,
    TIFF_TYPE,
    as_scores,
    decode_array,
    encode_array,
)
from pipeline.segmentation.models import load_segmenter, threshold_answer
from tests.conftest import shared_file

matplotlib.use("Agg")


def job(url: str, out: str | Path | None = None, name: str = "threshold", job_id: str = "seg",
        parameters: dict[str, Any] | None = None, outputs: list[dict[str, Any]] | None = None,
        **segmentation: Any) -> ImageRequest:
    if outputs is None:
        outputs = [{"type": "LOCAL", "path": str(out)}]
    return ImageRequest.parse({
        "jobId": job_id, "imageUrls": [url], "imageProcessor": {"name": name, "type": "BUILTIN"},
        "imageProcessorParameters": parameters or {}, "imageProcessorTileSize": 256,
        "imageProcessorTileOverlap": 32, "segmentation": segmentation, "outputs": outputs,
    })


# ---------------------------------------------------------------- the contract
def test_answers_become_scores_and_bad_answers_fail_in_one_line() -> None:
    ids = np.array([[0, 1], [2, 1]], dtype=np.uint16)
    scores = as_scores(ids, 3, 2, 2)
    assert scores.dtype == np.float32 and scores.shape == (3, 2, 2)
    np.testing.assert_array_equal(scores.argmax(axis=0), ids)
    np.testing.assert_allclose(as_scores(np.full((2, 2, 2), 51, np.uint8), 2, 2, 2), 0.2)
    for bad, message in [(np.zeros((3, 3), np.uint8), "shape"), (np.full((2, 2), 5, np.uint8), "class id 5"),
                         (np.zeros((2, 2), np.float32), "integers"), (np.zeros((4, 2, 2)), "scores of shape"),
                         (np.zeros((2, 2, 2), np.int32), "float or uint8"), (np.zeros(4, np.uint8), "1-D")]:
        with pytest.raises(ModelError, match=message) as caught:
            as_scores(bad, 3 if bad.ndim == 2 else 2, 2, 2)
        assert "\n" not in str(caught.value)


def test_score_bands_of_class_ids_are_their_one_hot() -> None:
    from pipeline.segmentation.contract import one_hot
    from pipeline.segmentation.polygons import chunk_regions
    from pipeline.segmentation.raster import band_data

    classes = np.random.default_rng(1).integers(0, 3, size=(40, 50), dtype=np.uint8)
    np.testing.assert_array_equal(band_data(classes, None, True, 3),
                                  band_data(classes, one_hot(classes, 3), True, 3))
    assert band_data(classes, None, False, 3).shape == (1, 40, 50)
    lazy = chunk_regions(classes, None, (0, 0, 50, 40), (50, 40), [1, 2])
    full = chunk_regions(classes, one_hot(classes, 3), (0, 0, 50, 40), (50, 40), [1, 2])
    np.testing.assert_array_equal(lazy.sums, full.sums)
    np.testing.assert_array_equal(lazy.sums, lazy.counts)


@pytest.mark.parametrize("pack_below", [0.5, 2.0])
def test_packed_regions_are_the_regions_traced_in_the_chunk(monkeypatch: pytest.MonkeyPatch,
                                                            pack_below: float) -> None:
    """Regions traced in a canvas of their boxes (sparse classes; 2.0 forces it for dense ones
    too) are the polygons ``rasterio.features.shapes`` traces over the whole chunk: rings
    with islands in holes, regions touching only at corners, speckle, a chunk off the origin."""
    from rasterio import features
    from scipy import ndimage

    from pipeline.segmentation import polygons

    monkeypatch.setattr(polygons, "PACK_BELOW", pack_below)
    rng = np.random.default_rng(7)
    classes = (ndimage.uniform_filter(rng.random((300, 420)), 5) > 0.53).astype(np.uint8)
    classes[40:140, 40:140] = 1
    classes[60:120, 60:120] = 0
    classes[80:100, 80:100] = 1  # an island in the ring's hole: its own region
    classes[200:203, 300:303] = 2
    classes[203:206, 303:306] = 2  # touches the one above at a corner only: two regions
    origin = (1000, 3000)
    regions = polygons.chunk_regions(classes, None, (*origin, origin[0] + 420, origin[1] + 300),
                                     (5000, 5000), [0, 1, 2])
    for k in (0, 1, 2):
        mask = classes == k
        labels, count = ndimage.label(mask, structure=polygons.FOUR_CONNECTED)
        want = [shapely.geometry.shape(g) for g, _ in
                features.shapes(labels, mask=mask, connectivity=4, transform=Affine.translation(*origin))]
        got = regions.polygons[regions.class_index == k]
        assert len(got) == count == len(want)
        assert sorted(shapely.to_wkt(shapely.normalize(got)).tolist()) == \
            sorted(shapely.to_wkt(shapely.normalize(np.array(want, dtype=object))).tolist())
        np.testing.assert_array_equal(np.sort(regions.counts[regions.class_index == k]),
                                      np.sort(np.bincount(labels[mask])[1:]))
    assert (regions.class_index == 2).sum() == 2


class SlabAnswers:
    """A per-pixel model (bright = band 1 >= 100) that answers class ids for even rows of
    origin and scores (uint8 0/255) for odd ones, and fails on a tile reaching row ``fail_at``."""

    class_names = ("background", "bright")
    per_pixel = True

    def __init__(self, fail_at: int = -1):
        self.fail_at = int(fail_at)

    def __call__(self, tiles: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
        answers = []
        for tile, (_, top) in zip(tiles, offsets, strict=True):
            if top <= self.fail_at < top + tile.shape[0]:
                raise ValueError("bad slab")
            bright = (tile[..., 0] >= 100).astype(np.uint8)
            answers.append(bright if top // 512 % 2 == 0 else np.stack([1 - bright, bright]) * 255)
        return answers


def test_per_pixel_chunks_are_read_and_segmented_slab_by_slab() -> None:
    from pipeline.segmentation import stitch
    from pipeline.tiling import TileGrid

    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (3, 1300, 700), dtype=np.uint8)
    bounds = (100, 150, 700, 1300)  # 1150 rows: slabs of 512, 512 and 126
    grid = TileGrid(700, 1300, 256, 32, 4 * 224)
    spec = ModelSpec("PYTHON", "tests.test_segmentation_models:SlabAnswers")
    reads: list[tuple[int, int]] = []

    def read_rows(top: int, bottom: int) -> np.ndarray:
        reads.append((top, bottom))
        return pixels[:, top:bottom, bounds[0]:bounds[2]]

    result = stitch.segment_per_pixel(read_rows, bounds, grid, spec)
    truth = (pixels[0, 150:1300, 100:700] >= 100).astype(np.uint8)
    assert reads == [(150, 662), (662, 1174), (1174, 1300)] and not result.failed_tiles
    np.testing.assert_array_equal(result.classes, truth)
    assert result.scores is not None  # the middle slab answered scores: every row has them
    np.testing.assert_array_equal(result.scores[1], truth.astype(np.float32))
    np.testing.assert_array_equal(result.scores[0], 1 - truth.astype(np.float32))
    assert result.tiles == len(stitch.covering_tiles(grid, bounds, "BLEND"))

    failing = ModelSpec("PYTHON", "tests.test_segmentation_models:SlabAnswers", {"fail_at": 700})
    failed = stitch.segment_per_pixel(read_rows, bounds, grid, failing)
    assert len(failed.failed_tiles) == failed.tiles and "bad slab" in failed.failed_tiles[0]["reason"]
    assert not failed.classes.any() and failed.scores is None


def test_threshold_is_the_exact_mean_of_bands_1_to_3_for_every_layout() -> None:
    """The band-last fast path (contiguous byte runs), strided views and other dtypes agree
    with an integer sum in Python's own arithmetic."""
    rng = np.random.default_rng(1)
    for shape in [(37, 53, 3), (40, 40, 4), (17, 1, 3), (5, 9, 1), (3, 3, 2)]:
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        planar = np.moveaxis(np.ascontiguousarray(np.moveaxis(pixels, -1, 0)), 0, -1)
        for threshold in (0, 100, 128.5, 255):
            value = pixels[..., 0].astype(int) if shape[2] < 3 else pixels[..., :3].astype(int).sum(-1) / 3
            want = (value >= threshold).astype(np.uint8)
            for tile, expected in ((pixels, want), (pixels[2:, 1:], want[2:, 1:]), (planar, want),
                                   (pixels.astype(np.uint16), want)):
                np.testing.assert_array_equal(threshold_answer(tile, threshold), expected)


@pytest.mark.parametrize(("edges", "bigtiff"), [((1024, 2048), False), ((1024, 2048), True),
                                                ((700, 1900), False)])
def test_cog_laid_out_from_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 edges: tuple[int, int], bigtiff: bool) -> None:
    """Parts on the block grid (their tiles copied) or off it (mosaicked and encoded by the COG
    task), classic TIFF or BigTIFF: a COG by GDAL's own layout check and rio-cogeo's, with
    the pixels, nearest-sample overviews, score bands, georeferencing and metadata."""
    from pipeline.reading import ImageInfo
    from pipeline.segmentation import raster

    if bigtiff:
        monkeypatch.setattr(raster, "BIGTIFF_PAYLOAD", 0)
    width, height = 3000, 2100
    classes = (np.random.default_rng(0).random((height, width)) > 0.7).astype(np.uint8)
    info = ImageInfo("x", width, height, 3, "uint8", 512, 512, None, None, "EPSG:32617",
                     (0.5, 0.0, 400000.0, 0.0, -0.5, 3700000.0), "GTiff")
    parts = []
    xs, ys = (0, *edges, width), (0, edges[0], height)
    for i in range(3):
        for j in range(2):
            bounds = (xs[i], ys[j], xs[i + 1], ys[j + 1])
            bands = raster.band_data(classes[ys[j]:ys[j + 1], xs[i]:xs[i + 1]], None, True, 2)
            size, pieces = raster.part_pieces(bands, bounds, (width, height))
            raster.write_tiff(tmp_path / f"part{i}{j}.tif", size, pieces)
            parts.append((bounds, str(tmp_path / f"part{i}{j}.tif")))
    cog = raster.write_cog(parts, info, 3, "uint8", ("background", "bright"), tmp_path / "out" / "c.tif")
    assert cog_validate(cog)[0], cog_validate(cog)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["c.tif"]
    with open(cog, "rb") as raw:
        assert raw.read(4) == (b"II+\0" if bigtiff else b"II*\0")
    with rasterio.open(cog) as src:
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert src.compression.name == "zstd" and src.block_shapes[0] == (512, 512)
        assert src.crs.to_epsg() == 32617 and src.transform == Affine(*info.transform)
        assert src.descriptions == ("class", "score:background", "score:bright")
        assert json.loads(src.tags(1)["CLASS_NAMES"]) == ["background", "bright"]
        np.testing.assert_array_equal(src.read(1), classes)
        np.testing.assert_array_equal(src.read(3), classes * 255)
        assert src.overviews(1) == [2, 4, 8]
        for f in src.overviews(1):
            rows = np.minimum(np.arange(-(-height // f)) * f + f // 2, height - 1)
            cols = np.minimum(np.arange(-(-width // f)) * f + f // 2, width - 1)
            overview = src.read(out_shape=(3, len(rows), len(cols)))
            np.testing.assert_array_equal(overview[0], classes[rows][:, cols])
            np.testing.assert_array_equal(overview[2], classes[rows][:, cols] * 255)


@pytest.mark.parametrize("content_type", [NPY_TYPE, PNG_TYPE, TIFF_TYPE])
def test_encoded_answers_round_trip(content_type: str) -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 3, size=(37, 53), dtype=np.uint8)
    scores = rng.integers(0, 256, size=(3, 37, 53), dtype=np.uint8)
    for answer in (ids, scores):
        decoded = decode_array(encode_array(answer, content_type), content_type)
        np.testing.assert_array_equal(decoded, answer)
    floats = rng.random((2, 8, 8), dtype=np.float32)
    if content_type != PNG_TYPE:
        np.testing.assert_array_equal(decode_array(encode_array(floats, content_type), content_type), floats)
    with pytest.raises(ModelError, match="content type 'text/plain'"):
        decode_array(b"x", "text/plain")
    with pytest.raises(ModelError, match="malformed segmentation answer"):
        decode_array(b"not an array", content_type)


# ---------------------------------------------------------------- built-ins on real imagery
def test_vegetation_on_neon_trees() -> None:
    """Excess green finds the NEON tree crowns: most pixels of the 61 crown boxes, few outside."""
    url = str(shared_file("geotiff/neon_OSBS_029.tif"))
    trees = pd.read_csv(shared_file("truth/neon_OSBS_029_trees.csv"))
    classes = pipeline.segment(url, "vegetation", tile_size=128, overlap=32)
    assert classes.attrs["class_names"] == ["background", "vegetation"]
    assert classes.shape == (400, 400)
    with rasterio.open(url) as src:  # coordinates: pixel centres in the image's CRS
        assert classes.x.values[0] == pytest.approx(src.transform.c + 0.05)
        assert classes.y.values[0] == pytest.approx(src.transform.f - 0.05)
    crowns = np.zeros((400, 400), bool)
    for tree in trees.itertuples():
        crowns[int(tree.ymin):int(tree.ymax), int(tree.xmin):int(tree.xmax)] = True
    vegetation = classes.values == 1
    assert vegetation[crowns].mean() > 0.6
    assert vegetation[~crowns].mean() < 0.3
    window = pipeline.segment(url, "vegetation", (100, 50, 300, 250), tile_size=128, overlap=32)
    np.testing.assert_array_equal(window.values[60:140, 60:140], classes.values[110:190, 160:240])
    assert window.plot() is not None  # DataArray.plot draws the class raster


def test_vegetation_needs_rgb_or_nir_and_ndvi_on_multispectral() -> None:
    pan = str(shared_file("geotiff/spacenet_atlanta_sample.tif"))
    with pytest.raises(ModelError, match="vegetation needs an RGB tile or nirBand") as caught:
        pipeline.segment(pan, "vegetation", (0, 0, 200, 200))
    assert "\n" not in str(caught.value)
    mul = str(shared_file("geotiff/geocal_mul8_rpc.tif"))  # WorldView-2 bands: red 5, NIR1 7
    ndvi = pipeline.segment(mul, "vegetation", parameters={"redBand": 5, "nirBand": 7},
                            tile_size=64, overlap=16)
    with rasterio.open(mul) as src:
        red, nir = src.read(5).astype(float), src.read(7).astype(float)
    assert ndvi.shape == red.shape and set(np.unique(ndvi.values)) <= {0, 1}
    # vegetated pixels are those with the higher raw NDVI
    raw = (nir - red) / np.maximum(nir + red, 1)
    if (ndvi.values == 1).any() and (ndvi.values == 0).any():
        assert raw[ndvi.values == 1].mean() > raw[ndvi.values == 0].mean()


def test_spacenet_polygons_geolocated_through_the_affine(tmp_path: Path, dask_client: Any) -> None:
    url = str(shared_file("geotiff/spacenet_atlanta_sample.tif"))
    result = run_segmentation(job(url, tmp_path, parameters={"threshold": 200}, minArea=20),
                              dask_client, chunk_target=512)
    assert result.status == "SUCCESS", result.summary
    with rasterio.open(result.images[0].rasters[0]) as cog, rasterio.open(url) as src:
        assert cog.transform == Affine(0.5, 0.0, 733601.0, 0.0, -0.5, 3725139.0)
        assert cog.crs == src.crs
        # DRA (the image is 11-bit): bright means above the stretch's 200/255
        assert 0 < cog.read(1).mean() < 0.5
    features = result.features
    assert len(features) > 5
    to_lonlat = Transformer.from_crs(32616, 4326, always_xy=True)
    for geometry, pixels, props in zip(features.geometry, features["imageGeometry"],
                                       features["modelProperties"], strict=True):
        ring = shapely.get_coordinates(shapely.get_exterior_ring(pixels))  # a segment's: shapely
        lon, lat = to_lonlat.transform(733601.0 + 0.5 * ring[:, 0], 3725139.0 - 0.5 * ring[:, 1])
        ground = np.asarray(shapely.get_coordinates(shapely.get_exterior_ring(geometry)))
        assert np.abs(np.sort(ground[:, 0]) - np.sort(lon)).max() < 1e-9
        assert np.abs(np.sort(ground[:, 1]) - np.sort(lat)).max() < 1e-9
        area = json.loads(props)["area_m2"]
        assert area >= 20
        assert area == pytest.approx(shapely.geometry.shape(pixels).area * 0.25, rel=0.01)


def test_rpc_nitf_raster_carries_rpcs_and_polygons_follow_the_rpc(tmp_path: Path, dask_client: Any) -> None:
    source = shared_file("geotiff/s2p_pleiades_rpc_01.tif")
    nitf = tmp_path / "pleiades.ntf"
    rasterio.shutil.copy(str(source), str(nitf), driver="NITF", BLOCKXSIZE=256, BLOCKYSIZE=256)
    Path(f"{nitf}.aux.xml").unlink(missing_ok=True)  # the RPC00B TRE alone (rounded offsets)
    result = run_segmentation(job(str(nitf), tmp_path / "out", parameters={"threshold": 220}, minArea=50),
                              dask_client, chunk_target=512)
    assert result.status == "SUCCESS", result.summary
    with rasterio.open(nitf) as src:
        rpcs = src.rpcs
    cog = result.images[0].rasters[0]
    assert cog_validate(cog)[0]
    with rasterio.open(cog) as out:
        assert out.rpcs is not None and out.crs is None
        for key in ("line_off", "samp_off", "lat_off", "long_off", "height_off"):
            assert getattr(out.rpcs, key) == pytest.approx(getattr(rpcs, key))
        assert out.rpcs.line_num_coeff == pytest.approx(rpcs.line_num_coeff)
    features = result.features
    assert len(features)
    with RPCTransformer(rpcs, RPC_HEIGHT=rpcs.height_off) as rpc:  # independently: GDAL's RPC
        for geometry, pixels in zip(features.geometry[:20], features["imageGeometry"][:20], strict=True):
            ring = shapely.get_coordinates(shapely.get_exterior_ring(pixels))
            lon, lat = rpc.xy(ring[:, 1], ring[:, 0], offset="ul")
            ground = np.asarray(shapely.get_coordinates(shapely.get_exterior_ring(geometry)))
            assert np.abs(np.sort(ground[:, 0]) - np.sort(lon)).max() < 1e-7
            assert np.abs(np.sort(ground[:, 1]) - np.sort(lat)).max() < 1e-7


# ---------------------------------------------------------------- HTTP endpoint (serve-model)
@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    yy, xx = np.mgrid[0:700, 0:900] + 0.5
    disc = (xx - 300) ** 2 + (yy - 350) ** 2 < 120**2
    truth = disc | ((xx > 500) & (xx < 850) & (np.abs(yy - 200) < 30))
    path = tmp_path_factory.mktemp("http") / "planted.tif"
    with rasterio.open(path, "w", driver="GTiff", width=900, height=700, count=3, dtype="uint8",
                       crs="EPSG:4326", transform=Affine(1e-5, 0, 10.0, 0, -1e-5, 50.0)) as dst:
        dst.write(np.repeat(np.where(truth, 250, 20).astype(np.uint8)[None], 3, axis=0))
    return path, truth.astype(np.uint8)


@pytest.mark.parametrize("accept", [NPY_TYPE, PNG_TYPE, TIFF_TYPE])
def test_http_segmenter_behind_serve_model(planted: tuple[Path, np.ndarray], accept: str) -> None:
    server = start_server("threshold")
    try:
        spec = ModelSpec("HTTP_ENDPOINT", f"{server.url}/invocations",
                         {"classNames": "background,bright", "Accept": accept}, tile_format="PNG")
        segmenter = load_segmenter(spec)
        tiles = np.stack([np.full((64, 64, 3), v, np.uint8) for v in (10, 200)])
        tiles[0, :10, :10] = 255
        answers = segmenter.segment(tiles, np.zeros((2, 2), np.int64))
        for tile, answer in zip(tiles, answers, strict=True):
            np.testing.assert_array_equal(answer, threshold_answer(tile))
        classes = pipeline.segment(str(planted[0]), spec, tile_size=256, overlap=32)
        np.testing.assert_array_equal(classes.values, planted[1])
    finally:
        server.shutdown()


def test_http_job_matches_in_process(planted: tuple[Path, np.ndarray], tmp_path: Path,
                                     dask_client: Any) -> None:
    server = start_server("threshold")
    try:
        request = ImageRequest.parse({
            **job(str(planted[0]), tmp_path).to_wire(),
            "imageProcessor": {"name": f"{server.url}/invocations", "type": "HTTP_ENDPOINT"},
            "imageProcessorParameters": {"classNames": ["background", "bright"]},
            "imageProcessorTileFormat": "PNG",
        })
        result = run_segmentation(request, dask_client, chunk_target=448)
    finally:
        server.shutdown()
    assert result.status == "SUCCESS", result.summary
    with rasterio.open(result.images[0].rasters[0]) as cog:
        np.testing.assert_array_equal(cog.read(1), planted[1])
    assert len(result.features) == 2


def test_sagemaker_job_behind_serve_model(planted: tuple[Path, np.ndarray], tmp_path: Path, aws: str,
                                          monkeypatch: pytest.MonkeyPatch, dask_client: Any) -> None:
    server = start_server("threshold")
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", server.url)
    try:
        request = ImageRequest.parse({
            **job(str(planted[0]), tmp_path).to_wire(),
            "imageProcessor": {"name": "segmenter", "type": "SM_ENDPOINT"},
            "imageProcessorParameters": {"classNames": ["background", "bright"], "Accept": TIFF_TYPE},
            "imageProcessorTileFormat": "GTIFF",
        })
        result = run_segmentation(request, dask_client, chunk_target=448)
        assert server.stats.tiles > 0
    finally:
        server.shutdown()
    assert result.status == "SUCCESS", result.summary
    with rasterio.open(result.images[0].rasters[0]) as cog:
        np.testing.assert_array_equal(cog.read(1), planted[1])


def test_unknown_segmenter_and_polygon_class_fail_in_one_line(planted: tuple[Path, np.ndarray],
                                                                tmp_path: Path, dask_client: Any) -> None:
    with pytest.raises(ModelError, match="unknown BUILTIN segmenter 'bright-objects'"):
        run_segmentation(job(str(planted[0]), tmp_path, name="bright-objects"), dask_client)
    with pytest.raises(ModelError, match="polygonClasses: roads not among"):
        run_segmentation(job(str(planted[0]), tmp_path, polygonClasses=["roads"]), dask_client)


# ---------------------------------------------------------------- S3 in and out (moto)
def test_s3_cog_in_and_out(planted: tuple[Path, np.ndarray], aws: str, dask_client: Any,
                           tmp_path: Path) -> None:
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="seg-in")
    s3.create_bucket(Bucket="seg-out")
    cog_in = tmp_path / "scene.tif"
    rasterio.shutil.copy(str(planted[0]), str(cog_in), driver="COG", BLOCKSIZE=256)
    s3.upload_file(str(cog_in), "seg-in", "scene.tif")
    request = job("s3://seg-in/scene.tif", outputs=[{"type": "S3", "bucket": "seg-out", "prefix": "runs"}],
                  job_id="s3seg", stitch="CORE")
    result = run_segmentation(request, dask_client, chunk_target=448)
    assert result.status == "SUCCESS", result.summary
    assert result.images[0].rasters == ["s3://seg-out/runs/s3seg.scene.classes.tif"]
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="seg-out")["Contents"])
    assert keys == ["runs/s3seg.geojson", "runs/s3seg.parquet", "runs/s3seg.scene.classes.tif",
                    "runs/s3seg.summary.json"]  # the parts in runs/s3seg.parts/ removed
    local = tmp_path / "back.tif"
    s3.download_file("seg-out", "runs/s3seg.scene.classes.tif", str(local))
    assert cog_validate(str(local))[0]
    with rasterio.open(local) as out:
        assert out.transform == Affine(1e-5, 0, 10.0, 0, -1e-5, 50.0) and out.crs.to_epsg() == 4326
        np.testing.assert_array_equal(out.read(1), planted[1])
    collection = json.loads(s3.get_object(Bucket="seg-out", Key="runs/s3seg.geojson")["Body"].read())
    disc = [f for f in collection["features"] if f["properties"]["imageBBox"][0] < 300]
    assert len(collection["features"]) == 2 and len(disc) == 1
    # the disc's ground centroid is the affine image of its pixel centre (300, 350)
    centroid = shapely.geometry.shape(disc[0]["geometry"]).centroid
    assert centroid.x == pytest.approx(10.0 + 300 * 1e-5, abs=2e-8)
    assert centroid.y == pytest.approx(50.0 - 350 * 1e-5, abs=2e-8)


# ---------------------------------------------------------------- the PP-OCRv4 probability map
def test_text_probability_as_segmentation(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install 'dask-model-runner[onnx]'")
    pytest.importorskip("rapidocr_onnxruntime", reason="needs the onnx extra")
    from PIL import Image, ImageDraw, ImageFont

    source = shared_file("geotiff/neon_OSBS_029.tif")
    with rasterio.open(source) as src:
        profile = src.profile
        image = Image.fromarray(src.read().transpose(1, 2, 0))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=28)
    truth = []
    for x, y, text in [(20, 30, "RUNWAY 27"), (180, 200, "HANGAR B"), (60, 330, "GATE 14")]:
        draw.text((x, y), text, font=font, fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))
        truth.append(draw.textbbox((x, y), text, font=font, stroke_width=2))
    path = tmp_path / "labelled.tif"
    profile.update(nodata=None)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.asarray(image).transpose(2, 0, 1))
    spec = ModelSpec("PYTHON", "pipeline.segmentation.text:TextSegmenter", {"threads": 1})
    classes = pipeline.segment(str(path), spec, tile_size=256, overlap=64)
    assert classes.attrs["class_names"] == ["background", "text"]
    text = classes.values == 1
    inside = np.zeros(text.shape, bool)
    for x0, y0, x1, y1 in truth:
        inside[y0:y1, x0:x1] = True
        assert text[y0:y1, x0:x1].mean() > 0.2  # every label is found
    assert text[~inside].mean() < 0.01  # and almost nothing else


# ---------------------------------------------------------------- pipeline.run and the CLI
def test_pipeline_run_and_cli_run_segmentation(planted: tuple[Path, np.ndarray], tmp_path: Path,
                                               dask_client: Any, capsys: pytest.CaptureFixture[str],
                                               caplog: pytest.LogCaptureFixture) -> None:
    """``--workers 1``: a worker process; without it, the small job runs on threads in this
    process (as the image CLI's small jobs): the same raster either way."""
    import logging

    from pipeline.cli import main

    request = job(str(planted[0]), tmp_path / "api", job_id="api")
    result = pipeline.run(request.to_wire(), dask_client)
    assert result.status == "SUCCESS" and len(result.features) == 2
    assert (tmp_path / "api" / "api.planted.classes.tif").exists()
    wire = {**request.to_wire(), "jobId": "cli", "outputs": []}
    del wire["segmentation"]  # --segment adds the default options
    path = tmp_path / "request.json"
    path.write_text(json.dumps(wire))
    code = main(["run", str(path), "--segment", "--workers", "1", "--no-progress",
                 "--output-dir", str(tmp_path / "cli"), "--chunk-size", "448"])
    assert code == 0, capsys.readouterr().err
    with rasterio.open(tmp_path / "cli" / "cli.planted.classes.tif") as cog:
        np.testing.assert_array_equal(cog.read(1), planted[1])
    assert "cli.planted.classes.tif" in capsys.readouterr().out
    assert not any("threads in this process" in r.getMessage() for r in caplog.records)
    with caplog.at_level(logging.INFO, logger="graphs.cluster"):
        code = main(["run", str(path), "--segment", "--no-progress",
                     "--output-dir", str(tmp_path / "threads")])
    assert code == 0, capsys.readouterr().err
    assert any("threads in this process" in r.getMessage() for r in caplog.records)
    with rasterio.open(tmp_path / "threads" / "cli.planted.classes.tif") as cog:
        np.testing.assert_array_equal(cog.read(1), planted[1])
