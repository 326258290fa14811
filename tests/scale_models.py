"""PYTHON models for the scale, cluster and resume tests: bright-objects that log each call.

Every call appends one line per tile, ``<pid> <x> <y>``, to ``log`` (so tests can count model
calls and see which process made them), after sleeping ``delay`` seconds per tile.
"""

from __future__ import annotations

import os
import time

import numpy as np

from pipeline.models.builtin import bright_objects


def make(log: str, delay: float = 0.0):
    def model(tiles: np.ndarray, offsets: np.ndarray):
        time.sleep(delay * len(tiles))
        with open(log, "a", encoding="utf-8") as out:
            out.write("".join(f"{os.getpid()} {int(x)} {int(y)}\n" for x, y in offsets))
        return [bright_objects(tile) for tile in tiles]

    return model


def calls(log: str) -> list[tuple[int, int, int]]:
    """The logged tiles as ``(pid, x, y)``."""
    if not os.path.exists(log):
        return []
    with open(log, encoding="utf-8") as lines:
        return [tuple(int(v) for v in line.split()) for line in lines if line.strip()]
