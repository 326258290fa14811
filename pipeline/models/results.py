"""Parsing model responses: OSML GeoJSON FeatureCollections and TF Serving predictions.

A response that is not JSON, has the wrong keys, or holds NaN or out-of-tile coordinates raises
:class:`MalformedResponse` (a :class:`ModelError`): that tile fails, the job goes on.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import shapely

from pipeline.detections import Detections, model_extras, osml_clamps, parse_shape, shape_box
from pipeline.models.base import ModelError

#: boxes may reach this many pixels outside the tile (rounding, half-pixel conventions)
TOLERANCE = 1.0


class MalformedResponse(ModelError):
    """The endpoint answered, but not with something we can read."""


def _load(body: bytes | str | Any) -> Any:
    if isinstance(body, bytes | bytearray | str):
        try:
            return json.loads(body, parse_constant=lambda name: math.nan)
        except (ValueError, UnicodeDecodeError) as exc:
            raise MalformedResponse(f"malformed response: not JSON ({exc})") from None
    return body


#: properties that OSML replaces or removes: they are not the model's "other" properties
_CONSUMED = frozenset({
    "imageGeometry", "imageBBox", "featureClasses", "bounds_imcoords", "geom_imcoords",
    "detection_score", "feature_types", "adjusted_feature_types", "image_id", "inferenceTime",
    "center_longitude", "center_latitude", "inferenceMetadata",
})


def _shape(value: Any) -> Any:
    """A shapely geometry of an ``imageGeometry`` (tile pixels)."""
    if not isinstance(value, dict) or "coordinates" not in value:
        raise MalformedResponse("malformed response: imageGeometry has no coordinates")
    try:
        shape = parse_shape(value)
    except ValueError as exc:
        raise MalformedResponse(f"malformed response: imageGeometry is {exc}") from None
    if shape.is_empty:
        raise MalformedResponse("malformed response: imageGeometry is empty")
    return shape


def _feature_classes(props: dict[str, Any]) -> list[Any] | None:
    """The model's class list (legacy ``feature_types`` converted as OSML converts it)."""
    classes = props.get("featureClasses")
    if classes is None and isinstance(props.get("feature_types"), dict):
        classes = [{"iri": k, "score": v} for k, v in props["feature_types"].items()]
    if classes is not None and not isinstance(classes, list):
        raise MalformedResponse("malformed response: featureClasses must be [{iri, score}]")
    return classes


def _class_and_score(props: dict[str, Any], classes: list[Any] | None) -> tuple[str, float]:
    if not classes:
        return "object", float(props.get("detection_score", props.get("score", 1.0)))
    try:
        best = max(classes, key=lambda c: float(c.get("score", 0.0)))
        return str(best["iri"]), float(best.get("score", 1.0))
    except (TypeError, KeyError, ValueError, AttributeError):
        raise MalformedResponse("malformed response: featureClasses must be [{iri, score}]") from None


def parse_feature_collection(body: bytes | str | dict[str, Any], width: int, height: int) -> Detections:
    """Detections (tile pixels) from an OSML GeoJSON FeatureCollection response, kept whole:
    each feature's ``imageGeometry`` (any geometry type, vertices as given), all of its
    ``featureClasses``, its other properties and its ``id`` (see :mod:`pipeline.detections`).
    The box (for the merge) is ``imageBBox``, else ``bounds_imcoords``, else the geometry's
    bounds; the top class gives the class and score."""
    data = _load(body)
    if not isinstance(data, dict) or not isinstance(data.get("features"), list):
        raise MalformedResponse("malformed response: expected a FeatureCollection with 'features'")
    boxes, scores, classes, shapes, extras = [], [], [], [], []
    for feature in data["features"]:
        props = feature.get("properties") if isinstance(feature, dict) else None
        if not isinstance(props, dict):
            raise MalformedResponse("malformed response: a feature has no properties")
        shape = _shape(props["imageGeometry"]) if "imageGeometry" in props else None
        if shape is None and "imageBBox" not in props and "bounds_imcoords" in props:
            # OSML makes the legacy bounds its imageGeometry (a box) and drops them
            shape = _shape(_box_geometry(props["bounds_imcoords"]))
        box = props.get("imageBBox", props.get("bounds_imcoords"))
        if box is None:
            if shape is None:
                raise MalformedResponse(
                    "malformed response: a feature has neither imageGeometry, imageBBox nor bounds_imcoords"
                )
            box = shape_box(shape)
        boxes.append(box)
        shapes.append(shape)
        feature_classes = _feature_classes(props)
        name, score = _class_and_score(props, feature_classes)
        classes.append(name)
        scores.append(score)
        others = {k: v for k, v in props.items() if k not in _CONSUMED}
        extras.append((feature_classes, others, feature.get("id"), "imageBBox" in props))
    found = _checked(boxes, scores, classes, width, height)
    clamps = osml_clamps(found.boxes, shapes)
    kept = [model_extras(*extra, clamp=clamp) for extra, clamp in zip(extras, clamps, strict=True)]
    shaped = [k for k, s in enumerate(shapes) if s is not None]
    if shaped:
        bounds = shapely.bounds(np.asarray([shapes[k] for k in shaped], dtype=object))
        if not np.isfinite(bounds).all():
            raise MalformedResponse("malformed response: NaN or infinite coordinates in imageGeometry")
        _inside(bounds, width, height, "imageGeometry")
    return Detections(found.boxes, found.scores, found.classes, shapes, kept)


