"""Pixel detections → a GeoDataFrame of lon/lat features (vectorised, shapely 2).

Each feature's geometry is the box as a polygon through the image's sensor model (EPSG:4326,
x = lon). The properties follow OSML Model Runner: ``imageBBox``, ``imageGeometry``,
``featureClasses``, ``center_longitude``/``center_latitude``, ``inferenceMetadata``,
``image_url``, and the request's ``featureProperties`` merged in.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import geopandas as gpd
import numpy as np
import shapely

from pipeline import antimeridian
from pipeline.bulk import no_cyclic_gc
from pipeline.detections import Detections
from pipeline.io import SensorModel
from pipeline.redact import public_url

# Box corners in the order NW, NE, SE, SW (pixel frame), closed.
_CORNERS = np.array([[0, 1], [2, 1], [2, 3], [0, 3], [0, 1]])

FEATURE_COLUMNS = (
    "id",
    "imageBBox",
    "imageGeometry",
    "featureClasses",
    "center_longitude",
    "center_latitude",
    "inferenceMetadata",
    "image_url",
)


def box_rings(boxes: np.ndarray) -> np.ndarray:
    """``N × 5 × 2`` closed rings of the box corners, in pixels."""
    return boxes[:, _CORNERS.ravel()].reshape(len(boxes), 5, 2)


def ground_polygons(ground: np.ndarray) -> np.ndarray:
    """Counter-clockwise lon/lat polygons of ``N × 5 × 2`` rings; the few that cross the
    antimeridian are cut there into MultiPolygons (RFC 7946)."""
    if not len(ground):
        return np.empty(0, dtype=object)
    crossing = antimeridian.crosses(ground[..., 0])
    ground = ground.copy()
    ground[crossing, :, 0] = antimeridian.unwrap(ground[crossing, :, 0])
    geometry = shapely.orient_polygons(shapely.polygons(ground))
    geometry[crossing] = [antimeridian.split(polygon) for polygon in geometry[crossing]]
    return np.asarray(geometry)


def feature_ids(image_url: str, boxes: list[list[float]], classes: list[Any]) -> list[str]:
    """Deterministic feature ids: the same detection (pixel box as floats, class) of the same
    image gets the same id."""
    return [
        hashlib.sha1(f"{image_url}|{box}|{cls}".encode(), usedforsecurity=False).hexdigest()[:20]
        for box, cls in zip(boxes, classes, strict=True)
    ]


def to_features(
    detections: Detections,
    model: SensorModel,
    *,
    image_url: str,
    job_id: str,
    feature_properties: dict[str, Any] | None = None,
    extra_columns: dict[str, Any] | None = None,
    inference_time: datetime | None = None,
) -> gpd.GeoDataFrame:
    """The features of one image's detections (boxes in full-image pixels)."""
    image_url = public_url(image_url)  # ids and image_url never carry a signature or password
    n = len(detections)
    rings = box_rings(detections.boxes)
    lon, lat = model.pixel_to_lonlat(rings[..., 0].ravel(), rings[..., 1].ravel())
    ground = np.stack([lon, lat], axis=-1).reshape(n, 5, 2)
    geometry = ground_polygons(ground)
    cx, cy = detections.centers
    center_lon, center_lat = model.pixel_to_lonlat(cx, cy)
    when = (inference_time or datetime.now(UTC)).isoformat()
    with no_cyclic_gc():
        columns = _columns(detections, rings, image_url, job_id, when)
    columns["center_longitude"] = center_lon if model.georeferenced else np.full(n, np.nan)
    columns["center_latitude"] = center_lat if model.georeferenced else np.full(n, np.nan)
    columns = {name: columns[name] for name in FEATURE_COLUMNS}  # the documented column order
    for key, value in (extra_columns or {}).items():
        columns[key] = [value] * n
    for key, value in (feature_properties or {}).items():
        columns[key] = [value] * n
    crs = "EPSG:4326" if model.georeferenced else None
    return gpd.GeoDataFrame(columns, geometry=gpd.GeoSeries(geometry, crs=crs), crs=crs)


def _columns(detections: Detections, rings: np.ndarray, image_url: str, job_id: str,
             when: str) -> dict[str, Any]:
    """The feature columns held as Python values (ids, boxes, pixel rings, classes, ...)."""
    n = len(detections)
    # nested Python values, built from one ``tolist`` per array (not one per row)
    boxes = np.asarray(detections.boxes, dtype=np.float64).tolist()
    classes, scores = detections.classes.tolist(), np.asarray(detections.scores, dtype=np.float64).tolist()
    return {
        "id": feature_ids(image_url, boxes, classes),
        "imageBBox": boxes,
        "imageGeometry": [{"type": "Polygon", "coordinates": [ring]} for ring in rings.tolist()],
        "featureClasses": [
            [{"iri": str(cls), "score": score}] for cls, score in zip(classes, scores, strict=True)
        ],
        "inferenceMetadata": [{"jobId": job_id, "inferenceDT": when}] * n,
        "image_url": [image_url] * n,
    }


def empty_features(georeferenced: bool = True) -> gpd.GeoDataFrame:
    """A GeoDataFrame with the feature columns and no rows."""
    crs = "EPSG:4326" if georeferenced else None
    return gpd.GeoDataFrame(
        {name: [] for name in FEATURE_COLUMNS}, geometry=gpd.GeoSeries([], crs=crs), crs=crs
    )
