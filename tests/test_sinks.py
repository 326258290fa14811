"""GeoJSON from in-memory features and from GeoParquet parts (the streaming path)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
from pyproj import CRS

from pipeline.detections import Detections
from pipeline.geolocate import to_features
from pipeline.sensor_models import AffineSensorModel, PixelSensorModel
from pipeline.sinks import write_geojson, write_parquet


def _features(n: int, seed: int, georeferenced: bool = True) -> gpd.GeoDataFrame:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 900, size=(n, 2))
    boxes = np.hstack([xy, xy + rng.uniform(3, 40, size=(n, 2))])
    classes = rng.choice(np.array(["car", "ship"], dtype=object), n)
    detections = Detections(boxes, rng.uniform(0, 1, n), classes)
    if georeferenced:
        model = AffineSensorModel((1e-5, 0.0, 10.0, 0.0, -1e-5, 50.0), CRS.from_epsg(4326).to_wkt())
    else:
        model = PixelSensorModel()
    return to_features(detections, model, image_url=f"s3://b/{seed}.tif", job_id="j",
                       feature_properties={"mission": {"name": "m1", "pass": seed}})


def test_parts_write_the_same_geojson_as_the_frames(tmp_path: Path) -> None:
    frames = [_features(300, 1), _features(0, 2), _features(120, 3)]
    parts = []
    for k, frame in enumerate(frames):
        write_parquet(frame, tmp_path / f"p{k}.parquet")  # with its bbox covering column
        parts.append(tmp_path / f"p{k}.parquet")
    write_geojson(frames, tmp_path / "frames.geojson")
    write_geojson(parts, tmp_path / "parts.geojson")
    text = (tmp_path / "parts.geojson").read_bytes()
    assert text == (tmp_path / "frames.geojson").read_bytes()
    collection = json.loads(text)
    assert len(collection["features"]) == 420
    first = collection["features"][0]
    assert first["id"] == frames[0]["id"][0] and "bbox" not in first["properties"]
    assert first["properties"]["mission"] == {"name": "m1", "pass": 1}
    assert first["properties"]["imageBBox"] == frames[0]["imageBBox"][0]
    ring = shapely.geometry.shape(first["geometry"]).exterior
    assert ring.is_ccw  # RFC 7946: exterior rings counter-clockwise


def test_pixel_features_write_null_centres(tmp_path: Path) -> None:
    frame = _features(5, 4, georeferenced=False)
    assert frame["center_longitude"].isna().all()
    write_parquet(frame, tmp_path / "p.parquet")
    write_geojson([tmp_path / "p.parquet"], tmp_path / "out.geojson")
    features = json.loads((tmp_path / "out.geojson").read_text())["features"]
    assert [f["properties"]["center_longitude"] for f in features] == [None] * 5
    assert pd.isna(frame["center_latitude"]).all()


# a pixel polygon with a hole (fractional vertices, a rasterio-like stair on the shell) and a
# plain one; the affine by hand: lon = 10 + 1e-4·x + 2e-5·y, lat = 50 + 1e-5·x − 1e-4·y
AFFINE = (1e-4, 2e-5, 10.0, 1e-5, -1e-4, 50.0)
SHELL = [[10.0, 10.0], [60.5, 10.0], [60.5, 30.0], [80.33333333333333, 30.0], [80.33333333333333, 70.0],
         [10.0, 70.0], [10.0, 10.0]]
HOLE = [[20.0, 20.0], [20.0, 40.123456789], [40.0, 40.123456789], [40.0, 20.0], [20.0, 20.0]]
PLAIN = [[100.0, 100.0], [100.0, 131.0], [117.0, 131.0], [117.0, 100.0], [100.0, 100.0]]


def _by_hand(ring: list[list[float]]) -> np.ndarray:
    xy = np.asarray(ring, dtype=np.float64)
    a, b, c, d, e, f = AFFINE
    return np.column_stack([a * xy[:, 0] + b * xy[:, 1] + c, d * xy[:, 0] + e * xy[:, 1] + f])


def _ccw(ring: np.ndarray) -> bool:
    x, y = ring[:, 0], ring[:, 1]
    return float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1])) > 0


def _oriented(ring: np.ndarray, ccw: bool) -> np.ndarray:
    """RFC 7946's winding: the ring reversed (same first vertex) where it winds the other way."""
    return ring if _ccw(ring) == ccw else ring[::-1]


