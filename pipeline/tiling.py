"""Tile grids, chunk layout and the ownership rule, as small pure functions.

Conventions (stated once): pixels are ``(x, y)`` = (column, row), the upper-left corner of pixel
``(0, 0)`` is ``(0, 0)``; a window or box ``(x0, y0, x1, y1)`` covers columns ``x0 .. x1 - 1``.
A grid is separable: the tiles are every pair of an x tile and a y tile, and each axis is a
sorted array of tile *origins* with the tiles' *ends* (``origin + T`` clipped to the grid).
``T`` is ``imageProcessorTileSize``, ``O`` the requested ``imageProcessorTileOverlap``.

**Tiling strategies** (``tilingStrategy`` of the request, :data:`STRATEGIES`):

- ``FIXED_STRIDE``: origins ``0, S, 2S, ...`` with ``S = T - O``, ``max(1, ceil((L - T) / S) + 1)``
  tiles, so every pixel is in a tile; the last tile is clipped to the image and zero-padded to
  ``T`` before it reaches the model.
- ``VARIABLE_OVERLAP``: OSML Model Runner 2.x's grid, exactly. Full-size tiles are spread evenly
  over the axis with an overlap of at least ``O`` (:func:`spread_overlap`; 3376 px, 512/128 →
  stride 358); the processing bounds shrink to the last whole tile (up to ``n - 2`` pixels at
  the right or bottom edge are then in no tile, as in OSML). The axis is first cut into OSML's
  regions (``REGION_SIZE``, default 10240, rounded to whole tiles, overlapping by the spread
  overlap) and each region is tiled on its own in the same way. An image narrower or shorter
  than ``T`` gets OSML's clipped tiles (longer than the overlap) instead of whole ones, and an
  image no longer than ``O`` gets no tile. With a regionOfInterest the grid covers the ROI's
  rounded pixel bounds, as OSML's processing bounds.

**Ownership rule** (exactly one full box per object smaller than ``O``, for both strategies):
along an axis, the *core* of tile ``i`` runs from the middle of its overlap with tile ``i - 1``
to the middle of its overlap with tile ``i + 1`` (the first core from ``-inf``, the last to
``+inf``), so the cores partition the plane. A box found in a tile is kept only if

1. it does not touch an edge of the tile that is not an edge of the grid (a truncated view of
   an object that a neighbouring tile sees whole), and
2. its centre lies in the tile's core.

An object of extent ``w < O`` has its centre in exactly one core, at least half an overlap
(``>= O / 2 > w / 2``) inside that tile's inner edges, so it is kept there whole and nowhere
else. Chunks hold whole tiles, so the rule does not depend on where chunk edges fall. Objects
larger than the overlap may be dropped or cut: choose ``imageProcessorTileOverlap`` larger
than the objects.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from pipeline import range_stats
from pipeline.detections import Detections

DEFAULT_CHUNK_TARGET = 4096
FIXED_STRIDE = "FIXED_STRIDE"
VARIABLE_OVERLAP = "VARIABLE_OVERLAP"
STRATEGIES: tuple[str, ...] = (FIXED_STRIDE, VARIABLE_OVERLAP)
#: OSML Model Runner's default ``REGION_SIZE`` (pixels a side)
OSML_REGION_SIZE = 10240


def tile_count(length: int, tile_size: int, overlap: int) -> int:
    """Number of ``FIXED_STRIDE`` tiles needed to cover ``length`` pixels."""
    stride = tile_size - overlap
    if length <= tile_size:
        return 1
    return math.ceil((length - tile_size) / stride) + 1


def tile_origins(length: int, tile_size: int, overlap: int) -> np.ndarray:
    """Start offsets of the ``FIXED_STRIDE`` tiles along one axis."""
    return np.arange(tile_count(length, tile_size, overlap), dtype=np.int64) * (
        tile_size - overlap
    )


def _ceildiv(a: int, b: int) -> int:
    return -(-a // b)


def crops(length: int, size: int, overlap: int, whole: bool) -> np.ndarray:
    """Starts of OSML's crops of ``size`` along an axis of ``length``, one every
    ``size - overlap`` pixels from 0: with ``whole`` only those that fit whole, else those
    whose part inside the axis is longer than ``overlap``."""
    stride = size - overlap
    starts = np.arange(max(0, _ceildiv(length, stride)), dtype=np.int64) * stride
    inside = np.minimum(size, length - starts)
    return starts[inside == size] if whole else starts[inside > overlap]


def spread_overlap(length: int, tile_size: int, overlap: int) -> int:
    """OSML's overlap of full tiles spread evenly over ``length``: the requested ``overlap``
    grown by the spare pixels of the ``n`` tiles it needs, shared among the ``n - 1`` gaps
    (rounded up)."""
    stride = tile_size - overlap
    n = _ceildiv(length - overlap, stride)
    if n <= 1:
        return overlap
    return overlap + _ceildiv(overlap + n * stride - length, n - 1)


def region_length(region_size: int, tile_size: int, overlap: int) -> int:
    """OSML's region side: ``region_size`` rounded down to whole tiles at ``overlap``."""
    stride = tile_size - overlap
    return max(1, (region_size - overlap) // stride) * stride + overlap


def variable_overlap_origins(length: int, tile_size: int, overlap: int, whole: bool,
                             region_size: int = OSML_REGION_SIZE) -> np.ndarray:
    """Tile origins of OSML 2.x's ``VariableOverlapTilingStrategy`` along an axis of ``length``
    (relative to the processing bounds): regions first, then each region's tiles. ``whole`` is
    OSML's choice for the whole image: True where it has full tiles (both sides ``>= T``), else
    every tile is a clipped crop."""
    spread = spread_overlap(length, tile_size, overlap)
    if whole:  # the processing bounds end with the last whole tile
        length = int(crops(length, tile_size, spread, True)[-1]) + tile_size
    side = region_length(region_size, tile_size, spread)
    parts = []
    for start in crops(length, side, spread, False).tolist():
        extent = min(side, length - start)
        parts.append(start + crops(extent, tile_size, spread_overlap(extent, tile_size, overlap), whole))
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def processing_bounds(bounds: tuple[float, float, float, float], width: int,
                      height: int) -> tuple[int, int, int, int]:
    """OSML's processing bounds ``(x0, y0, x1, y1)`` of a pixel-space ROI's ``bounds``: its
    corner and its size each rounded (half to even, as Python's ``round``), within the image."""
    minx, miny, maxx, maxy = bounds
    x0, y0 = round(minx), round(miny)
    return x0, y0, min(width, x0 + round(maxx - minx)), min(height, y0 + round(maxy - miny))


def chunk_size(tile_size: int, overlap: int, target: int = DEFAULT_CHUNK_TARGET) -> int:
    """A chunk side holding a whole number of tile strides, as close to ``target`` as it can.

    A few thousand pixels a side keeps GDAL's reads to mostly whole internal blocks, and a
    chunk to a few tiles per side, so a lost chunk costs little work. (A ``VARIABLE_OVERLAP``
    chunk holds as many tiles, a few pixels fewer.)
    """
    stride = tile_size - overlap
    return max(1, round(target / stride)) * stride


def chunk_count(n_tiles: int, per_chunk: int) -> int:
    """Chunks along an axis of ``n_tiles`` tiles, ``per_chunk`` to a chunk, the last one taking
    the remainder: a remainder of at most half a chunk joins the last whole chunk (up to 1.5
    chunks) instead of making a sliver task that costs nearly as much as a whole one to run."""
    whole, remainder = divmod(n_tiles, per_chunk)
    if whole == 0:
        return 1
    return whole + (1 if 2 * remainder > per_chunk else 0)


@dataclass(frozen=True)
class Axis:
    """One axis of a grid: tile ``origins`` and ``ends`` (sorted)."""

    origins: np.ndarray
    ends: np.ndarray

    @property
    def count(self) -> int:
        return len(self.origins)

    @cached_property
    def cuts(self) -> np.ndarray:
        """Core edges: the middle of each pair of neighbouring tiles' overlap."""
        return (self.origins[1:] + self.ends[:-1]) / 2.0

    def core(self, origins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Core ``(start, end)`` of the tiles that start at ``origins``."""
        index = np.searchsorted(self.origins, origins)
        bounds = np.concatenate([[-np.inf], self.cuts, [np.inf]])
        return bounds[index], bounds[index + 1]


@dataclass(frozen=True)
class TileGrid:
    """The tile grid of one image: ``width × height`` pixels, tiles of ``tile_size`` laid out
    by ``strategy``, chunks of ``chunk // (tile_size - overlap)`` tiles a side (``chunk`` is a
    whole number of nominal strides), the last chunk of each axis taking the remainder (see
    :func:`chunk_count`). ``bounds`` ``(x0, y0, x1, y1)``: the pixels a ``VARIABLE_OVERLAP``
    grid tiles (OSML's processing bounds; default the whole image); ``region_size``: OSML's
    ``REGION_SIZE``."""

    width: int
    height: int
    tile_size: int
    overlap: int
    chunk: int
    strategy: str = FIXED_STRIDE
    bounds: tuple[int, int, int, int] | None = None
    region_size: int = OSML_REGION_SIZE

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown tiling strategy {self.strategy!r} "
                             f"(expected {' or '.join(STRATEGIES)})")
        if self.chunk % self.stride:
            raise ValueError(f"chunk {self.chunk} is not a multiple of the stride {self.stride}")

    @property
    def stride(self) -> int:
        """The nominal stride ``T - O`` (``VARIABLE_OVERLAP`` tiles are closer)."""
        return self.tile_size - self.overlap

    @cached_property
    def _axes(self) -> tuple[Axis, Axis]:
        if self.strategy == FIXED_STRIDE:
            lengths = ((0, self.width), (0, self.height))
            origins = [tile_origins(n, self.tile_size, self.overlap) for _, n in lengths]
        else:
            x0, y0, x1, y1 = self.bounds or (0, 0, self.width, self.height)
            lengths = ((x0, x1 - x0), (y0, y1 - y0))
            whole = min(x1 - x0, y1 - y0) >= self.tile_size
            origins = [start + variable_overlap_origins(n, self.tile_size, self.overlap, whole,
                                                        self.region_size) for start, n in lengths]
        return tuple(  # type: ignore[return-value]
            Axis(o, np.minimum(o + self.tile_size, start + n))
            for o, (start, n) in zip(origins, lengths, strict=True)
        )

    @property
    def x(self) -> Axis:
        return self._axes[0]

    @property
    def y(self) -> Axis:
        return self._axes[1]

    @property
    def tiles_x(self) -> int:
        return self.x.count

    @property
    def tiles_y(self) -> int:
        return self.y.count

    @property
    def n_tiles(self) -> int:
        return self.tiles_x * self.tiles_y

    @property
    def tiles_per_chunk(self) -> int:
        return self.chunk // self.stride

    @property
    def chunks_x(self) -> int:
        return chunk_count(self.tiles_x, self.tiles_per_chunk)

    @property
    def chunks_y(self) -> int:
        return chunk_count(self.tiles_y, self.tiles_per_chunk)

    def _axis_tiles(self, chunk_index: int, n_tiles: int) -> np.ndarray:
        per_chunk = self.tiles_per_chunk
        first = chunk_index * per_chunk
        last = chunk_index == chunk_count(n_tiles, per_chunk) - 1  # it takes the remainder
        return np.arange(first, n_tiles if last else min(first + per_chunk, n_tiles), dtype=np.int64)

    def _axis_bounds(self, axis: Axis, index: int, n_chunks: int, size: int) -> tuple[int, int]:
        per_chunk = self.tiles_per_chunk
        start = 0 if index == 0 else int(axis.origins[index * per_chunk])
        end = size if index == n_chunks - 1 else int(axis.origins[(index + 1) * per_chunk])
        return start, end

    def chunk_bounds(self, chunk_row: int, chunk_col: int) -> tuple[int, int, int, int]:
        """The chunk's own pixels ``(x0, y0, x1, y1)``: from its first tile's origin to the next
        chunk's (the first and last chunk from and to the image edge), so the chunks partition
        the image and each chunk's tiles start in it."""
        x0, x1 = self._axis_bounds(self.x, chunk_col, self.chunks_x, self.width)
        y0, y1 = self._axis_bounds(self.y, chunk_row, self.chunks_y, self.height)
        return x0, y0, x1, y1

    def chunk_reach(self, chunk_row: int, chunk_col: int) -> tuple[float, float, float, float]:
        """How far the neighbouring chunks' tiles reach into this chunk ``(x0, y0, x1, y1)``:
        the left (top) neighbour's tiles end at ``x0`` (``y0``), the right (bottom) one's start
        at ``x1`` (``y1``); ``-inf``/``+inf`` where there is no neighbour. Only this chunk's boxes
        that cross those lines can overlap a neighbour's boxes."""
        per_chunk = self.tiles_per_chunk

        def axis(a: Axis, index: int, n_chunks: int) -> tuple[float, float]:
            low = float(a.ends[index * per_chunk - 1]) if index > 0 else -np.inf
            high = float(a.origins[(index + 1) * per_chunk]) if index < n_chunks - 1 else np.inf
            return low, high

        x0, x1 = axis(self.x, chunk_col, self.chunks_x)
        y0, y1 = axis(self.y, chunk_row, self.chunks_y)
        return x0, y0, x1, y1

    def chunk_tiles(self, chunk_row: int, chunk_col: int) -> np.ndarray:
        """Tile windows ``(x0, y0, x1, y1)`` owned by one chunk, row by row, clipped to the grid."""
        cols = self._axis_tiles(chunk_col, self.tiles_x)
        rows = self._axis_tiles(chunk_row, self.tiles_y)
        ix, iy = (v.ravel() for v in np.meshgrid(cols, rows))
        return np.stack([self.x.origins[ix], self.y.origins[iy], self.x.ends[ix], self.y.ends[iy]],
                        axis=1).astype(np.int64).reshape(-1, 4)

    def chunk_tile_count(self, chunk_row: int, chunk_col: int) -> int:
        return len(self._axis_tiles(chunk_col, self.tiles_x)) * len(
            self._axis_tiles(chunk_row, self.tiles_y)
        )

    def chunk_window(self, chunk_row: int, chunk_col: int) -> tuple[int, int, int, int]:
        """Pixels ``(x0, y0, x1, y1)`` that the chunk's tiles read (chunk plus halo); the chunk's
        pixel array starts at ``(x0, y0)``."""
        tiles = self.chunk_tiles(chunk_row, chunk_col)
        if len(tiles) == 0:
            x0, y0 = self.chunk_bounds(chunk_row, chunk_col)[:2]
            return x0, y0, x0, y0
        return (
            int(tiles[:, 0].min()),
            int(tiles[:, 1].min()),
            int(tiles[:, 2].max()),
            int(tiles[:, 3].max()),
        )

    def cores(self, windows: np.ndarray) -> np.ndarray:
        """Ownership cores ``(cx0, cy0, cx1, cy1)`` of tiles given by their windows."""
        cx0, cx1 = self.x.core(windows[:, 0])
        cy0, cy1 = self.y.core(windows[:, 1])
        return np.stack([cx0, cy0, cx1, cy1], axis=1)

    @property
    def extent(self) -> tuple[int, int, int, int]:
        """The pixels the tiles cover ``(x0, y0, x1, y1)``: the grid's edges."""
        if not self.n_tiles:
            return 0, 0, 0, 0
        return (int(self.x.origins[0]), int(self.y.origins[0]), int(self.x.ends[-1]),
                int(self.y.ends[-1]))


def owned(detections: Detections, window: np.ndarray, core: np.ndarray, grid: TileGrid) -> Detections:
    """Apply the ownership rule to one tile's detections, given in full-image pixels (extra
    per-detection fields are kept)."""
    if not len(detections):
        return detections
    x0, y0, x1, y1 = (float(v) for v in window)
    boxes = np.clip(
        detections.boxes, [x0, y0, x0, y0], [x1, y1, x1, y1]
    )  # nothing outside the tile's real pixels (padding included)
    cx = (boxes[:, 0] + boxes[:, 2]) / 2.0
    cy = (boxes[:, 1] + boxes[:, 3]) / 2.0
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    gx0, gy0, gx1, gy1 = grid.extent
    if x0 > gx0:
        keep &= boxes[:, 0] > x0
    if y0 > gy0:
        keep &= boxes[:, 1] > y0
    if x1 < gx1:
        keep &= boxes[:, 2] < x1
    if y1 < gy1:
        keep &= boxes[:, 3] < y1
    keep &= (cx >= core[0]) & (cx < core[2]) & (cy >= core[1]) & (cy < core[3])
    return dataclasses.replace(detections, boxes=boxes).select(keep)


def cut_tiles(chunk: np.ndarray, origin: tuple[int, int], windows: np.ndarray, tile_size: int,
              view: bool = False) -> np.ndarray:
    """Cut ``(bands, h, w)`` chunk pixels into an ``N × T × T × bands`` batch, zero-padded.

    ``origin`` is the ``(x, y)`` full-image offset of ``chunk[:, 0, 0]``. With ``view``, whole
    tiles of one tile row, evenly spaced, come back as a read-only view of the chunk (no copy:
    the tiles of a row overlap in memory, so none may be written); any other batch is a copy.
    """
    tiles = _row_view(chunk, origin, windows, tile_size) if view else None
    if tiles is not None:
        return tiles
    bands = chunk.shape[0]
    batch = np.zeros((len(windows), tile_size, tile_size, bands), dtype=chunk.dtype)
    ox, oy = origin
    for i, (x0, y0, x1, y1) in enumerate(windows):
        part = chunk[:, y0 - oy : y1 - oy, x0 - ox : x1 - ox]
        batch[i, : part.shape[1], : part.shape[2], :] = np.moveaxis(part, 0, -1)
    return batch


def _row_view(chunk: np.ndarray, origin: tuple[int, int], windows: np.ndarray,
              tile_size: int) -> np.ndarray | None:
    """:func:`cut_tiles`' batch as a strided view, where the windows allow one."""
    if not len(windows):
        return None
    x0, y0, x1, y1 = (windows[:, k] for k in range(4))
    step = int(x0[1] - x0[0]) if len(windows) > 1 else 0
    whole = (x1 - x0 == tile_size).all() and (y1 - y0 == tile_size).all()
    if not whole or (y0 != y0[0]).any() or (np.diff(x0) != step).any() or step < 0:
        return None
    pixels = np.moveaxis(chunk, 0, -1)[int(y0[0]) - origin[1]:, int(x0[0]) - origin[0]:]
    if pixels.shape[0] < tile_size or pixels.shape[1] < step * (len(windows) - 1) + tile_size:
        return None
    row, col, band = pixels.strides
    return np.lib.stride_tricks.as_strided(
        pixels, shape=(len(windows), tile_size, tile_size, pixels.shape[2]),
        strides=(step * col, row, col, band), writeable=False,
    )


def to_uint8(
    pixels: np.ndarray,
    range_adjustment: str = "NONE",
    bits: int | None = None,
    stretch: tuple[Any, Any] | None = None,
) -> np.ndarray:
    """Pixels as uint8 for the model (bands on the last axis).

    ``NONE`` clips to 0..255 (uint8 input is returned as is); ``MINMAX`` scales the
    ``bits``-bit range (or the dtype's range) to 0..255; ``DRA`` stretches ``stretch``
    (per-band ``(low, high)`` computed once per image) or else each band's 2nd–98th
    percentile of the given pixels to 0..255. The DRA's range and every stretch are
    :mod:`pipeline.range_stats`' (float32, in blocks).
    """
    if pixels.dtype == np.uint8 and range_adjustment != "DRA":
        return pixels
    if range_adjustment == "DRA":
        if stretch is None:
            bands = pixels.reshape(-1, pixels.shape[-1]).T if pixels.ndim >= 2 else pixels.reshape(1, -1)
            stretch = range_stats.dynamic_range(bands)
        return range_stats.stretch(pixels, *stretch)
    if range_adjustment == "MINMAX":
        return range_stats.stretch(pixels, 0.0, _top(pixels, bits))
    return range_stats.stretch(pixels, 0.0, 255.0)


def _top(pixels: np.ndarray, bits: int | None) -> float:
    """MINMAX's white: the ``bits``-bit maximum, the integer dtype's, or the largest pixel
    (non-finite ones counting as 0)."""
    if bits:
        return float(2**bits - 1)
    if np.issubdtype(pixels.dtype, np.integer):
        return float(np.iinfo(pixels.dtype).max)
    finite = np.isfinite(pixels)
    top = float(np.max(pixels, where=finite, initial=-np.inf))
    if not finite.all() or not np.isfinite(top):
        top = max(top, 0.0)
    return top or 1.0
