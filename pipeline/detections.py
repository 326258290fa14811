"""Detections as plain numpy columns, the value that flows from the model to the merge.

Pixel convention (used everywhere in this package): (col, row) = (x, y); the upper-left
corner of pixel (0, 0) is (0, 0), so a box ``[xmin, ymin, xmax, ymax]`` covers columns
``xmin .. xmax - 1`` and its centre is ``((xmin + xmax) / 2, (ymin + ymax) / 2)``.

Besides its box, score and class, a detection may keep what its model said about it (the
*model answer*, kept whole as OSML keeps it): ``shapes`` holds the model's own geometry (a
shapely Point, LineString, Polygon, MultiPolygon, ... in the same pixel frame as the box, or
None for a box-only detection) and ``extras`` a dict (or None) with

- ``featureClasses``: the model's full class list, in its order (``[{"iri", "score", ...}]``);
- ``properties``: the model's other feature properties;
- ``id``: the model's feature id;
- ``bbox``: False when the model gave no ``imageBBox`` (the box is its shape's bounds);
- ``clamp``: how far OSML moves each side of the ``imageBBox`` in when it geolocates the box's
  corners (``[dx0, dy0, dx1, dy1]``, pixels; see :func:`osml_clamps`), where it does.

Merging compares boxes only; the shapes and extras travel with their boxes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import shapely


def _none(n: int) -> np.ndarray:
    return np.full(n, None, dtype=object)


def _objects(values: Any, n: int, name: str) -> np.ndarray:
    """A length-``n`` object array of ``values`` (None or empty: all None)."""
    if values is None or (hasattr(values, "__len__") and len(values) == 0 and n):
        return _none(n)
    out = _none(len(values))
    out[:] = list(values)
    if len(out) != n:
        raise ValueError(f"detections: {n} boxes, {len(out)} {name}")
    return out


def shape_box(shape: Any) -> list[float]:
    """``[xmin, ymin, xmax, ymax]`` of a shape; a point or a line gets one pixel of extent."""
    xmin, ymin, xmax, ymax = (float(v) for v in shapely.bounds(shape))
    if xmax == xmin or ymax == ymin:
        xmin, ymin, xmax, ymax = xmin - 0.5, ymin - 0.5, xmax + 0.5, ymax + 0.5
    return [xmin, ymin, xmax, ymax]


#: OSML geolocates a tile's features through a grid over their shapes' bounds and this margin
#: (pixels); box corners outside it are clamped to it (the grid's spline clamps its arguments)
OSML_GRID_MARGIN = 10.0


def osml_clamps(boxes: np.ndarray, shapes: Sequence[Any]) -> list[list[float] | None]:
    """Per detection of one model answer (one tile), the moves of its box's sides that OSML's
    geolocation makes: the grid spans the answer's shapes (a box where there is none) plus
    :data:`OSML_GRID_MARGIN`, and corners outside are clamped to it. None: no move."""
    if not len(boxes):
        return []
    extents = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    for k, shape in enumerate(shapes):
        if shape is not None:
            extents[k] = shapely.bounds(shape)
    low = extents[:, :2].min(axis=0) - OSML_GRID_MARGIN
    high = extents[:, 2:].max(axis=0) + OSML_GRID_MARGIN
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    moves = np.clip(boxes, np.tile(low, 2), np.tile(high, 2)) - boxes
    return [move if any(move) else None for move in moves.tolist()]


def model_extras(feature_classes: Any = None, properties: dict[str, Any] | None = None,
                 feature_id: Any = None, bbox: bool = True,
                 clamp: list[float] | None = None) -> dict[str, Any] | None:
    """The ``extras`` entry of one detection (None when the model said nothing beyond its box,
    score and class)."""
    extras: dict[str, Any] = {}
    if feature_classes is not None:
        extras["featureClasses"] = list(feature_classes)
    if properties:
        extras["properties"] = dict(properties)
    if feature_id is not None:
        extras["id"] = feature_id if isinstance(feature_id, int | str) else str(feature_id)
    if not bbox:
        extras["bbox"] = False
    elif clamp is not None:
        extras["clamp"] = clamp
    return extras or None


@dataclass(frozen=True)
class Detections:
    """``n`` boxes with one score and one class name each, in some pixel frame, and what their
    model said about them (``shapes``, ``extras``; see the module's docstring)."""

    boxes: np.ndarray = field(default_factory=lambda: np.empty((0, 4), dtype=np.float64))
    scores: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.float64))
    classes: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=object))
    #: object arrays after construction (any sequence, or None for all None, is accepted)
    shapes: Any = None
    extras: Any = None

    def __post_init__(self) -> None:
        boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        classes = np.asarray(self.classes, dtype=object).reshape(-1)
        if not (len(boxes) == len(scores) == len(classes)):
            raise ValueError(
                f"detections: {len(boxes)} boxes, {len(scores)} scores, {len(classes)} classes"
            )
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "shapes", _objects(self.shapes, len(boxes), "shapes"))
        object.__setattr__(self, "extras", _objects(self.extras, len(boxes), "extras"))

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def shaped(self) -> np.ndarray:
        """Which detections carry a model shape."""
        return np.fromiter((s is not None for s in self.shapes), dtype=bool, count=len(self))

    @classmethod
    def empty(cls) -> Detections:
        return cls()

    @classmethod
    def concat(cls, parts: Iterable[Detections]) -> Detections:
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls()
        return cls(
            np.concatenate([p.boxes for p in parts]),
            np.concatenate([p.scores for p in parts]),
            np.concatenate([p.classes for p in parts]),
            np.concatenate([p.shapes for p in parts]),
            np.concatenate([p.extras for p in parts]),
        )

    @classmethod
    def coerce(cls, value: Any) -> Detections:
        """Accept what a model returns: Detections, a dict, or None.

        The dict has ``boxes`` (``n × 4``), ``scores`` and ``classes`` (one name, or one per
        box), and may keep more of the answer, one entry per detection: ``geometries``
        (GeoJSON geometry dicts or shapely geometries in tile pixels, or None; without
        ``boxes`` the boxes are their bounds), ``featureClasses`` (each a list of
        ``{"iri", "score", ...}``), ``properties`` (dicts) and ``ids``.
        """
        if value is None:
            return cls()
        if isinstance(value, Detections):
            return value
        if isinstance(value, dict):
            shapes = value.get("geometries")
            given = value.get("boxes")
            if shapes is not None:
                shapes = [parse_shape(s) for s in shapes]
                given = [None] * len(shapes) if given is None else list(given)
                derived = [b is None for b in given]  # a box left out: its shape's bounds
                given = [shape_box(s) if b is None and s is not None else b
                         for b, s in zip(given, shapes, strict=True)]
            boxes = np.asarray([] if given is None else given, dtype=np.float64).reshape(-1, 4)
            n = len(boxes)
            scores = value.get("scores", np.ones(n))
            classes = value.get("classes", ["object"] * n)
            if isinstance(classes, str):
                classes = [classes] * n
            extras = None
            if shapes is not None or any(value.get(k) is not None
                                         for k in ("featureClasses", "properties", "ids")):
                columns = [_objects(value.get(k), n, k) for k in ("featureClasses", "properties", "ids")]
                bbox = [not d for d in derived] if shapes is not None else [True] * n
                clamps = osml_clamps(boxes, shapes if shapes is not None else [None] * n)
                extras = [model_extras(c, p, i, b, m)
                          for c, p, i, b, m in zip(*columns, bbox, clamps, strict=True)]
            return cls(boxes, scores, np.asarray(list(classes), dtype=object), shapes, extras)
        raise TypeError(f"a model returned {type(value).__name__}, expected Detections or dict")

    def select(self, mask: np.ndarray | Sequence[int]) -> Detections:
        return Detections(self.boxes[mask], self.scores[mask], self.classes[mask],
                          self.shapes[mask], self.extras[mask])

    def shifted(self, dx: float, dy: float) -> Detections:
        """The same boxes (and shapes) moved by ``(dx, dy)`` pixels."""
        shapes = self.shapes
        if len(shapes) and self.shaped.any():
            shapes = shapely.transform(shapes, lambda xy: xy + np.array([dx, dy]))
        return Detections(self.boxes + np.array([dx, dy, dx, dy]), self.scores, self.classes,
                          shapes, self.extras)

    def rescored(self, scores: np.ndarray) -> Detections:
        """The same detections with new scores (Soft-NMS). As OSML does, each detection's
        ``featureClasses`` entry of its class keeps the score it had as ``rawScore``."""
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        extras = _none(len(self))
        for k, (name, old, new, extra) in enumerate(
                zip(self.classes, self.scores.tolist(), scores.tolist(), self.extras, strict=True)):
            extra = dict(extra or {})
            classes = extra.get("featureClasses") or [{"iri": str(name), "score": old}]
            extra["featureClasses"] = [
                {**c, "rawScore": c.get("score"), "score": new} if c.get("iri") == str(name) else c
                for c in classes
            ]
            extras[k] = extra
        return Detections(self.boxes, scores, self.classes, self.shapes, extras)

    def finite(self) -> Detections:
        """Only boxes with finite coordinates and scores and positive width and height (and
        shapes with finite coordinates)."""
        ok = np.isfinite(self.boxes).all(axis=1) & np.isfinite(self.scores)
        ok &= (self.boxes[:, 2] > self.boxes[:, 0]) & (self.boxes[:, 3] > self.boxes[:, 1])
        if len(self) and self.shaped.any():
            coords, index = shapely.get_coordinates(self.shapes, return_index=True)
            ok[np.unique(index[~np.isfinite(coords).all(axis=1)])] = False
        return self if ok.all() else self.select(ok)

    @property
    def centers(self) -> tuple[np.ndarray, np.ndarray]:
        """Box centres ``(x, y)``."""
        return (
            (self.boxes[:, 0] + self.boxes[:, 2]) / 2.0,
            (self.boxes[:, 1] + self.boxes[:, 3]) / 2.0,
        )


def parse_shape(value: Any) -> Any:
    """A 2-D shapely geometry from a GeoJSON geometry dict or a shapely geometry (or None);
    ``ValueError`` names what is wrong."""
    if value is None or isinstance(value, shapely.Geometry):
        return None if value is None else shapely.force_2d(value)
    if not isinstance(value, dict) or "coordinates" not in value and "geometries" not in value:
        raise ValueError("a geometry must be a GeoJSON geometry object with coordinates")
    try:
        return shapely.force_2d(shapely.geometry.shape(value))
    except (TypeError, ValueError, AttributeError, IndexError, KeyError,
            shapely.errors.GEOSException) as exc:
        raise ValueError(f"not a valid {value.get('type')} geometry ({exc})") from None