def _box_geometry(box: Any) -> dict[str, Any]:
    """A ``[xmin, ymin, xmax, ymax]`` box as OSML's polygon of it (shapely's ``box``: NE, SE,
    SW, NW in pixels)."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise MalformedResponse("malformed response: boxes must be 4 numbers each") from None
    return {"type": "Polygon", "coordinates": [box_ring(x0, y0, x1, y1)]}


def box_ring(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    """The closed ring of a box as OSML writes it: NE, SE, SW, NW (pixels, y down)."""
    return [[x1, y0], [x1, y1], [x0, y1], [x0, y0], [x1, y0]]


def _inside(array: np.ndarray, width: int, height: int, what: str = "box") -> None:
    x0, y0 = np.minimum(array[:, 0], array[:, 2]), np.minimum(array[:, 1], array[:, 3])
    x1, y1 = np.maximum(array[:, 0], array[:, 2]), np.maximum(array[:, 1], array[:, 3])
    outside = (x0 < -TOLERANCE) | (y0 < -TOLERANCE) | (x1 > width + TOLERANCE) | (y1 > height + TOLERANCE)
    if outside.any():
        bad = array[np.argmax(outside)].tolist()
        raise MalformedResponse(f"malformed response: {what} {bad} lies outside the {width}x{height} tile")


def _checked(boxes: Any, scores: Any, classes: Any, width: int, height: int) -> Detections:
    try:
        array = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        values = np.asarray(scores, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise MalformedResponse("malformed response: boxes must be 4 numbers each") from None
    if not (np.isfinite(array).all() and np.isfinite(values).all()):
        raise MalformedResponse("malformed response: NaN or infinite coordinates or scores")
    _inside(array, width, height)
    x0, y0 = np.minimum(array[:, 0], array[:, 2]), np.minimum(array[:, 1], array[:, 3])
    x1, y1 = np.maximum(array[:, 0], array[:, 2]), np.maximum(array[:, 1], array[:, 3])
    return Detections(np.stack([x0, y0, x1, y1], axis=1), values, np.asarray(classes, dtype=object))


def to_feature_collection(detections: Detections) -> dict[str, Any]:
    """The OSML response for ``detections`` (tile pixels): what ``serve-model`` answers. A
    box-only detection's ``imageGeometry`` is its box as OSML's models write it (NE, SE, SW,
    NW); a detection that keeps its model's answer gives it back (shape, classes, properties,
    id)."""
    features = []
    for (x0, y0, x1, y1), score, name, shape, extra in zip(
        detections.boxes.tolist(), detections.scores.tolist(), detections.classes,
        detections.shapes, detections.extras, strict=True,
    ):
        extra = extra or {}
        geometry = (json.loads(shapely.to_geojson(shape)) if shape is not None
                    else {"type": "Polygon", "coordinates": [box_ring(x0, y0, x1, y1)]})
        properties: dict[str, Any] = {"imageGeometry": geometry}
        if extra.get("bbox", True):
            properties["imageBBox"] = [x0, y0, x1, y1]
        properties["featureClasses"] = (extra.get("featureClasses")
                                        or [{"iri": str(name), "score": float(score)}])
        properties.update(extra.get("properties") or {})
        feature: dict[str, Any] = {"type": "Feature", "geometry": None, "properties": properties}
        if extra.get("id") is not None:
            feature["id"] = extra["id"]
        features.append(feature)
    return {"type": "FeatureCollection", "features": features}


def parse_tfserving(
    body: bytes | str | dict[str, Any],
    width: int,
    height: int,
    count: int,
    thresholds: dict[str, float] | None = None,
    class_names: dict[int, str] | None = None,
) -> list[Detections]:
    """One Detections per instance from a TF Serving ``predictions`` response.

    ``detection_boxes`` are normalised ``[y1, x1, y2, x2]``; a detection is kept when its score
    reaches its class's threshold (``thresholds[class]``, else ``thresholds["default"]``, else 0).
    """
    data = _load(body)
    predictions = data.get("predictions") if isinstance(data, dict) else None
    if not isinstance(predictions, list) or len(predictions) != count:
        raise MalformedResponse(f"malformed response: expected 'predictions' for {count} instances")
    thresholds = thresholds or {}
    default = float(thresholds.get("default", 0.0))
    out = []
    for prediction in predictions:
        try:
            boxes = np.asarray(prediction["detection_boxes"], dtype=np.float64).reshape(-1, 4)
            scores = np.asarray(prediction["detection_scores"], dtype=np.float64).reshape(-1)
            ids = np.asarray(prediction["detection_classes"], dtype=np.float64).reshape(-1)
        except (KeyError, TypeError, ValueError):
            raise MalformedResponse(
                "malformed response: each prediction needs detection_boxes, detection_scores "
                "and detection_classes"
            ) from None
        if not (len(boxes) == len(scores) == len(ids)) or not np.isfinite(ids).all():
            raise MalformedResponse("malformed response: detection arrays differ in length")
        names = np.asarray(
            [(class_names or {}).get(int(i), str(int(i))) for i in ids], dtype=object
        )
        limit = np.asarray([float(thresholds.get(n, default)) for n in names], dtype=np.float64)
        keep = scores >= limit
        pixels = boxes[keep][:, [1, 0, 3, 2]] * np.array([width, height, width, height])
        out.append(_checked(pixels, scores[keep], names[keep], width, height))
    return out
