"""Pixel detections → a GeoDataFrame of lon/lat features (vectorised, shapely 2).

Each feature's geometry is its detection's shape through the image's sensor model (EPSG:4326,
x = lon), vertex by vertex: the model's own geometry (Point, LineString, Polygon, ...) where it
gave one, else the box as a polygon. The properties follow OSML Model Runner: ``imageBBox``,
``imageGeometry``, ``featureClasses`` (all of the model's classes), ``center_longitude``/
``center_latitude`` (the centroid of the model's geometry, else the box centre),
``inferenceMetadata``, ``image_url``, the model's other properties (``modelProperties``, JSON
text) and the request's ``featureProperties`` merged in.

The frame is the one stored form that both output forms are written from
(:mod:`pipeline.sinks`): ``geometry`` is RFC 7946 (counter-clockwise, cut at the antimeridian);
the internal columns (``_`` names) keep what OSML's form needs: ``_ground`` (the shape
geolocated with its vertices in their own order and start, a box as OSML's ring NE, SE, SW,
NW; 3-D, at :func:`ground_height`), ``_bbox`` (the ground bounds of the ``imageBBox``
corners, clamped to OSML's grid where they lie outside it: OSML's feature ``bbox``; None where
the model gave no ``imageBBox``) and ``_shape`` (``imageGeometry`` is the model's own).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import geopandas as gpd
import numpy as np
import shapely

from pipeline import antimeridian
from pipeline.bulk import no_cyclic_gc
from pipeline.detections import Detections
from pipeline.redact import public_url
from pipeline.sensor_models import WGS84, SensorModel
from pipeline.sinks import _json_default, geojson_dicts

# Box corners in the order NW, NE, SE, SW (pixel frame), closed.
_CORNERS = np.array([[0, 1], [2, 1], [2, 3], [0, 3], [0, 1]])
#: the same ring as OSML writes a box (shapely's ``box``): NE, SE, SW, NW, closed
OSML_RING = [1, 2, 3, 0, 1]
#: internal columns (not feature properties): see the module's docstring
INTERNAL_COLUMNS = ("_ground", "_bbox", "_shape")

FEATURE_COLUMNS = (
    "id",
    "imageBBox",
    "imageGeometry",
    "featureClasses",
    "center_longitude",
    "center_latitude",
    "inferenceMetadata",
    "image_url",
    "modelProperties",
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


def rfc7946(geometry: np.ndarray) -> np.ndarray:
    """Lon/lat geometries of any type as RFC 7946 writes them: polygons counter-clockwise,
    those that cross the antimeridian (a jump of more than 180° in longitude) cut there."""
    out = np.asarray(shapely.orient_polygons(geometry), dtype=object)
    if not len(out):
        return out
    xmin, _, xmax, _ = shapely.bounds(geometry).T
    for k in np.flatnonzero(xmax - xmin > 180.0):
        out[k] = _cut(geometry[k])
    return out


def _cut(geometry: Any) -> Any:
    """One geometry with wrapped longitudes, cut at the antimeridian (lines and polygons). It
    lies near ±180°, so its western longitudes are moved one turn east (the same vertex the
    same way: rings stay closed)."""
    unwrapped = shapely.transform(
        geometry, lambda xy: np.column_stack([np.where(xy[:, 0] < 0, xy[:, 0] + 360.0, xy[:, 0]), xy[:, 1]]))
    if shapely.get_dimensions(unwrapped) == 2:
        return antimeridian.split(unwrapped)
    if shapely.get_dimensions(unwrapped) != 1:
        return geometry
    lines = []
    for shift, window in zip(antimeridian._SHIFTS, antimeridian._WINDOWS, strict=True):
        part = shapely.get_parts(shapely.intersection(unwrapped, window))
        lines += [shapely.transform(p, lambda xy, s=shift: xy + [s, 0.0]) for p in part
                  if isinstance(p, shapely.LineString) and not p.is_empty]
    return lines[0] if len(lines) == 1 else shapely.MultiLineString(lines) if lines else geometry


def ground_height(model: SensorModel) -> float:
    """The height (metres) that OSML gives geolocated positions: an RPC's constant height (its
    ``HEIGHT_OFF`` unless the request set one), else 0 (an affine geotransform has none; a DEM's
    heights are not known here)."""
    if model.kind == "RPC" and not getattr(model, "dem", None):
        return float(getattr(model, "effective_height", 0.0))
    return 0.0


def _through(model: SensorModel) -> Callable[[np.ndarray], np.ndarray]:
    """A shapely ``transform`` function: pixel ``(x, y)`` rows → lon/lat rows."""
    def to_ground(xy: np.ndarray) -> np.ndarray:
        return np.column_stack(model.pixel_to_lonlat(xy[:, 0], xy[:, 1]))
    return to_ground


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
    shape_geometries: bool = False,
) -> gpd.GeoDataFrame:
    """The features of one image's detections (boxes in full-image pixels).

    ``shape_geometries``: a shaped row's ``imageGeometry`` is its shapely geometry (pixels)
    rather than a GeoJSON dict, as a GeoParquet part holds it (the writers take either): for
    segmentation polygons of ~80 vertices a dict of nested lists took ~15 KB a polygon, 0.4 GiB
    of client memory for 25,000 polygons."""
    image_url = public_url(image_url)  # ids and image_url never carry a signature or password
    n = len(detections)
    rings = box_rings(detections.boxes)
    lon, lat = model.pixel_to_lonlat(rings[..., 0].ravel(), rings[..., 1].ravel())
    ground = np.stack([lon, lat], axis=-1).reshape(n, 5, 2)
    geometry = ground_polygons(ground)
    raw = shapely.polygons(ground[:, OSML_RING]) if n else np.empty(0, dtype=object)
    cx, cy = detections.centers
    shaped = detections.shaped
    shapes = detections.shapes[shaped]
    if len(shapes):
        raw[shaped] = shapely.transform(shapes, _through(model))
        geometry[shaped] = rfc7946(raw[shaped])
        centroids = shapely.centroid(shapes)
        cx, cy = cx.copy(), cy.copy()
        cx[shaped], cy[shaped] = shapely.get_x(centroids), shapely.get_y(centroids)
    center_lon, center_lat = model.pixel_to_lonlat(cx, cy)
    when = (inference_time or datetime.now(UTC)).isoformat()
    with no_cyclic_gc():
        columns = _columns(detections, rings, shapes, image_url, job_id, when,
                           set(feature_properties or {}) | set(extra_columns or {}), shape_geometries)
    columns["center_longitude"] = center_lon if model.georeferenced else np.full(n, np.nan)
    columns["center_latitude"] = center_lat if model.georeferenced else np.full(n, np.nan)
    columns = {name: columns[name] for name in FEATURE_COLUMNS}  # the documented column order
    for key, value in (extra_columns or {}).items():
        columns[key] = [value] * n
    for key, value in (feature_properties or {}).items():
        columns[key] = [value] * n
    crs = WGS84 if model.georeferenced else None  # a CRS object: no parse per frame
    bbox_given = np.array([(e or {}).get("bbox", True) for e in detections.extras], dtype=bool)
    if model.georeferenced:
        corners = ground[:, :4]
        clamped = [k for k, e in enumerate(detections.extras) if e is not None and e.get("clamp")]
        if clamped:  # OSML geolocates these boxes' corners clamped to its grid
            boxes = detections.boxes[clamped] + np.array([e["clamp"] for e in detections.extras[clamped]])
            inner = box_rings(boxes)[:, :4]
            lon, lat = model.pixel_to_lonlat(inner[..., 0].ravel(), inner[..., 1].ravel())
            corners = corners.copy()
            corners[clamped] = np.stack([lon, lat], axis=-1).reshape(len(clamped), 4, 2)
        spans = np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1).tolist()
        columns["_ground"] = gpd.GeoSeries(shapely.force_3d(raw, ground_height(model)), crs=crs)
        columns["_bbox"] = [box if given else None for box, given in zip(spans, bbox_given, strict=True)]
    else:
        columns["_ground"] = gpd.GeoSeries([None] * n, crs=crs)
        columns["_bbox"] = [None] * n
    columns["_shape"] = shaped
    return gpd.GeoDataFrame(columns, geometry=gpd.GeoSeries(geometry, crs=crs), crs=crs)


def _columns(detections: Detections, rings: np.ndarray, shapes: np.ndarray, image_url: str,
             job_id: str, when: str, taken: set[str], shape_geometries: bool = False) -> dict[str, Any]:
    """The feature columns held as Python values (ids, boxes, pixel rings or the model's
    shapes, classes, the model's other properties as JSON text, ...)."""
    n = len(detections)
    # nested Python values, built from one ``tolist`` per array (not one per row)
    boxes = np.asarray(detections.boxes, dtype=np.float64).tolist()
    classes, scores = detections.classes.tolist(), np.asarray(detections.scores, dtype=np.float64).tolist()
    ids = feature_ids(image_url, boxes, classes)
    geometries: list[Any] = [{"type": "Polygon", "coordinates": [ring]} for ring in rings.tolist()]
    feature_classes: list[Any] = [
        [{"iri": str(cls), "score": score}] for cls, score in zip(classes, scores, strict=True)
    ]
    properties: list[str | None] = [None] * n
    if len(shapes):
        rows = np.flatnonzero(detections.shaped).tolist()
        for k, geometry in zip(rows, shapes if shape_geometries else geojson_dicts(shapes), strict=True):
            geometries[k] = geometry
    taken = taken | set(FEATURE_COLUMNS)  # the model's properties never shadow ours
    for k, extra in enumerate(detections.extras):
        if extra is None:
            continue
        if extra.get("id") is not None:
            ids[k] = extra["id"]
        if extra.get("featureClasses") is not None:
            feature_classes[k] = extra["featureClasses"]
        others = {key: v for key, v in (extra.get("properties") or {}).items() if key not in taken}
        if others:
            properties[k] = json.dumps(others, default=_json_default)
    return {
        "id": ids,
        "imageBBox": boxes,
        "imageGeometry": geometries,
        "featureClasses": feature_classes,
        "inferenceMetadata": [{"jobId": job_id, "inferenceDT": when}] * n,
        "image_url": [image_url] * n,
        "modelProperties": properties,
    }


def empty_features(georeferenced: bool = True) -> gpd.GeoDataFrame:
    """A GeoDataFrame with the feature columns and no rows."""
    crs = WGS84 if georeferenced else None
    columns: dict[str, Any] = {name: [] for name in FEATURE_COLUMNS}
    columns.update(_ground=gpd.GeoSeries([], crs=crs), _bbox=[], _shape=np.zeros(0, dtype=bool))
    return gpd.GeoDataFrame(columns, geometry=gpd.GeoSeries([], crs=crs), crs=crs)
