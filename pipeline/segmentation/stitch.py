"""Stitching: one chunk's tiles → class scores and class ids over the chunk's own pixels.

A chunk of the :class:`~pipeline.tiling.TileGrid` owns the pixels of
:meth:`~pipeline.tiling.TileGrid.chunk_bounds` (the chunks partition the image). Its task reads
those pixels plus the halo that the tiles covering them reach into, runs the model on every
tile that covers one of its pixels (the tiles along a seam run in both chunks: a seam costs a
tile row, not a data exchange) and stitches:

- ``BLEND``: each pixel's scores are the weighted mean of the scores of every tile covering it,
  with the weight ``w(i, j) = a(i) a(j)``, ``a(i) = min(1, (min(i, T - 1 - i) + 1) / (O + 1))``:
  1 in the tile's middle, falling linearly over the last ``O`` pixels towards each edge (never
  0), so a tile's edge, where its model saw the least context, counts least (a pixel that only
  one tile covers takes that tile's scores as they are);
- ``CORE``: each pixel's scores are those of the one tile whose ownership core (the ownership
  rule's cores: from the middle of one overlap to the middle of the next) holds its centre.

Class ids are the argmax of the stitched scores (the lowest class on a tie). A per-pixel
segmenter (:attr:`~pipeline.segmentation.contract.Segmenter.per_pixel`) answers the chunk's own
pixels instead, a slab of rows per call (:func:`segment_per_pixel`): every tile would say the same
of a pixel, so stitching gives it back.
The tiles covering a pixel and the order in which they are summed (row-major) do not depend on
the chunks, so the result is the same, bit for bit, for any chunk size.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.failures import one_line
from pipeline.infer import batches
from pipeline.models import ModelSpec
from pipeline.segmentation.contract import BLEND, as_scores, checked_ids, one_hot
from pipeline.segmentation.models import load_segmenter
from pipeline.tiling import Axis, TileGrid, cut_tiles, to_uint8


def axis_weight(length: int, overlap: int) -> np.ndarray:
    """The blending weight along one tile axis of ``length`` pixels (see the module)."""
    i = np.arange(length)
    return np.minimum(1.0, (np.minimum(i, length - 1 - i) + 1) / (overlap + 1)).astype(np.float32)


def _axis_tiles(axis: Axis, low: int, high: int, mode: str) -> np.ndarray:
    """Indices of the tiles along ``axis`` that give pixels ``low .. high - 1`` their value."""
    start, end = axis.origins.astype(np.float64), axis.ends.astype(np.float64)
    if mode != BLEND:  # the pixels whose centre is in the tile's core
        core_start, core_end = axis.core(axis.origins)
        start = np.maximum(start, np.ceil(core_start - 0.5))
        end = np.minimum(end, np.ceil(core_end - 0.5))
    return np.flatnonzero(np.maximum(start, low) < np.minimum(end, high))


def covering_tiles(grid: TileGrid, bounds: tuple[int, int, int, int], mode: str) -> np.ndarray:
    """Tile windows ``(x0, y0, x1, y1)`` that give the pixels of ``bounds`` their value, row by row."""
    x0, y0, x1, y1 = bounds
    ix = _axis_tiles(grid.x, x0, x1, mode)
    iy = _axis_tiles(grid.y, y0, y1, mode)
    gx, gy = (v.ravel() for v in np.meshgrid(ix, iy))
    return np.stack([grid.x.origins[gx], grid.y.origins[gy], grid.x.ends[gx], grid.y.ends[gy]],
                    axis=1).astype(np.int64).reshape(-1, 4)


def read_window(windows: np.ndarray, bounds: tuple[int, int, int, int],
                per_pixel: bool = False) -> tuple[int, int, int, int]:
    """The pixels a chunk task reads: its bounds and every covering tile (the halo); its
    bounds alone for a per-pixel answer (:func:`answers_per_pixel`: no pixel's answer needs
    its neighbours, so a halo would only be decoded and dropped)."""
    if per_pixel or not len(windows):
        return bounds
    return (min(bounds[0], int(windows[:, 0].min())), min(bounds[1], int(windows[:, 1].min())),
            max(bounds[2], int(windows[:, 2].max())), max(bounds[3], int(windows[:, 3].max())))


def answers_per_pixel(segmenter: Any, range_adjustment: str) -> bool:
    """Whether a chunk is segmented in one call over its own pixels: a per-pixel segmenter
    (:attr:`~pipeline.segmentation.contract.Segmenter.per_pixel`) whose tiles are not
    range-adjusted one by one (``DRA`` per tile would make a pixel's answer depend on its tile)."""
    return bool(segmenter.per_pixel) and range_adjustment != "DRA"


@dataclass
class Stitched:
    """One chunk's stitched answer over its ``bounds``: ``classes`` (``h × w``) and
    ``scores`` (``K × h × w`` float32, 0..1; None: the one-hot of ``classes``, where every tile
    answered class ids and each pixel came from one tile), and its tile tally."""

    bounds: tuple[int, int, int, int]
    classes: np.ndarray
    scores: np.ndarray | None
    class_names: tuple[str, ...]
    tiles: int = 0
    failed_tiles: list[dict[str, Any]] = field(default_factory=list)
    model_seconds: float = 0.0


def _core_span(start: float, end: float) -> tuple[float, float]:
    """Pixels whose centre lies in ``[start, end)``: ``ceil(start - 0.5) .. ceil(end - 0.5)``."""
    low = -math.inf if math.isinf(start) else math.ceil(start - 0.5)
    high = math.inf if math.isinf(end) else math.ceil(end - 0.5)
    return low, high


def _exclusive(axis: Axis, start: int, end: int) -> tuple[int, int]:
    """The part of the tile ``start .. end`` along ``axis`` that no other tile covers."""
    index = int(np.searchsorted(axis.origins, start))
    after = int(np.searchsorted(axis.origins, start, side="right"))
    if after - index > 1:  # another tile starts here too
        return start, start
    low = int(axis.ends[index - 1]) if index > 0 else start  # the ends are sorted too
    high = int(axis.origins[after]) if after < axis.count else end
    return max(start, low), min(end, high)


def stitch_chunk(pixels: np.ndarray, origin: tuple[int, int], bounds: tuple[int, int, int, int],
                 grid: TileGrid, spec: ModelSpec, mode: str = BLEND, range_adjustment: str = "NONE",
                 bits: int | None = None) -> Stitched:
    """Segment and stitch the pixels of ``bounds``; ``pixels`` (``bands × h × w`` from
    full-image ``origin``) hold :func:`read_window` of them (per pixel: ``bounds`` alone will do)."""
    segmenter = load_segmenter(spec)
    names = tuple(segmenter.class_names)
    k = len(names)
    bx0, by0, bx1, by1 = bounds
    h, w = by1 - by0, bx1 - bx0
    windows = covering_tiles(grid, bounds, mode)
    dtype = class_dtype(k)
    if answers_per_pixel(segmenter, range_adjustment) and len(windows):
        ox, oy = origin
        return segment_per_pixel(lambda top, bottom: pixels[:, top - oy:bottom - oy, bx0 - ox:bx1 - ox],
                                 bounds, grid, spec, mode, range_adjustment, bits)
    classes = np.zeros((h, w), dtype)
    # CORE with class-id answers copies the ids: no scores unless a tile answers scores
    scores: np.ndarray | None = np.zeros((k, h, w), np.float32) if mode == BLEND else None
    result = Stitched(bounds, classes, scores, names, tiles=len(windows))
    total = np.zeros((h, w), np.float32) if mode == BLEND else None
    weight = np.outer(axis_weight(grid.tile_size, grid.overlap), axis_weight(grid.tile_size, grid.overlap))
    cores = grid.cores(windows) if len(windows) else np.empty((0, 4))
    batch_size = spec.batch_size or segmenter.batch_size
    views = segmenter.tile_views
    for start, stop in batches(windows, batch_size, by_row=views, tile_size=grid.tile_size):
        batch = windows[start:stop]
        tiles = to_uint8(cut_tiles(pixels, origin, batch, grid.tile_size, view=views), range_adjustment, bits)
        began = time.perf_counter()
        try:
            answers: list[Any] = list(segmenter.segment(tiles, batch[:, :2]))
        except Exception as exc:  # noqa: BLE001 - the batch's tiles fail with it
            answers = [exc] * len(batch)
        result.model_seconds += time.perf_counter() - began
        for window, core, answer in zip(batch, cores[start:stop], answers, strict=True):
            tx0, ty0, tx1, ty1 = (int(v) for v in window)
            try:
                if isinstance(answer, BaseException):
                    raise answer
                answer = np.asarray(answer)
                if scores is None and answer.ndim == 2:
                    tile_ids, tile_scores = checked_ids(answer, k, grid.tile_size, grid.tile_size), None
                else:
                    tile_ids, tile_scores = None, as_scores(answer, k, grid.tile_size, grid.tile_size)
            except Exception as exc:  # noqa: BLE001 - one failed tile
                result.failed_tiles.append({"window": [tx0, ty0, tx1, ty1], "reason": one_line(exc)})
                continue
            if mode == BLEND:
                x0, y0, x1, y1 = max(tx0, bx0), max(ty0, by0), min(tx1, bx1), min(ty1, by1)
            else:
                cx0, cx1 = _core_span(core[0], core[2])
                cy0, cy1 = _core_span(core[1], core[3])
                x0, y0 = int(max(tx0, bx0, cx0)), int(max(ty0, by0, cy0))
                x1, y1 = int(min(tx1, bx1, cx1)), int(min(ty1, by1, cy1))
            if x1 <= x0 or y1 <= y0:
                continue
            src = (slice(None), slice(y0 - ty0, y1 - ty0), slice(x0 - tx0, x1 - tx0))
            dst = (slice(None), slice(y0 - by0, y1 - by0), slice(x0 - bx0, x1 - bx0))
            if tile_ids is not None:
                classes[dst[1:]] = tile_ids[src[1:]]
                continue
            assert tile_scores is not None
            if scores is None:  # CORE: the first tile that answers scores; ids so far one-hot
                scores = one_hot(classes, k)
            if total is None:
                scores[dst] = tile_scores[src]
                continue
            # only this tile covers its exclusive part: copied (its weighted mean is itself)
            ex0, ex1 = _exclusive(grid.x, tx0, tx1)
            ey0, ey1 = _exclusive(grid.y, ty0, ty1)
            ex0, ey0, ex1, ey1 = max(ex0, x0), max(ey0, y0), min(ex1, x1), min(ey1, y1)
            if ex1 <= ex0 or ey1 <= ey0:
                ex0 = ex1 = x0
                ey0 = ey1 = y0
            else:
                inner = (slice(None), slice(ey0 - by0, ey1 - by0), slice(ex0 - bx0, ex1 - bx0))
                scores[inner] = tile_scores[:, ey0 - ty0:ey1 - ty0, ex0 - tx0:ex1 - tx0]
                total[inner[1:]] = 1.0
            for rx0, ry0, rx1, ry1 in ((x0, y0, x1, ey0), (x0, ey1, x1, y1),
                                       (x0, ey0, ex0, ey1), (ex1, ey0, x1, ey1)):
                if rx1 <= rx0 or ry1 <= ry0:
                    continue
                part = weight[ry0 - ty0:ry1 - ty0, rx0 - tx0:rx1 - tx0]
                out = (slice(None), slice(ry0 - by0, ry1 - by0), slice(rx0 - bx0, rx1 - bx0))
                scores[out] += tile_scores[:, ry0 - ty0:ry1 - ty0, rx0 - tx0:rx1 - tx0] * part
                total[out[1:]] += part
    if total is not None and scores is not None:
        np.divide(scores, total, out=scores, where=total > 0)
    if scores is not None:
        result.classes = argmax(scores, dtype)
    result.scores = scores
    return result


def class_dtype(n_classes: int) -> type[np.unsignedinteger[Any]]:
    """The class raster's dtype: uint8 up to 255 classes, else uint16 (the largest value is
    the nodata of pixels outside a regionOfInterest)."""
    return np.uint8 if n_classes < 255 else np.uint16


#: rows of a per-pixel chunk read and segmented at a time (one block row of a 512-pixel tiled
#: image): the model runs on pixels still in the CPU's cache, and a task holds a slab of pixels,
#: not the chunk's (a 4096² chunk: 6 instead of 48 MB; its threshold took half the time)
SLAB_ROWS = 512


def segment_per_pixel(read_rows: Callable[[int, int], np.ndarray], bounds: tuple[int, int, int, int],
                      grid: TileGrid, spec: ModelSpec, mode: str = BLEND, range_adjustment: str = "NONE",
                      bits: int | None = None) -> Stitched:
    """A per-pixel segmenter's answer over the pixels of ``bounds``, :data:`SLAB_ROWS` rows at a
    time: ``read_rows(top, bottom)`` gives those rows of ``bounds``' columns (``bands × rows ×
    w``; its errors propagate), and each slab is one call, as one ``1 × rows × w × C`` tile
    (stitching a per-pixel answer gives it back: every covering tile says the same of a pixel).
    A model error fails every covering tile of the chunk."""
    segmenter = load_segmenter(spec)
    names = tuple(segmenter.class_names)
    k, dtype = len(names), class_dtype(len(names))
    bx0, by0, bx1, by1 = bounds
    width = bx1 - bx0
    windows = covering_tiles(grid, bounds, mode)
    result = Stitched(bounds, np.zeros((by1 - by0, width), dtype), None, names, tiles=len(windows))
    for top in range(by0, by1, SLAB_ROWS):
        bottom = min(by1, top + SLAB_ROWS)
        view = np.moveaxis(read_rows(top, bottom), 0, -1)
        rows = slice(top - by0, bottom - by0)
        began = time.perf_counter()
        try:
            tile = to_uint8(view, range_adjustment, bits)[None]
            (one,) = segmenter.segment(tile, np.array([[bx0, top]]))
            answer = np.asarray(one)
            if answer.ndim == 2:
                result.classes[rows] = checked_ids(answer, k, bottom - top, width)
                if result.scores is not None:  # a model that answered scores for earlier slabs
                    result.scores[:, rows] = one_hot(result.classes[rows], k)
            else:
                scores = as_scores(answer, k, bottom - top, width)
                if result.scores is None:  # the slabs so far answered ids: their one-hot
                    result.scores = np.zeros((k, *result.classes.shape), np.float32)
                    result.scores[:, :rows.start] = one_hot(result.classes[:rows.start], k)
                result.scores[:, rows] = scores
                result.classes[rows] = argmax(scores, dtype)
        except Exception as exc:  # noqa: BLE001 - every tile of the chunk fails with it
            reason = one_line(exc)
            result.failed_tiles = [{"window": [int(v) for v in window], "reason": reason}
                                   for window in windows]
            result.classes[:], result.scores = 0, None
            result.model_seconds += time.perf_counter() - began
            return result
        result.model_seconds += time.perf_counter() - began
    return result


def argmax(scores: np.ndarray, dtype: type[np.unsignedinteger[Any]]) -> np.ndarray:
    """``scores.argmax(axis=0)`` (the lowest class on a tie), plane by plane: a strided
    reduction over the first axis is several times slower."""
    ids: np.ndarray = np.zeros(scores.shape[1:], dtype)
    if not len(scores):
        return ids
    best = scores[0].copy()
    for k in range(1, len(scores)):
        better = scores[k] > best
        np.copyto(ids, dtype(k), where=better)
        np.maximum(best, scores[k], out=best)
    return ids
