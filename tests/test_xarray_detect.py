"""``pipeline.detect`` on chunked DataArrays: the same features as a URL job for the same
pixels, and clipped, reprojected and computed arrays against truth transformed independently."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import rioxarray
import shapely
import xarray as xr
from pyproj import Transformer

import pipeline
from graphs.array_job import array_job, array_sensor_model
from pipeline.api import DEFAULT_DISTILLATION, as_model_spec
from pipeline.demo import DEMO_CRS, DEMO_ORIGIN, DEMO_RESOLUTION, match_truth, write_scene

TILE, OVERLAP = 256, 48


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return write_scene(tmp_path_factory.mktemp("xarray") / "scene.tif", size=1024, count=30,
                       tile_size=TILE, overlap=OVERLAP, chunk_target=416)


def boxes_of(features: Any) -> np.ndarray:
    return np.array(features["imageBBox"].tolist(), dtype=float).reshape(-1, 4)


def by_box(features: Any) -> Any:
    boxes = boxes_of(features)
    return features.iloc[np.lexsort(boxes.T[::-1])].reset_index(drop=True)


def open_cog(scene: Any, chunks: int = 300) -> Any:
    return rioxarray.open_rasterio(scene.path, chunks={"band": -1, "y": chunks, "x": chunks}, lock=False)


def utm_to_lonlat(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return Transformer.from_crs(DEMO_CRS, "EPSG:4326", always_xy=True).transform(x, y)


@pytest.mark.parametrize("tiling", ["FIXED_STRIDE", "VARIABLE_OVERLAP"])
def test_dataarray_equals_url_job_on_a_distributed_client(scene: Any, dask_client: Any, tiling: str) -> None:
    """Odd array chunks (300 px), several job chunks (416 px): features equal ``run``'s."""
    url = str(scene.path)
    job = pipeline.run({"jobId": "url", "imageUrls": [url], "imageProcessorTileSize": TILE,
                        "imageProcessorTileOverlap": OVERLAP, "tilingStrategy": tiling,
                        "imageProcessor": {"name": "bright-objects", "type": "BUILTIN"}}, client=dask_client)
    lazy = array_job(open_cog(scene), as_model_spec("bright-objects"), tile_size=TILE, overlap=OVERLAP,
                     tiling=tiling, algorithm=DEFAULT_DISTILLATION, image_url=url, chunk_target=416)
    array = by_box(dask_client.compute(lazy).result())
    expected = by_box(job.features)
    assert len(expected) == len(array) >= len(scene.truth) - 2  # OSML's grid may miss the edge
    assert match_truth(boxes_of(array), scene.truth)[1:] == (0, 0)
    np.testing.assert_array_equal(boxes_of(array), boxes_of(expected))
    assert array["featureClasses"].tolist() == expected["featureClasses"].tolist()  # classes, scores
    assert array["id"].tolist() == expected["id"].tolist()
    assert shapely.equals_exact(array.geometry.values, expected.geometry.values, tolerance=1e-12).all()
    np.testing.assert_allclose(array["center_longitude"], expected["center_longitude"], atol=1e-12)


def test_public_detect_is_lazy_and_computes(scene: Any) -> None:
    lazy = pipeline.detect(open_cog(scene), "bright-objects", tile_size=TILE, overlap=OVERLAP)
    assert hasattr(lazy, "dask") and hasattr(lazy, "compute")
    eager = pipeline.detect(open_cog(scene, 512), "bright-objects", tile_size=TILE, overlap=OVERLAP,
                            compute=True)
    assert match_truth(boxes_of(lazy.compute()), scene.truth) == (len(scene.truth), 0, 0)
    assert match_truth(boxes_of(eager), scene.truth) == (len(scene.truth), 0, 0)
    assert eager.crs.to_epsg() == 4326
    with pytest.raises(ValueError, match="no window"):
        pipeline.detect(open_cog(scene), window=(0, 0, 10, 10))


