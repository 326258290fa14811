"""Regions of interest: mapped through the sensor model (affine and RPC), only the chunks that
touch it are processed, features outside it are dropped, a miss is a clear FAILED."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import shapely
from pyproj import CRS
from rasterio.transform import RPCTransformer

from graphs.image_job import plan_image, run_job
from pipeline.demo import write_scene
from pipeline.detections import Detections
from pipeline.reading import ImageError, describe
from pipeline.request import ImageRequest
from pipeline.roi import chunk_mask, keep_in_roi, roi_pixels
from pipeline.sensor_models import AffineSensorModel, sensor_model
from pipeline.tiling import TileGrid
from tests.conftest import shared_file


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return write_scene(tmp_path_factory.mktemp("roi") / "scene.tif", size=1500, count=60,
                       tile_size=256, overlap=48, seed=11)


def _ground_polygon(model, x0, y0, x1, y1) -> str:
    xs, ys = np.array([x0, x1, x1, x0]), np.array([y0, y0, y1, y1])
    lon, lat = model.pixel_to_lonlat(xs, ys)
    return shapely.Polygon(np.column_stack([lon, lat])).wkt


def _request(url: str, roi: str | None, tmp_path, **extra) -> ImageRequest:
    return ImageRequest.parse({
        "jobId": "roi", "imageUrls": [url], "outputs": [{"type": "LOCAL", "path": str(tmp_path)}],
        "imageProcessor": {"name": "bright-objects", "type": "BUILTIN"},
        "imageProcessorTileSize": 256, "imageProcessorTileOverlap": 48,
        **({"regionOfInterest": roi} if roi else {}), **extra,
    })


def test_roi_processes_only_its_chunks_and_keeps_only_features_inside(scene, tmp_path, dask_client) -> None:
    url = str(scene.path)
    model = sensor_model(describe(url))
    assert isinstance(model, AffineSensorModel)
    roi = _ground_polygon(model, 100, 150, 700, 650)
    result = run_job(_request(url, roi, tmp_path), dask_client, chunk_target=400)
    assert result.status == "SUCCESS"
    image = result.summary["images"][0]
    # chunks of 416 px (the last one 668): the ROI (100..700) touches 2 × 2 of the 3 × 3 chunks
    assert image["regionOfInterest"]["chunks"] == 4 and image["regionOfInterest"]["chunksSkipped"] == 5
    assert image["regionOfInterest"]["pixelBounds"] == pytest.approx([100, 150, 700, 650], abs=0.01)
    assert image["tiles"] == 4 * 4  # 2 × 2 tiles in each of the 4 chunks
    truth = np.array(scene.truth, dtype=float)
    inside = (truth[:, 2] > 100) & (truth[:, 0] < 700) & (truth[:, 3] > 150) & (truth[:, 1] < 650)
    boxes = np.array(list(result.features["imageBBox"]), dtype=float)
    assert len(boxes) == inside.sum() > 0
    assert {tuple(b) for b in boxes} == {tuple(b) for b in truth[inside]}


def test_roi_that_misses_the_image_is_a_clear_failure(scene, tmp_path, dask_client) -> None:
    url = str(scene.path)
    model = sensor_model(describe(url))
    far = _ground_polygon(model, 5000, 5000, 6000, 6000)
    result = run_job(_request(url, far, tmp_path), dask_client, chunk_target=600)
    assert result.status == "FAILED"
    assert result.summary["images"][0]["reason"] == f"regionOfInterest does not intersect image {url}"


def test_roi_needs_georeferencing(tmp_path) -> None:
    url = str(shared_file("geotiff/osml_2_planes.tiff"))
    with pytest.raises(ImageError, match="needs a georeferenced image"):
        plan_image(_request(url, "POLYGON((0 0, 1 0, 1 1, 0 1, 0 0))", tmp_path), url)


def test_roi_through_an_rpc_maps_like_gdal(tmp_path) -> None:
    url = str(shared_file("geotiff/s2p_pleiades_rpc_01.tif"))
    info = describe(url)
    model = sensor_model(info)
    roi = _ground_polygon(model, 200, 300, 700, 800)
    request = _request(url, roi, tmp_path, imageProcessorTileSize=128, imageProcessorTileOverlap=16)
    plan = plan_image(request, url, chunk_target=224)
    assert plan.roi.bounds == pytest.approx((200, 300, 700, 800), abs=0.5)  # curved edges, densified
    with RPCTransformer(rasterio.rpc.RPC(**info.rpcs), RPC_HEIGHT=info.rpcs["height_off"]) as gdal:
        lon, lat = np.array(shapely.from_wkt(roi).exterior.coords).T
        rows, cols = gdal.rowcol(lon, lat, op=lambda v: v)
    assert np.allclose(cols, [200, 700, 700, 200, 200], atol=0.01)
    assert np.allclose(rows, [300, 300, 800, 800, 300], atol=0.01)
    mask = plan.chunk_mask
    # chunks of 224 px (the last 352) plus a 16 px halo: x 200..700 touches columns 0..3,
    # y 300..800 rows 1..3
    assert mask.shape == (4, 4) and mask.sum() == 12 and mask[1:4, 0:4].all()


def test_chunk_mask_and_feature_filter_units() -> None:
    grid = TileGrid(1000, 1000, 200, 40, 320)
    roi = shapely.box(400, 400, 410, 410)  # only chunk (1, 1)'s tiles reach it
    mask = chunk_mask(roi, grid)
    assert mask.tolist() == [[False, False, False], [False, True, False], [False, False, False]]
    edge = shapely.box(0, 0, 321, 10)  # chunk (0, 1)'s tiles start at 320
    assert chunk_mask(edge, grid)[0].tolist() == [True, True, False]
    found = Detections([[0, 0, 10, 10], [405, 405, 420, 420], [500, 500, 510, 510]], [1, 1, 1], ["a"] * 3)
    assert keep_in_roi(found, roi).boxes.tolist() == [[405, 405, 420, 420]]
    with pytest.raises(ImageError, match="does not intersect"):
        roi_pixels("POLYGON((10 10, 11 10, 11 11, 10 11, 10 10))",
                   AffineSensorModel((1, 0, 0, 0, -1, 0), CRS.from_epsg(4326).to_wkt()), 100, 100, "x")
