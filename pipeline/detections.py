"""Detections as plain numpy columns, the value that flows from the model to the merge.

Pixel convention (used everywhere in this package): (col, row) = (x, y); the upper-left
corner of pixel (0, 0) is (0, 0), so a box ``[xmin, ymin, xmax, ymax]`` covers columns
``xmin .. xmax - 1`` and its centre is ``((xmin + xmax) / 2, (ymin + ymax) / 2)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Detections:
    """``n`` boxes with one score and one class name each, in some pixel frame."""

    boxes: np.ndarray = field(default_factory=lambda: np.empty((0, 4), dtype=np.float64))
    scores: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.float64))
    classes: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=object))

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

    def __len__(self) -> int:
        return len(self.scores)

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
        )

    @classmethod
    def coerce(cls, value: Any) -> Detections:
        """Accept what a model returns: Detections, ``{"boxes","scores","classes"}``, or None."""
        if value is None:
            return cls()
        if isinstance(value, Detections):
            return value
        if isinstance(value, dict):
            boxes = np.asarray(value.get("boxes", []), dtype=np.float64).reshape(-1, 4)
            n = len(boxes)
            scores = value.get("scores", np.ones(n))
            classes = value.get("classes", ["object"] * n)
            if isinstance(classes, str):
                classes = [classes] * n
            return cls(boxes, scores, np.asarray(list(classes), dtype=object))
        raise TypeError(f"a model returned {type(value).__name__}, expected Detections or dict")

    def select(self, mask: np.ndarray | Sequence[int]) -> Detections:
        return Detections(self.boxes[mask], self.scores[mask], self.classes[mask])

    def shifted(self, dx: float, dy: float) -> Detections:
        """The same boxes moved by ``(dx, dy)`` pixels."""
        return Detections(self.boxes + np.array([dx, dy, dx, dy]), self.scores, self.classes)

    def finite(self) -> Detections:
        """Only boxes with finite coordinates and scores and positive width and height."""
        ok = np.isfinite(self.boxes).all(axis=1) & np.isfinite(self.scores)
        ok &= (self.boxes[:, 2] > self.boxes[:, 0]) & (self.boxes[:, 3] > self.boxes[:, 1])
        return self if ok.all() else self.select(ok)

    @property
    def centers(self) -> tuple[np.ndarray, np.ndarray]:
        """Box centres ``(x, y)``."""
        return (
            (self.boxes[:, 0] + self.boxes[:, 2]) / 2.0,
            (self.boxes[:, 1] + self.boxes[:, 3]) / 2.0,
        )