def test_clipped_array_against_shifted_truth(scene: Any) -> None:
    """Clip to a UTM box: objects wholly inside come back at their truth box less the clip's
    offset, geolocated where pyproj puts their UTM corners; objects cut by the clip are cut."""
    px0, py0, px1, py1 = 200, 150, 900, 800  # pixel edges of the clip
    ox, oy = DEMO_ORIGIN
    clipped = open_cog(scene).rio.clip_box(ox + px0 * DEMO_RESOLUTION, oy - py1 * DEMO_RESOLUTION,
                                           ox + px1 * DEMO_RESOLUTION, oy - py0 * DEMO_RESOLUTION)
    assert clipped.shape[1:] == (py1 - py0, px1 - px0)
    found = pipeline.detect(clipped, "bright-objects", tile_size=TILE, overlap=OVERLAP, compute=True)
    truth = scene.truth
    inside = (truth[:, 0] >= px0) & (truth[:, 1] >= py0) & (truth[:, 2] <= px1) & (truth[:, 3] <= py1)
    cut = ~inside & (truth[:, 2] > px0) & (truth[:, 0] < px1) & (truth[:, 3] > py0) & (truth[:, 1] < py1)
    expected = truth[inside] - [px0, py0, px0, py0]
    matched, duplicates, unmatched = match_truth(boxes_of(found), expected)
    assert (matched, duplicates, unmatched) == (len(expected), 0, int(cut.sum()))
    assert inside.sum() >= 10
    # geometry: the truth box corners in UTM, to lon/lat with pyproj
    found = by_box(found)
    boxes = boxes_of(found)
    keep = np.array([tuple(b) in {tuple(e) for e in expected.tolist()} for b in boxes.tolist()])
    b = boxes[keep] + [px0, py0, px0, py0]
    lon0, lat0 = utm_to_lonlat(ox + b[:, 0] * DEMO_RESOLUTION, oy - b[:, 3] * DEMO_RESOLUTION)
    lon1, lat1 = utm_to_lonlat(ox + b[:, 2] * DEMO_RESOLUTION, oy - b[:, 1] * DEMO_RESOLUTION)
    bounds = shapely.bounds(found.geometry.values[keep])
    np.testing.assert_allclose(bounds[:, 0], np.minimum(lon0, utm_to_lonlat(
        ox + b[:, 0] * DEMO_RESOLUTION, oy - b[:, 1] * DEMO_RESOLUTION)[0]), atol=1e-9)
    np.testing.assert_allclose(bounds[:, 1], np.minimum(lat0, lat1), atol=1e-9)
    centre_x = ox + (b[:, 0] + b[:, 2]) / 2 * DEMO_RESOLUTION
    centre_y = oy - (b[:, 1] + b[:, 3]) / 2 * DEMO_RESOLUTION
    lon, lat = utm_to_lonlat(centre_x, centre_y)
    np.testing.assert_allclose(found["center_longitude"][keep], lon, atol=1e-9)
    np.testing.assert_allclose(found["center_latitude"][keep], lat, atol=1e-9)


def test_reprojected_array_against_projected_truth(scene: Any) -> None:
    """Reproject to Web Mercator (nearest): each object is found once, its centre where pyproj
    puts the truth centre, within a pixel of the new grid. The objects are 255, rioxarray's
    default nodata for uint8, so the border is declared 0 (nodata is masked)."""
    from rasterio.enums import Resampling

    mercator = open_cog(scene).rio.reproject("EPSG:3857", resampling=Resampling.nearest, nodata=0).chunk(
        {"y": 400, "x": 400})
    found = pipeline.detect(mercator, "bright-objects", tile_size=TILE, overlap=OVERLAP, compute=True)
    truth = scene.truth
    ox, oy = DEMO_ORIGIN
    lon, lat = utm_to_lonlat(ox + (truth[:, 0] + truth[:, 2]) / 2 * DEMO_RESOLUTION,
                             oy - (truth[:, 1] + truth[:, 3]) / 2 * DEMO_RESOLUTION)
    to_merc = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True)
    tx, ty = to_merc.transform(lon, lat)
    fx, fy = to_merc.transform(found["center_longitude"].to_numpy(), found["center_latitude"].to_numpy())
    pixel = abs(mercator.rio.resolution()[0])
    distance = np.hypot(tx[:, None] - fx[None], ty[:, None] - fy[None]) / pixel
    assert len(found) == len(truth)
    assert (distance.min(axis=1) < 1.0).all()  # every object, within a pixel
    assert (distance.min(axis=0) < 1.0).all()  # every feature on an object
    assert ((distance < 1.0).sum(axis=0) == 1).all()


