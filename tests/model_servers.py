"""Real model servers and helpers for the model-target tests (all on 127.0.0.1)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.transform import from_origin

from pipeline.detections import Detections
from pipeline.models.server import Behaviour, ModelServer, start_server

SIZE, TILE, OVERLAP = 384, 128, 16
#: (x, y) of the upper-left corner of each 6×6 bright square
SQUARES = [(20, 30), (60, 150), (140, 40), (250, 250), (300, 60), (180, 330), (350, 200), (100, 280)]
#: first pixel of the tile at (224, 112): the servers' fail/malformed marker
MARKED_TILE = (224, 112)
MARKER = 77


def write_scene(path: Path, marker: int | None = None) -> Path:
    """A 3-band 384×384 GeoTIFF with bright 6×6 squares (and optionally a marked tile)."""
    pixels = np.full((3, SIZE, SIZE), 20, dtype=np.uint8)
    for x, y in SQUARES:
        pixels[:, y : y + 6, x : x + 6] = 250
    if marker is not None:
        pixels[:, MARKED_TILE[1], MARKED_TILE[0]] = marker
    profile = {"driver": "GTiff", "width": SIZE, "height": SIZE, "count": 3, "dtype": "uint8",
               "crs": "EPSG:32633", "transform": from_origin(500000, 4000000, 0.5, 0.5)}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels)
    return path


def truth_boxes() -> np.ndarray:
    return np.array([[x, y, x + 6, y + 6] for x, y in sorted(SQUARES)], dtype=np.float64)


def boxes_of(features: Any) -> np.ndarray:
    boxes = np.array(list(features["imageBBox"]), dtype=np.float64).reshape(-1, 4)
    return boxes[np.lexsort((boxes[:, 1], boxes[:, 0]))]


@contextmanager
def serving(model: str = "bright-objects", **behaviour: Any) -> Iterator[ModelServer]:
    server = start_server(model, behaviour=Behaviour(**behaviour))
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------- GPU path
class GpuProbe:
    """A PYTHON model that needs a GPU: bright objects, class = the worker that ran it."""

    resources = {"GPU": 1}
    batch_size = 4
    loads = 0

    def __init__(self) -> None:
        GpuProbe.loads += 1

    def __call__(self, tiles: np.ndarray, offsets: np.ndarray) -> list[Detections]:
        from distributed import get_worker

        from pipeline.models.builtin import bright_objects

        name = str(get_worker().name)
        out = []
        for tile in tiles:
            found = bright_objects(tile)
            out.append(Detections(found.boxes, found.scores, np.full(len(found), name, dtype=object)))
        return out


class TaskLog:
    """A scheduler plugin recording, for each finished task, its worker and resource restrictions."""

    name = "model-task-log"

    def __init__(self) -> None:
        self.log: list[tuple[str, str, dict[str, float] | None]] = []

    def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if finish != "memory" or start != "processing":
            return
        ts = self.scheduler.tasks.get(key)
        worker = kwargs.get("worker")
        name = self.scheduler.workers[worker].name if worker in self.scheduler.workers else str(worker)
        prefix = key[0] if isinstance(key, tuple) else str(key)
        self.log.append((str(prefix), str(name), dict(ts.resource_restrictions or {}) if ts else None))


def task_log_plugin() -> Any:
    from distributed.diagnostics.plugin import SchedulerPlugin

    class _Plugin(TaskLog, SchedulerPlugin):
        pass

    return _Plugin()


def read_task_log(dask_scheduler: Any) -> list[tuple[str, str, dict[str, float] | None]]:
    return list(dask_scheduler.plugins[TaskLog.name].log)
