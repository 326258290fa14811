"""The infer stage: one chunk's pixels → its tiles → the model → owned detections.

Pure with respect to Dask: it takes numpy pixels and plain values and returns a
:class:`ChunkResult`. ``graphs`` decides where and when it runs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.detections import Detections
from pipeline.failures import one_line
from pipeline.models import ModelSpec, load_model
from pipeline.security import cap_detections
from pipeline.tiling import TileGrid, cut_tiles, owned, to_uint8

log = logging.getLogger(__name__)

#: tiles that fail with the whole batch are retried one by one this many times
TILE_RETRIES = 1


@dataclass(kw_only=True)
class TileTally:
    """Tiles and what the model made of them: of a chunk (:class:`ChunkResult`) or, summed over
    its chunks, of an image (``graphs.image_job.ImageOutcome``)."""

    tiles: int = 0
    failed_tiles: list[dict[str, Any]] = field(default_factory=list)
    #: detections the model gave, and those dropped past ``pipeline.security.cap_detections``
    raw_detections: int = 0
    dropped_detections: int = 0

    def add(self, other: TileTally) -> None:
        """Count ``other``'s failed tiles and detections in (not its tiles: an image knows
        its tiles from its plan)."""
        self.failed_tiles.extend(other.failed_tiles)
        self.raw_detections += other.raw_detections
        self.dropped_detections += other.dropped_detections


@dataclass
class ChunkResult(TileTally):
    """What one chunk produced: owned detections in full-image pixels, and its tile tally."""

    chunk: tuple[int, int]
    detections: Detections = field(default_factory=Detections)
    model_seconds: float = 0.0
    read_seconds: float = 0.0
    #: wall seconds of the whole chunk task on its worker (read, tiles, model, answers)
    task_seconds: float = 0.0

    @classmethod
    def failed(cls, chunk: tuple[int, int], windows: np.ndarray, reason: str) -> ChunkResult:
        """Every tile of the chunk failed for ``reason`` (a read error, a lost task)."""
        return cls(
            chunk,
            tiles=len(windows),
            failed_tiles=[{"window": [int(v) for v in w], "reason": reason} for w in windows],
        )


def batches(windows: np.ndarray, batch_size: int, by_row: bool = False,
            tile_size: int | None = None) -> list[tuple[int, int]]:
    """``(start, stop)`` of the model batches over row-major tile ``windows``: at most
    ``batch_size`` tiles; ``by_row``: none across a tile row, nor (given ``tile_size``) across
    the step from whole tiles to ones clipped by the image edge, so that a batch of whole tiles
    can be a view of the chunk (clipped tiles are padded copies)."""
    cuts = np.flatnonzero(np.diff(windows[:, 1])) + 1 if by_row else np.empty(0, dtype=np.int64)
    if by_row and tile_size is not None:
        sizes = windows[:, 2:] - windows[:, :2]
        whole = (sizes == tile_size).all(axis=1)
        cuts = np.union1d(cuts, np.flatnonzero(np.diff(whole.astype(np.int8))) + 1)
    edges = np.concatenate([[0], cuts, [len(windows)]])
    return [(int(start), int(min(start + batch_size, stop)))
            for row_start, stop in zip(edges[:-1], edges[1:], strict=True)
            for start in range(int(row_start), int(stop), batch_size)]


def predict(spec: ModelSpec, tiles: np.ndarray, offsets: np.ndarray) -> list[Any]:
    """The model's answer for each tile of one batch (its raw output, or the exception that
    tile failed with): a failing batch is retried tile by tile, each tile
    :data:`TILE_RETRIES` more times, so that one bad tile does not fail its neighbours."""
    model = load_model(spec)
    try:
        results = model.predict(tiles, offsets)
    except Exception as exc:  # noqa: BLE001 - a failing batch is retried tile by tile
        if len(tiles) == 1:
            return [exc]
        log.warning("batch of %d tiles failed (%s); retrying one by one", len(tiles), one_line(exc))
        results = []
        for k in range(len(tiles)):
            for attempt in range(TILE_RETRIES + 1):
                try:
                    results.extend(model.predict(tiles[k : k + 1], offsets[k : k + 1]))
                    break
                except Exception as tile_exc:  # noqa: BLE001
                    if attempt == TILE_RETRIES:
                        results.append(tile_exc)
    return results


def detect_chunk(
    pixels: np.ndarray,
    origin: tuple[int, int],
    chunk: tuple[int, int],
    grid: TileGrid,
    spec: ModelSpec,
    range_adjustment: str = "NONE",
    bits: int | None = None,
) -> ChunkResult:
    """Run the model over the tiles that ``chunk`` owns.

    ``pixels`` is ``(bands, h, w)`` starting at full-image ``origin`` ``(x, y)``, holding the
    chunk and its halo (every tile window of the chunk lies inside it).
    """
    windows = grid.chunk_tiles(*chunk)
    result = ChunkResult(chunk, tiles=len(windows))
    if not len(windows):
        return result
    cores = grid.cores(windows)
    model = load_model(spec)
    reads_pixels = getattr(model, "reads_pixels", True)  # False: the null model, tiles not cut
    batch_size = spec.batch_size or model.batch_size
    parts = []
    for start, stop in batches(windows, batch_size, by_row=model.tile_views, tile_size=grid.tile_size):
        batch_windows = windows[start:stop]
        if reads_pixels:
            tiles = cut_tiles(pixels, origin, batch_windows, grid.tile_size, view=model.tile_views)
            tiles = to_uint8(tiles, range_adjustment, bits)
        else:
            tiles = np.zeros((stop - start, 0, 0, len(pixels)), np.uint8)
        offsets = batch_windows[:, :2]
        began = time.perf_counter()
        outputs = predict(spec, tiles, offsets)
        result.model_seconds += time.perf_counter() - began
        batch_cores = cores[start:stop]
        for window, core, output in zip(batch_windows, batch_cores, outputs, strict=True):
            if isinstance(output, BaseException):
                result.failed_tiles.append(
                    {"window": [int(v) for v in window], "reason": one_line(output)}
                )
                continue
            found, dropped = cap_detections(Detections.coerce(output).finite())
            result.raw_detections += len(found)
            result.dropped_detections += dropped
            if len(found):  # most tiles find nothing (concat leaves empty parts out anyway)
                parts.append(owned(found.shifted(window[0], window[1]), window, core, grid))
    result.detections = Detections.concat(parts)
    return result
