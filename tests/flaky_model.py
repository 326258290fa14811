"""A PYTHON model for tests: bright-objects, but tiles at ``x == fail_x`` raise."""

from __future__ import annotations

import numpy as np

from pipeline.models.builtin import bright_objects


def make(fail_x: int = -1):
    def model(tiles: np.ndarray, offsets: np.ndarray):
        if any(int(x) == fail_x for x, _ in offsets):
            raise RuntimeError(f"tile at x={fail_x} refused")
        return [bright_objects(tile) for tile in tiles]

    return model
