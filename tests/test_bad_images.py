"""Bad images in one request: each fails alone with a one-line reason, the others still run."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import rasterio.shutil
from rasterio.transform import from_origin

from graphs.image_job import run_job
from pipeline.request import ImageRequest
from tests.conftest import SHARED_DATA

JITC = SHARED_DATA / "nitf" / "jitc"
TILE, OVERLAP = 256, 32


def _write(path: Path, pixels: np.ndarray, **profile: Any) -> Path:
    bands, height, width = pixels.shape
    with rasterio.open(path, "w", driver=profile.pop("driver", "GTiff"), width=width, height=height,
                       count=bands, dtype=pixels.dtype, crs="EPSG:4326",
                       transform=from_origin(10.0, 50.0, 1e-4, 1e-4), **profile) as dst:
        dst.write(pixels)
    return path


def _squares(height: int, width: int, corners: list[tuple[int, int]], value: float = 255,
             dtype: str = "uint8", background: float = 0) -> np.ndarray:
    pixels = np.full((1, height, width), background, dtype=dtype)
    for row, col in corners:
        pixels[0, row : row + 8, col : col + 8] = value
    return pixels


def _patch_nitf_size(source: Path, target: Path, rows: int, cols: int) -> Path:
    """A copy of a single-image NITF whose image subheader claims ``rows`` × ``cols`` pixels."""
    data = bytearray(source.read_bytes())
    header_length = int(data[354:360])  # HL: the file header's length
    assert data[header_length : header_length + 2] == b"IM"
    nrows = header_length + 333  # NROWS, NCOLS: 8 digits each in the image subheader
    data[nrows : nrows + 16] = f"{rows:08d}{cols:08d}".encode()
    target.write_bytes(bytes(data))
    return target


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str, str]]:
    """``{name: (url, expected status, expected reason fragment)}``."""
    d = tmp_path_factory.mktemp("bad-images")
    cases: dict[str, tuple[str, str, str]] = {}

    good = _write(d / "good.tif", _squares(200, 300, [(20, 20), (100, 150), (150, 280)]))
    cases["good"] = (str(good), "SUCCESS", "")
    cases["missing"] = (str(d / "missing.tif"), "FAILED", "image not found")
    (d / "empty.tif").write_bytes(b"")
    cases["zero bytes"] = (str(d / "empty.tif"), "FAILED", "empty.tif")
    (d / "magic.tif").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 8)
    cases["wrong magic"] = (str(d / "magic.tif"), "FAILED", "magic.tif")

    ramp = (np.arange(640 * 640) % 251).astype("uint8").reshape(1, 640, 640)
    cog_source = _write(d / "cog-source.tif", ramp)
    rasterio.shutil.copy(cog_source, d / "full.cog.tif", driver="COG", BLOCKSIZE=256, COMPRESS="DEFLATE")
    whole = (d / "full.cog.tif").read_bytes()
    (d / "truncated.cog.tif").write_bytes(whole[: len(whole) // 3])
    # GDAL's cause, not rasterio's "Read failed. See previous exception for details."
    cases["truncated COG"] = (str(d / "truncated.cog.tif"), "FAILED",
                              "truncated.cog.tif, band 1: IReadBlock failed at X offset 0, Y offset 0")

    if (JITC / "i_3001a.ntf").exists():
        nitf = (JITC / "i_3001a.ntf").read_bytes()
        (d / "truncated.ntf").write_bytes(nitf[: len(nitf) // 2])
        cases["truncated NITF"] = (str(d / "truncated.ntf"), "PARTIAL", "tiles failed")
        absurd = _patch_nitf_size(JITC / "i_3001a.ntf", d / "absurd.ntf", 99_999_999, 99_999_999)
        cases["absurd NITF header"] = (str(absurd), "FAILED", "absurd.ntf")
    # a real, sparse GeoTIFF of 270,000 × 270,000 pixels (1 MB on disk): refused before planning
    with rasterio.open(d / "huge.tif", "w", driver="GTiff", width=270_000, height=270_000, count=1,
                       dtype="uint8", tiled=True, blockxsize=1024, blockysize=1024,
                       SPARSE_OK=True) as dst:
        dst.write(np.full((1, 1, 1), 255, dtype="uint8"), window=((0, 1), (0, 1)))
    cases["huge sparse GeoTIFF"] = (str(d / "huge.tif"), "FAILED",
                                    "270000x270000 pixels is more than the limit")
    for name, reason in (("p0_02a.ntf", "p0_02a.ntf"), ("GHSarNITF21_good.ntf", "")):
        if (JITC / name).exists():
            cases[name] = (str(shutil.copy(JITC / name, d / name)), "FAILED", reason)

    _write(d / "nodata.tif", np.zeros((1, 300, 300), dtype="uint8"), nodata=0)
    cases["all nodata"] = (str(d / "nodata.tif"), "SUCCESS", "")
    floats = _squares(300, 300, [(120, 120)], value=250.0, dtype="float32", background=10.0)
    floats[0, :40, :] = np.nan
    floats[0, 40:80, :] = np.inf
    floats[0, 80:100, :] = -np.inf
    _write(d / "nan.tif", floats)
    cases["NaN/Inf float"] = (str(d / "nan.tif"), "SUCCESS", "")
    return cases


@pytest.fixture(scope="module")
def thin_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str, str]]:
    """Images thinner than the tile overlap, or with a last chunk thinner than it."""
    d = tmp_path_factory.mktemp("thin-images")
    cases: dict[str, tuple[str, str, str]] = {}
    _write(d / "one.tif", np.full((1, 1, 1), 255, dtype="uint8"))
    cases["1x1"] = (str(d / "one.tif"), "SUCCESS", "")
    _write(d / "row.tif", _squares(1, 700, []))
    cases["1xN"] = (str(d / "row.tif"), "SUCCESS", "")
    _write(d / "column.tif", _squares(600, 9, [(300, 0)]))
    cases["Nx9"] = (str(d / "column.tif"), "SUCCESS", "")
    # chunks of 448 px (2 strides of 224): the last chunk is 2 px wide, thinner than the halo
    _write(d / "sliver.tif", _squares(100, 450, [(40, 430)]))
    cases["chunk + 2 px"] = (str(d / "sliver.tif"), "SUCCESS", "")
    return cases


#: features each valid image must give (bright objects of 8×8 at ≥ 200)
EXPECTED_FEATURES = {"good": 3, "all nodata": 0, "NaN/Inf float": 1,
                     "1x1": 0, "1xN": 0, "Nx9": 1, "chunk + 2 px": 1}


def _job(job_id: str, images: dict[str, tuple[str, str, str]], client: Any, out: Path) -> Any:
    request = ImageRequest.parse({
        "jobId": job_id,
        "imageUrls": [url for url, _, _ in images.values()],
        "outputs": [{"type": "LOCAL", "path": str(out)}],
        "imageProcessor": {"name": "bright-objects", "type": "BUILTIN"},
        "imageProcessorTileSize": TILE,
        "imageProcessorTileOverlap": OVERLAP,
        "rangeAdjustment": "NONE",
    })
    return run_job(request, client, chunk_target=512)


@pytest.fixture(scope="module")
def outcome(images: dict[str, tuple[str, str, str]], dask_client: Any,
            tmp_path_factory: pytest.TempPathFactory) -> Any:
    return _job("bad-images", images, dask_client, tmp_path_factory.mktemp("out"))


@pytest.fixture(scope="module")
def thin_outcomes(thin_images: dict[str, tuple[str, str, str]], dask_client: Any,
                  tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One job per thin image (a job that raises loses every image of its request)."""
    outcomes: dict[str, Any] = {}
    for n, (name, case) in enumerate(thin_images.items()):
        try:
            outcomes[name] = _job(f"thin-{n}", {name: case}, dask_client,
                                  tmp_path_factory.mktemp("thin-out"))
        except Exception as exc:  # noqa: BLE001 - reported by the test of that image
            outcomes[name] = exc
    return outcomes