def test_shape_geometries_and_batches_write_the_same_files(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A frame whose shaped rows hold shapely geometries (``shape_geometries``, a segmentation
    job's) writes the bytes of the frame holding GeoJSON dicts, in every form, also one row per
    batch; its GeoParquet holds the same table."""
    from pipeline import sinks

    shapes = [shapely.Polygon(SHELL, [HOLE]), shapely.Polygon(PLAIN), None]
    boxes = [shapely.bounds(s).tolist() if s is not None else [200.0, 200.0, 210.0, 220.0] for s in shapes]
    detections = Detections(boxes, [0.9, 0.8, 0.7], ["field", "roof", "car"], shapes)
    model = AffineSensorModel(AFFINE, CRS.from_epsg(4326).to_wkt())
    when = datetime(2026, 1, 2, tzinfo=UTC)
    dicts = to_features(detections, model, image_url="s3://b/i.tif", job_id="j", inference_time=when)
    geometries = to_features(detections, model, image_url="s3://b/i.tif", job_id="j", inference_time=when,
                             shape_geometries=True)
    assert geometries["imageGeometry"][0].equals(shapely.Polygon(SHELL, [HOLE]))
    for form in ("RFC7946", "OSML"):
        write_geojson(dicts, tmp_path / f"dicts.{form}.geojson", form=form)
        write_geojson(geometries, tmp_path / f"geometries.{form}.geojson", form=form)
        with monkeypatch.context() as patched:
            patched.setattr(sinks, "PART_BATCH_ROWS", 1)
            write_geojson(geometries, tmp_path / f"batched.{form}.geojson", form=form)
        expected = (tmp_path / f"dicts.{form}.geojson").read_bytes()
        assert (tmp_path / f"geometries.{form}.geojson").read_bytes() == expected
        assert (tmp_path / f"batched.{form}.geojson").read_bytes() == expected
    write_parquet(dicts, tmp_path / "dicts.parquet")
    write_parquet(geometries, tmp_path / "geometries.parquet")
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "geometries.parquet").equals(pq.read_table(tmp_path / "dicts.parquet"))


def test_shaped_features_keep_their_polygons_through_every_output(tmp_path: Path) -> None:
    shapes = [shapely.Polygon(SHELL, [HOLE]), shapely.Polygon(PLAIN), None]
    boxes = [shapely.bounds(s).tolist() if s is not None else [200.0, 200.0, 210.0, 220.0] for s in shapes]
    detections = Detections(boxes, [0.9, 0.8, 0.7], ["field", "roof", "car"], shapes)
    model = AffineSensorModel(AFFINE, CRS.from_epsg(4326).to_wkt())
    frame = to_features(detections, model, image_url="s3://b/i.tif", job_id="j")
    assert frame["imageGeometry"][0] == {"type": "Polygon", "coordinates": [SHELL, HOLE]}
    assert frame["imageGeometry"][1] == {"type": "Polygon", "coordinates": [PLAIN]}

    # GeoParquet: imageGeometry as pixel geometries, geometry through the affine, CCW shells
    write_parquet(frame, tmp_path / "f.parquet")
    back = gpd.read_parquet(tmp_path / "f.parquet")
    holed, plain = back["imageGeometry"][0], back["imageGeometry"][1]
    assert shapely.get_coordinates(holed.exterior).tolist() == SHELL
    assert [shapely.get_coordinates(r).tolist() for r in holed.interiors] == [HOLE]
    assert shapely.get_coordinates(plain.exterior).tolist() == PLAIN
    assert back["imageGeometry"][2].equals(shapely.box(200.0, 200.0, 210.0, 220.0))
    ground = back.geometry[0]
    np.testing.assert_allclose(shapely.get_coordinates(ground.exterior), _oriented(_by_hand(SHELL), True),
                               rtol=0, atol=1e-12)
    assert len(ground.interiors) == 1
    np.testing.assert_allclose(shapely.get_coordinates(ground.interiors[0]), _oriented(_by_hand(HOLE), False),
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(shapely.get_coordinates(back.geometry[1].exterior),
                               _oriented(_by_hand(PLAIN), True), rtol=0, atol=1e-12)

    # RFC 7946 GeoJSON (from the frame and from the part alike)
    write_geojson(frame, tmp_path / "f.geojson")
    write_geojson([tmp_path / "f.parquet"], tmp_path / "part.geojson")
    assert (tmp_path / "part.geojson").read_bytes() == (tmp_path / "f.geojson").read_bytes()
    with open(tmp_path / "f.geojson", encoding="utf-8") as f:
        features = json.load(f)["features"]
    assert features[0]["properties"]["imageGeometry"] == {"type": "Polygon", "coordinates": [SHELL, HOLE]}
    assert features[1]["properties"]["imageGeometry"] == {"type": "Polygon", "coordinates": [PLAIN]}
    shell, hole = (np.asarray(r) for r in features[0]["geometry"]["coordinates"])
    np.testing.assert_allclose(shell, _oriented(_by_hand(SHELL), True), rtol=0, atol=1e-12)
    np.testing.assert_allclose(hole, _oriented(_by_hand(HOLE), False), rtol=0, atol=1e-12)
    assert features[1]["properties"]["featureClasses"] == [{"iri": "roof", "score": 0.8}]

    # OSML's form: vertices in the model's order, [lon, lat, 0] rounded to 6 decimals
    write_geojson(frame, tmp_path / "osml.geojson", form="OSML")
    with open(tmp_path / "osml.geojson", encoding="utf-8") as f:
        osml = json.load(f)["features"]
    rounded = [[[round(v, 6) for v in position] for position in ring] for ring in (SHELL, HOLE)]
    assert osml[0]["properties"]["imageGeometry"] == {"type": "Polygon", "coordinates": rounded}
    for ring, given in zip(osml[0]["geometry"]["coordinates"], (SHELL, HOLE), strict=True):
        ring = np.asarray(ring)
        expected = np.column_stack([_by_hand(given), np.zeros(len(given))])
        np.testing.assert_allclose(ring, expected, rtol=0, atol=5e-7 + 1e-12)  # a tie may go either way
        np.testing.assert_allclose(ring * 1e6, np.round(ring * 1e6), rtol=0, atol=1e-6)
