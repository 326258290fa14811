"""Quick looks: overviews where the file has them, decimated reads of any size, boxes drawn."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import rasterio
from matplotlib.image import imread
from rasterio.transform import from_origin
from rasterio.windows import Window

from pipeline.cli import main
from pipeline.quicklook import feature_boxes, quicklook, read_overview
from pipeline.reading import ImageError
from tests.conftest import shared_file


def write_tif(path: Path, pixels: np.ndarray, overviews: bool = False, **extra: object) -> Path:
    profile = {"driver": "GTiff", "width": pixels.shape[2], "height": pixels.shape[1],
               "count": pixels.shape[0], "dtype": str(pixels.dtype), "tiled": True,
               "blockxsize": 256, "blockysize": 256, "compress": "deflate",
               "crs": "EPSG:32617", "transform": from_origin(404000, 3286000, 0.5, 0.5), **extra}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels)
        if overviews:
            dst.build_overviews([2, 4, 8], rasterio.enums.Resampling.average)
    return path


def test_overview_is_read_from_the_overviews(tmp_path: Path) -> None:
    # Build overviews of a gradient, then zero the full-resolution pixels without rebuilding
    # them: a quick look that came from the full image would be flat, one from the overviews not.
    ramp = np.tile(np.linspace(0, 250, 2048).astype(np.uint8), (1, 2048, 1))
    path = write_tif(tmp_path / "ramp.tif", ramp, overviews=True)
    with rasterio.open(path, "r+") as dst:
        dst.write(np.zeros((1, 2048, 2048), np.uint8))
    view = read_overview(str(path), max_side=256)
    assert view.from_overviews
    assert view.pixels.shape == (256, 256)
    assert view.scale == (8.0, 8.0)
    assert view.pixels[:, 0].mean() < 10 and view.pixels[:, -1].mean() > 245  # the stale ramp


def test_decimated_read_of_a_huge_image_without_overviews(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 100,000 x 60,000 pixels, sparse: only the blocks holding one bright square are stored.
    path = tmp_path / "huge.tif"
    profile = {"driver": "GTiff", "width": 100_000, "height": 60_000, "count": 1, "dtype": "uint8",
               "tiled": True, "blockxsize": 512, "blockysize": 512, "compress": "deflate",
               "sparse_ok": True, "crs": "EPSG:4326", "transform": from_origin(10, 50, 1e-5, 1e-5)}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.full((1, 1024, 1024), 250, np.uint8), window=Window(51_200, 30_720, 1024, 1024))
    assert path.stat().st_size < 1_000_000
    with caplog.at_level(logging.WARNING, logger="pipeline.quicklook"):
        view = read_overview(str(path), max_side=1000)
    assert "has no overviews" in caplog.text
    assert not view.from_overviews
    assert view.pixels.shape == (600, 1000) and view.scale == (100.0, 100.0)
    rows, cols = np.nonzero(view.pixels > 128)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (307, 316, 512, 521)


def test_png_has_the_boxes_where_they_belong(tmp_path: Path) -> None:
    pixels = np.full((3, 300, 400), 60, np.uint8)
    path = write_tif(tmp_path / "small.tif", pixels)
    boxes = np.array([[50, 40, 150, 120], [200, 150, 380, 280]], dtype=float)
    png = quicklook(str(path), boxes, tmp_path / "look" / "q.png", max_side=400)
    image = imread(png)[..., :3]
    assert image.shape == (300, 400, 3)
    red = (image[..., 0] > 0.8) & (image[..., 1] < 0.3) & (image[..., 2] < 0.3)
    # the left edge of box 1 (x = 50) and the bottom edge of box 2 (y = 280) are red
    assert red[60:100, 49:52].any(axis=1).all()
    assert red[278:282, 220:360].any(axis=0).all()
    assert not red[150:250, 20:40].any()  # and the background is not


def test_classes_get_their_own_colours(tmp_path: Path) -> None:
    path = write_tif(tmp_path / "small.tif", np.full((1, 200, 200), 60, np.uint8))
    boxes = np.array([[20, 20, 80, 80], [120, 120, 180, 180]], dtype=float)
    png = quicklook(str(path), boxes, tmp_path / "q.png", classes=["car", "ship"])
    image = imread(png)[..., :3]
    assert (image[50, 19:22, 0] > 0.8).any() and (image[50, 19:22, 1] < 0.3).all()  # car: red
    assert (image[150, 119:122, :2] > 0.8).all(axis=1).any()  # ship: yellow


def test_feature_boxes_of_one_image() -> None:
    import geopandas as gpd

    features = gpd.GeoDataFrame({
        "imageBBox": [[0, 0, 1, 1], [2, 2, 3, 3], [4, 4, 5, 5]],
        "featureClasses": [[{"iri": "a", "score": 1.0}], [{"iri": "b", "score": 0.5}], []],
        "image_url": ["x.tif", "y.tif", "x.tif"],
    }, geometry=gpd.points_from_xy([0, 1, 2], [0, 1, 2]))
    boxes, classes = feature_boxes(features, "x.tif")
    assert boxes.tolist() == [[0, 0, 1, 1], [4, 4, 5, 5]]
    assert classes.tolist() == ["a", ""]


def test_nitf_with_one_row_blocks() -> None:
    view = read_overview(str(shared_file("nitf/jitc/i_3001a.ntf")), max_side=256)
    assert view.pixels.shape == (256, 256) and view.pixels.dtype == np.uint8
    assert view.pixels.std() > 10  # the airfield, not a flat image


def test_unreadable_image_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff")
    with pytest.raises(ImageError) as err:
        read_overview(str(bad))
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_cli_run_writes_a_quicklook(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pixels = np.full((1, 600, 800), 40, np.uint8)
    pixels[0, 100:120, 200:230] = 250
    pixels[0, 400:410, 600:640] = 250
    image = write_tif(tmp_path / "scene.tif", pixels)
    request = tmp_path / "job.json"
    request.write_text(json.dumps({
        "jobId": "ql", "imageUrls": [str(image)],
        "imageProcessor": {"name": "bright-objects", "type": "BUILTIN"},
        "imageProcessorTileSize": 256, "imageProcessorTileOverlap": 64,
    }))
    png = tmp_path / "ql.png"
    code = main(["run", str(request), "--output-dir", str(tmp_path / "out"), "--quicklook", str(png),
                 "--workers", "1", "--no-progress"])
    assert code == 0
    assert f"quick look {png}" in capsys.readouterr().out
    look = imread(png)[..., :3]
    assert look.shape == (600, 800, 3)  # small image: one PNG pixel per image pixel
    red = (look[..., 0] > 0.8) & (look[..., 1] < 0.3)
    assert red[100:120, 199:202].any(axis=1).all()  # left edge of the first object's box
    assert red[409:412, 610:630].any(axis=0).all()  # bottom edge of the second
