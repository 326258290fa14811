"""GeoJSON from in-memory features and from GeoParquet parts (the streaming path)."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
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
