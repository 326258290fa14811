"""Models that ship with the package and run in the worker process.

``null`` (no detections: the I/O baseline), ``centerpoint`` (one box centred on each tile,
±10% of the tile size), ``flood`` (``count`` seeded random boxes per tile, for load tests) and
``bright-objects`` (a real detector with exact semantics, for tests that must know the truth).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import ndimage

from pipeline.detections import Detections
from pipeline.models.base import ModelAdapter, ModelError, ModelSpec

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def bright_objects(tile: np.ndarray, threshold: float = 200, min_area: int = 4) -> Detections:
    """Boxes around 8-connected components of pixels ``>= threshold``.

    The value is band 1 of a 1- or 2-band tile, or the mean of bands 1-3 otherwise. A component
    of at least ``min_area`` pixels gives its tight bounds (``xmax`` = last column + 1), class
    ``bright-object`` and score = mean component value / 255.
    """
    if tile.ndim == 3:
        value = tile[..., 0].astype(np.float64) if tile.shape[2] < 3 else tile[..., :3].mean(axis=2)
    else:
        value = tile.astype(np.float64)
    labels, count = ndimage.label(value >= threshold, structure=EIGHT_CONNECTED)
    if count == 0:
        return Detections()
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    sums = np.bincount(labels.ravel(), weights=value.ravel(), minlength=count + 1)[1:]
    slices = ndimage.find_objects(labels)
    boxes = np.array(
        [[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in slices], dtype=np.float64
    )
    keep = areas >= min_area
    scores = sums[keep] / areas[keep] / 255.0
    return Detections(boxes[keep], scores, np.full(int(keep.sum()), "bright-object", dtype=object))


def centerpoint(tile: np.ndarray) -> Detections:
    """One box centred on the tile, extending ±10% of the tile size (OSML's test model)."""
    height, width = tile.shape[:2]
    cx, cy = width / 2.0, height / 2.0
    box = [cx - 0.1 * width, cy - 0.1 * height, cx + 0.1 * width, cy + 0.1 * height]
    return Detections(np.array([box]), np.array([1.0]), np.array(["centerpoint"]))


def flood(tile: np.ndarray, offset: np.ndarray, count: int = 10, seed: int = 0,
          max_size: int = 32) -> Detections:
    """``count`` random boxes, seeded by ``seed`` and the tile's offset (deterministic)."""
    height, width = tile.shape[:2]
    rng = np.random.default_rng([seed, int(offset[0]), int(offset[1])])
    size = rng.uniform(2, max(3, max_size), size=(count, 2))
    x0 = rng.uniform(0, np.maximum(1, width - size[:, 0]))
    y0 = rng.uniform(0, np.maximum(1, height - size[:, 1]))
    boxes = np.stack([x0, y0, x0 + size[:, 0], y0 + size[:, 1]], axis=1)
    return Detections(boxes, rng.uniform(0.05, 1.0, count), np.full(count, "flood", dtype=object))


class BuiltinModel(ModelAdapter):
    tile_views = True  # each tile on its own

    """Runs one of the built-in per-tile functions over a batch."""

    def __init__(self, per_tile: Callable[[np.ndarray, np.ndarray], Detections]):
        self._per_tile = per_tile

    def predict(self, tiles: np.ndarray, offsets: np.ndarray) -> list[Detections | BaseException]:
        return [self._per_tile(tile, offset) for tile, offset in zip(tiles, offsets, strict=True)]


def _number(params: dict[str, Any], key: str, default: float) -> float:
    try:
        return float(params.get(key, default))
    except (TypeError, ValueError):
        raise ModelError(f"imageProcessorParameters.{key} must be a number") from None


BUILTIN_NAMES = ("null", "centerpoint", "flood", "bright-objects")


def validate(spec: ModelSpec) -> None:
    if spec.name.lower() not in BUILTIN_NAMES:
        raise ModelError(
            f"unknown BUILTIN model {spec.name!r} (expected {', '.join(BUILTIN_NAMES)})"
        )


def create(spec: ModelSpec) -> ModelAdapter:
    """The built-in model named by ``spec.name``."""
    params = spec.model_parameters
    name = spec.name.lower()
    if name == "null":
        return BuiltinModel(lambda tile, offset: Detections())
    if name == "centerpoint":
        return BuiltinModel(lambda tile, offset: centerpoint(tile))
    if name == "flood":
        count = int(_number(params, "count", 10))
        seed = int(_number(params, "seed", 0))
        max_size = int(_number(params, "maxSize", 32))
        return BuiltinModel(lambda tile, offset: flood(tile, offset, count, seed, max_size))
    if name == "bright-objects":
        threshold = _number(params, "threshold", 200)
        min_area = int(_number(params, "minArea", 4))
        return BuiltinModel(lambda tile, offset: bright_objects(tile, threshold, min_area))
    validate(spec)
    raise AssertionError("unreachable")
