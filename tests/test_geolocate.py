"""Geolocation through the affine transform, checked against rasterio and pyproj."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from pyproj import CRS, Transformer
from rasterio.transform import from_origin

from pipeline.detections import Detections
from pipeline.geolocate import to_features
from pipeline.reading import describe
from pipeline.sensor_models import AffineSensorModel, PixelSensorModel, sensor_model
from tests.conftest import shared_file

CRS_4326 = CRS.from_epsg(4326)
BOXES = np.array([[0, 0, 10, 10], [100.5, 20, 130, 61], [700, 650, 718, 718]], dtype=float)


def _check_against_rasterio(path, boxes: np.ndarray) -> None:
    info = describe(str(path))
    model = sensor_model(info)
    assert isinstance(model, AffineSensorModel)
    dets = Detections(boxes, np.ones(len(boxes)), ["x"] * len(boxes))
    features = to_features(dets, model, image_url=str(path), job_id="j")
    with rasterio.open(path) as src:
        to_lonlat = Transformer.from_crs(src.crs, "EPSG:4326", always_xy=True)
        for k, (x0, y0, x1, y1) in enumerate(boxes):
            # rasterio's xy takes (row, col) and offset="ul" means the pixel's corner, as here
            mx, my = rasterio.transform.xy(src.transform, [y0, y1], [x0, x1], offset="ul")
            lon, lat = to_lonlat.transform(mx, my)
            assert len(lon) == 2
            cx, cy = rasterio.transform.xy(src.transform, [(y0 + y1) / 2], [(x0 + x1) / 2], offset="ul")
            clon, clat = to_lonlat.transform(cx[0], cy[0])
            assert features["center_longitude"].iloc[k] == pytest.approx(clon, abs=1e-10)
            assert features["center_latitude"].iloc[k] == pytest.approx(clat, abs=1e-10)
            corner_lons, corner_lats = to_lonlat.transform(
                [mx[0], mx[1], mx[1], mx[0]], [my[0], my[0], my[1], my[1]]
            )
            ring = np.array(features.geometry.iloc[k].exterior.coords)[:-1]
            expected = np.stack([corner_lons, corner_lats], axis=1)
            # same corners (orientation may start elsewhere after making the ring CCW)
            assert sorted(map(tuple, np.round(ring, 9))) == sorted(map(tuple, np.round(expected, 9)))
            assert features.geometry.iloc[k].exterior.is_ccw


def test_utm_landsat_sample() -> None:
    _check_against_rasterio(shared_file("geotiff/rasterio_RGB.byte.tif"), BOXES)


def test_utm_neon_sample() -> None:
    _check_against_rasterio(shared_file("geotiff/neon_OSBS_029.tif"), BOXES[:2])


def test_utm_generated(tmp_path) -> None:
    path = tmp_path / "utm.tif"
    with rasterio.open(path, "w", driver="GTiff", width=800, height=800, count=1, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 5500000, 2.0, 2.0)) as dst:
        dst.write(np.zeros((1, 800, 800), dtype=np.uint8))
    _check_against_rasterio(path, BOXES)


def test_epsg4326_is_not_reprojected(tmp_path) -> None:
    path = tmp_path / "geo.tif"
    transform = from_origin(8.0, 50.0, 0.001, 0.001)
    with rasterio.open(path, "w", driver="GTiff", width=720, height=720, count=1, dtype="uint8",
                       crs="EPSG:4326", transform=transform) as dst:
        dst.write(np.zeros((1, 720, 720), dtype=np.uint8))
    _check_against_rasterio(path, BOXES)
    model = sensor_model(describe(str(path)))
    lon, lat = model.pixel_to_lonlat(np.array([0.0, 10.0]), np.array([0.0, 20.0]))
    assert lon.tolist() == pytest.approx([8.0, 8.01]) and lat.tolist() == pytest.approx([50.0, 49.98])


def test_pixel_space_without_georeferencing() -> None:
    dets = Detections(BOXES[:1], [0.5], ["x"])
    features = to_features(dets, PixelSensorModel(), image_url="a.png", job_id="j",
                           feature_properties={"team": "t"})
    assert features.crs is None
    assert features.geometry.iloc[0].bounds == (0.0, 0.0, 10.0, 10.0)
    assert np.isnan(features["center_longitude"].iloc[0])
    assert features["team"].iloc[0] == "t"
    assert features["imageBBox"].iloc[0] == [0.0, 0.0, 10.0, 10.0]
    assert features["featureClasses"].iloc[0] == [{"iri": "x", "score": 0.5}]


def test_boxes_across_the_antimeridian_are_split() -> None:
    # 0.01° pixels from 179.5°E: pixel column 50 lies on the antimeridian.
    model = AffineSensorModel((0.01, 0.0, 179.5, 0.0, -0.01, 10.0), CRS_4326.to_wkt())
    boxes = np.array([[40, 0, 60, 10], [0, 0, 10, 10], [60, 0, 70, 10]], dtype=float)
    features = to_features(Detections(boxes, np.ones(3), ["x"] * 3), model, image_url="a", job_id="j")
    crossing, west, east = features.geometry
    assert crossing.geom_type == "MultiPolygon" and crossing.is_valid
    parts = sorted(crossing.geoms, key=lambda p: p.bounds[0])
    assert parts[0].bounds == pytest.approx((-180.0, 9.9, -179.9, 10.0))
    assert parts[1].bounds == pytest.approx((179.9, 9.9, 180.0, 10.0))
    assert crossing.area == pytest.approx(0.2 * 0.1)  # nothing lost by the cut
    assert all(part.exterior.is_ccw for part in parts)
    assert west.geom_type == east.geom_type == "Polygon"
    assert west.bounds == pytest.approx((179.5, 9.9, 179.6, 10.0))
    assert east.bounds == pytest.approx((-179.9, 9.9, -179.8, 10.0))
    assert features["center_longitude"].iloc[0] == pytest.approx(-180.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_feature_properties_are_plain_python_values_and_ids_are_stable(dtype) -> None:
    import gc
    import hashlib

    boxes = np.array([[10.5, 20.25, 30.0, 40.75], [0.0, 0.0, 7.1, 9.9]], dtype=dtype)
    scores = np.array([0.5, 0.25], dtype=np.float32)
    detections = Detections(boxes, scores, np.array(["car", 7], dtype=object))
    transform = tuple(from_origin(10.0, 50.0, 1e-5, 1e-5))[:6]
    model = AffineSensorModel(transform, CRS.from_epsg(4326).to_wkt())
    gc.disable()
    try:
        features = to_features(detections, model, image_url="s3://b/k.tif", job_id="j")
        assert not gc.isenabled(), "a collector that was off stays off"
    finally:
        gc.enable()
    to_features(detections, model, image_url="s3://b/k.tif", job_id="j")
    assert gc.isenabled()
    row = [float(v) for v in boxes[1]]  # the id scheme: sha1 of url | box as floats | class
    assert features["id"][1] == hashlib.sha1(f"s3://b/k.tif|{row}|7".encode()).hexdigest()[:20]
    assert features["imageBBox"][1] == row and all(type(v) is float for v in features["imageBBox"][1])
    assert features["featureClasses"][0] == [{"iri": "car", "score": 0.5}]
    assert features["featureClasses"][1] == [{"iri": "7", "score": 0.25}]
    assert features["imageGeometry"][0]["coordinates"][0][:2] == [[10.5, 20.25], [30.0, 20.25]]
    assert list(features.columns[:8]) == [
        "id", "imageBBox", "imageGeometry", "featureClasses",
        "center_longitude", "center_latitude", "inferenceMetadata", "image_url",
    ]