def test_computed_array_without_georeferencing_gives_pixel_features(scene: Any) -> None:
    """A band mean (float, 2-D) of a plain DataArray with no CRS: pixel features, exact boxes."""
    cube = open_cog(scene)
    mean = xr.DataArray(cube.data, dims=("band", "y", "x")).astype("float32").mean("band")
    found = pipeline.detect(mean, "bright-objects", tile_size=TILE, overlap=OVERLAP, compute=True)
    assert found.crs is None and found["center_longitude"].isna().all()
    assert match_truth(boxes_of(found), scene.truth) == (len(scene.truth), 0, 0)


def test_an_open_image_rpc_array_keeps_its_sensor_model() -> None:
    """An unsliced ``open_image`` array of an RPC GeoTIFF (uint16, no CRS):
    the same features as the URL form, geolocated through the RPC; sliced, it has pixels only."""
    from pipeline.api import open_image
    from pipeline.sensor_models import PixelSensorModel, RPCSensorModel
    from tests.conftest import shared_file

    path = shared_file("geotiff/geocal_pan_rpc.tif")
    if not path.exists():
        pytest.skip("needs ../shared/data")
    image = open_image(str(path), chunks=64)
    settings: dict[str, Any] = {"tile_size": 64, "overlap": 16, "range_adjustment": "MINMAX",
                                "parameters": {"threshold": 4}}
    found = pipeline.detect(image, "bright-objects", image_url=str(path), compute=True, **settings)
    expected = pipeline.detect(str(path), "bright-objects", **settings)
    assert len(found) == len(expected) > 3
    found, expected = by_box(found), by_box(expected)
    np.testing.assert_array_equal(boxes_of(found), boxes_of(expected))
    assert shapely.equals_exact(found.geometry.values, expected.geometry.values, tolerance=1e-12).all()
    assert isinstance(array_sensor_model(image), RPCSensorModel)
    assert isinstance(array_sensor_model(image[:, 10:, 10:]), PixelSensorModel)


def _bordered(nodata_attr: bool) -> tuple[Any, np.ndarray]:
    """A 3-band uint8 UTM array: background 40, objects 230 at known boxes, and a 255 nodata
    corner (``x + y < 150``, as a reprojection leaves) declared as ``.rio.nodata`` or a bare
    ``_FillValue`` attr."""
    pixels = np.full((3, 700, 900), 40, dtype=np.uint8)
    truth = np.array([[150, 120, 170, 136], [400, 300, 431, 311], [820, 640, 840, 690], [100, 60, 110, 70]])
    for x0, y0, x1, y1 in truth:
        pixels[:, y0:y1, x0:x1] = 230
    rows, cols = np.mgrid[:700, :900]
    pixels[:, rows + cols < 150] = 255
    ox, oy = DEMO_ORIGIN
    array = xr.DataArray(pixels, dims=("band", "y", "x"),
                         coords={"y": oy - (np.arange(700) + 0.5) * DEMO_RESOLUTION,
                                 "x": ox + (np.arange(900) + 0.5) * DEMO_RESOLUTION}).chunk(
        {"band": -1, "y": 256, "x": 256}).rio.write_crs(DEMO_CRS)
    if nodata_attr:
        array.attrs["_FillValue"] = 255
    else:
        array = array.rio.write_nodata(255)
    return array, truth


@pytest.mark.parametrize("nodata_attr", [False, True])
def test_dataarray_nodata_is_zero_in_the_tiles(nodata_attr: bool) -> None:
    """A 255 nodata corner (``rio.reproject`` declares 255 on uint8) is 0 in the model's tiles:
    the bright-objects model finds exactly the planted objects, not the corner; without the
    declaration the corner is found too (the same pixels: the test can fail)."""
    array, truth = _bordered(nodata_attr)
    settings: dict[str, Any] = {"tile_size": TILE, "overlap": OVERLAP, "compute": True}
    found = pipeline.detect(array, "bright-objects", **settings)
    assert match_truth(boxes_of(found), truth) == (len(truth), 0, 0)
    np.testing.assert_array_equal(boxes_of(by_box(found)), truth[np.lexsort(truth.T[::-1])])
    undeclared = array.rio.write_nodata(None)
    undeclared.attrs.pop("_FillValue", None)
    bright = boxes_of(pipeline.detect(undeclared, "bright-objects", **settings))
    assert match_truth(bright, truth) == (len(truth), 0, 1) and [0, 0, 150, 150] in bright.tolist()