def test_the_job_is_partial_and_lists_every_image(images: dict[str, Any], outcome: Any) -> None:
    assert outcome.status == "PARTIAL"
    assert [i["url"] for i in outcome.summary["images"]] == [url for url, _, _ in images.values()]
    valid = sum(n for name, n in EXPECTED_FEATURES.items() if name in images)
    if "truncated NITF" in images:  # its readable top half gives features too (PARTIAL image)
        assert outcome.summary["features"] > valid
    else:  # without ../shared/data only the generated images run
        assert outcome.summary["features"] == valid
    assert outcome.summary["features"] == sum(
        i["detections"]["afterMerge"] for i in outcome.summary["images"] if i["status"] != "FAILED"
    )


BAD = ["good", "missing", "zero bytes", "wrong magic", "truncated COG", "truncated NITF",
       "absurd NITF header", "huge sparse GeoTIFF", "p0_02a.ntf", "GHSarNITF21_good.ntf",
       "all nodata", "NaN/Inf float"]
THIN = ["1x1", "1xN", "Nx9", "chunk + 2 px"]


@pytest.mark.parametrize("name", BAD)
def test_each_image_has_its_status_and_one_line_reason(
    name: str, images: dict[str, tuple[str, str, str]], outcome: Any
) -> None:
    _check_image(name, images, outcome)


@pytest.mark.parametrize("name", THIN)
def test_images_thinner_than_the_overlap(
    name: str, thin_images: dict[str, tuple[str, str, str]], thin_outcomes: dict[str, Any]
) -> None:
    outcome = thin_outcomes[name]
    assert not isinstance(outcome, Exception), f"the whole job raised: {outcome}"
    _check_image(name, thin_images, outcome)


def _check_image(name: str, images: dict[str, tuple[str, str, str]], outcome: Any) -> None:
    if name not in images:
        pytest.skip(f"{name}: needs ../shared/data/nitf/jitc")
    url, status, fragment = images[name]
    image = next(i for i in outcome.summary["images"] if i["url"] == url)
    assert image["status"] == status, image["reason"]
    if status == "PARTIAL":  # readable tiles ran; each unreadable window is named
        assert image["failedTiles"] and fragment in image["reason"]
        assert all("\n" not in t["reason"] for t in image["failedTiles"])
        # each failed window carries GDAL's own cause, not rasterio's "See previous exception"
        assert not any("See previous exception" in t["reason"] for t in image["failedTiles"])
    elif status == "FAILED":
        reason = image["reason"]
        assert reason and "\n" not in reason and "Traceback" not in reason and len(reason) < 400
        assert fragment in reason
    else:
        assert image["failedTiles"] == [] and image["reason"] in (None, "")
        found = outcome.features[outcome.features["image_url"] == url]
        assert len(found) == EXPECTED_FEATURES[name]
        if len(found):
            assert np.isfinite(np.array(list(found["imageBBox"]), dtype=float)).all()
            assert found.geometry.is_valid.all()
