"""Parsing model responses: OSML GeoJSON FeatureCollections and TF Serving predictions.

A response that is not JSON, has the wrong keys, or holds NaN or out-of-tile coordinates raises
:class:`MalformedResponse` (a :class:`ModelError`): that tile fails, the job goes on.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from pipeline.detections import Detections
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


def _bounds(geometry: Any) -> list[float]:
    """``[xmin, ymin, xmax, ymax]`` of a GeoJSON geometry's coordinates (any nesting)."""
    if not isinstance(geometry, dict) or "coordinates" not in geometry:
        raise MalformedResponse("malformed response: imageGeometry has no coordinates")
    try:
        points = np.asarray(_flatten(geometry["coordinates"]), dtype=np.float64).reshape(-1, 2)
    except (TypeError, ValueError):
        raise MalformedResponse("malformed response: imageGeometry coordinates are not numbers") from None
    if not len(points):
        raise MalformedResponse("malformed response: imageGeometry is empty")
    xmin, ymin = points.min(axis=0)
    xmax, ymax = points.max(axis=0)
    if xmax == xmin or ymax == ymin:  # a point or a line: give it one pixel
        xmin, ymin, xmax, ymax = xmin - 0.5, ymin - 0.5, xmax + 0.5, ymax + 0.5
    return [float(xmin), float(ymin), float(xmax), float(ymax)]


def _flatten(coords: Any) -> list[Any]:
    if isinstance(coords, list | tuple) and coords and isinstance(coords[0], list | tuple):
        return [c for part in coords for c in _flatten(part)]
    return [coords]


def _class_and_score(props: dict[str, Any]) -> tuple[str, float]:
    classes = props.get("featureClasses")
    if classes is None and isinstance(props.get("feature_types"), dict):
        classes = [{"iri": k, "score": v} for k, v in props["feature_types"].items()]
    if not classes:
        return "object", float(props.get("detection_score", props.get("score", 1.0)))
    try:
        best = max(classes, key=lambda c: float(c.get("score", 0.0)))
        return str(best["iri"]), float(best.get("score", 1.0))
    except (TypeError, KeyError, ValueError, AttributeError):
        raise MalformedResponse("malformed response: featureClasses must be [{iri, score}]") from None


def parse_feature_collection(body: bytes | str | dict[str, Any], width: int, height: int) -> Detections:
    """Detections (tile pixels) from an OSML GeoJSON FeatureCollection response."""
    data = _load(body)
    if not isinstance(data, dict) or not isinstance(data.get("features"), list):
        raise MalformedResponse("malformed response: expected a FeatureCollection with 'features'")
    boxes, scores, classes = [], [], []
    for feature in data["features"]:
        props = feature.get("properties") if isinstance(feature, dict) else None
        if not isinstance(props, dict):
            raise MalformedResponse("malformed response: a feature has no properties")
        if "imageBBox" in props:
            box = props["imageBBox"]
        elif "bounds_imcoords" in props:
            box = props["bounds_imcoords"]
        elif "imageGeometry" in props:
            box = _bounds(props["imageGeometry"])
        else:
            raise MalformedResponse(
                "malformed response: a feature has neither imageGeometry, imageBBox nor bounds_imcoords"
            )
        boxes.append(box)
        name, score = _class_and_score(props)
        classes.append(name)
        scores.append(score)
    return _checked(boxes, scores, classes, width, height)


def _checked(boxes: Any, scores: Any, classes: Any, width: int, height: int) -> Detections:
    try:
        array = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        values = np.asarray(scores, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise MalformedResponse("malformed response: boxes must be 4 numbers each") from None
    if not (np.isfinite(array).all() and np.isfinite(values).all()):
        raise MalformedResponse("malformed response: NaN or infinite coordinates or scores")
    x0, y0 = np.minimum(array[:, 0], array[:, 2]), np.minimum(array[:, 1], array[:, 3])
    x1, y1 = np.maximum(array[:, 0], array[:, 2]), np.maximum(array[:, 1], array[:, 3])
    outside = (x0 < -TOLERANCE) | (y0 < -TOLERANCE) | (x1 > width + TOLERANCE) | (y1 > height + TOLERANCE)
    if outside.any():
        bad = array[np.argmax(outside)].tolist()
        raise MalformedResponse(f"malformed response: box {bad} lies outside the {width}x{height} tile")
    return Detections(np.stack([x0, y0, x1, y1], axis=1), values, np.asarray(classes, dtype=object))


def to_feature_collection(detections: Detections) -> dict[str, Any]:
    """The OSML response for ``detections`` (tile pixels): what ``serve-model`` answers."""
    features = [
        {
            "type": "Feature",
            "geometry": None,
            "properties": {
                "imageGeometry": {
                    "type": "Polygon",
                    "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]],
                },
                "imageBBox": [x0, y0, x1, y1],
                "featureClasses": [{"iri": str(name), "score": float(score)}],
            },
        }
        for (x0, y0, x1, y1), score, name in zip(
            detections.boxes.tolist(), detections.scores.tolist(), detections.classes, strict=True
        )
    ]
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
