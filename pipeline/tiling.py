"""Tile grids, chunk layout and the ownership rule, as small pure functions.

Tiles along one axis of length ``L`` start at ``0, S, 2S, ...`` with stride ``S = T - O``
(tile size ``T``, overlap ``O``); there are ``n = max(1, ceil((L - T) / S) + 1)`` of them,
so every pixel is inside a tile. The last tile is clipped to the image and padded with zeros
to ``T`` before it reaches the model (nothing at the right or bottom edge is dropped).

**Ownership rule** (exactly one full box per object smaller than the overlap): a box found
in a tile is kept only if

1. it does not touch an edge of the tile that is not an edge of the image (a truncated view
   of an object that a neighbouring tile sees whole), and
2. its centre lies in the tile's *core*. The cores partition the image: along an axis, the
   core of tile ``i`` is ``[i*S + O/2, (i+1)*S + O/2)``, the first one starting at ``-inf``
   and the last one ending at ``+inf``.

An object of extent ``w < O`` has its centre in exactly one core, and that tile holds it whole
and away from its edges, so it is kept there and nowhere else. Chunks hold a whole number of
tile strides, so the rule does not depend on where chunk edges fall. Objects larger than the
overlap may be dropped or cut: choose ``imageProcessorTileOverlap`` larger than the objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.detections import Detections

DEFAULT_CHUNK_TARGET = 4096


def tile_count(length: int, tile_size: int, overlap: int) -> int:
    """Number of tiles needed to cover ``length`` pixels."""
    stride = tile_size - overlap
    if length <= tile_size:
        return 1
    return math.ceil((length - tile_size) / stride) + 1


def tile_origins(length: int, tile_size: int, overlap: int) -> np.ndarray:
    """Start offsets of the tiles along one axis."""
    return np.arange(tile_count(length, tile_size, overlap), dtype=np.int64) * (
        tile_size - overlap
    )


def chunk_size(tile_size: int, overlap: int, target: int = DEFAULT_CHUNK_TARGET) -> int:
    """A chunk side holding a whole number of tile strides, as close to ``target`` as it can.

    A few thousand pixels a side keeps GDAL's reads to mostly whole internal blocks, and a
    chunk to a few tiles per side, so a lost chunk costs little work.
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
class TileGrid:
    """The tile grid of one image: ``width × height`` pixels, chunks of ``chunk`` pixels (a
    whole number of tile strides), the last chunk of each axis taking the remainder (see
    :func:`chunk_count`)."""

    width: int
    height: int
    tile_size: int
    overlap: int
    chunk: int

    def __post_init__(self) -> None:
        if self.chunk % self.stride:
            raise ValueError(f"chunk {self.chunk} is not a multiple of the stride {self.stride}")

    @property
    def stride(self) -> int:
        return self.tile_size - self.overlap

    @property
    def tiles_x(self) -> int:
        return tile_count(self.width, self.tile_size, self.overlap)

    @property
    def tiles_y(self) -> int:
        return tile_count(self.height, self.tile_size, self.overlap)

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

    def chunk_bounds(self, chunk_row: int, chunk_col: int) -> tuple[int, int, int, int]:
        """The chunk's own pixels ``(x0, y0, x1, y1)`` (its tiles' strides, without the halo):
        the chunks partition the image."""
        x0, y0 = chunk_col * self.chunk, chunk_row * self.chunk
        x1 = self.width if chunk_col == self.chunks_x - 1 else x0 + self.chunk
        y1 = self.height if chunk_row == self.chunks_y - 1 else y0 + self.chunk
        return x0, y0, x1, y1

    def chunk_tiles(self, chunk_row: int, chunk_col: int) -> np.ndarray:
        """Tile windows ``(x0, y0, x1, y1)`` owned by one chunk, clipped to the image."""
        cols = self._axis_tiles(chunk_col, self.tiles_x)
        rows = self._axis_tiles(chunk_row, self.tiles_y)
        ix, iy = np.meshgrid(cols, rows)
        x0 = ix.ravel() * self.stride
        y0 = iy.ravel() * self.stride
        x1 = np.minimum(x0 + self.tile_size, self.width)
        y1 = np.minimum(y0 + self.tile_size, self.height)
        return np.stack([x0, y0, x1, y1], axis=1)

    def chunk_tile_count(self, chunk_row: int, chunk_col: int) -> int:
        return len(self._axis_tiles(chunk_col, self.tiles_x)) * len(
            self._axis_tiles(chunk_row, self.tiles_y)
        )

    def chunk_window(self, chunk_row: int, chunk_col: int) -> tuple[int, int, int, int]:
        """Pixels ``(x0, y0, x1, y1)`` that the chunk's tiles read (chunk plus halo)."""
        tiles = self.chunk_tiles(chunk_row, chunk_col)
        if len(tiles) == 0:
            x0, y0 = chunk_col * self.chunk, chunk_row * self.chunk
            return x0, y0, x0, y0
        return (
            int(tiles[:, 0].min()),
            int(tiles[:, 1].min()),
            int(tiles[:, 2].max()),
            int(tiles[:, 3].max()),
        )

    def cores(self, windows: np.ndarray) -> np.ndarray:
        """Ownership cores ``(cx0, cy0, cx1, cy1)`` of tiles given by their windows."""
        half = self.overlap / 2.0
        x0 = windows[:, 0].astype(np.float64)
        y0 = windows[:, 1].astype(np.float64)
        last_x = (self.tiles_x - 1) * self.stride
        last_y = (self.tiles_y - 1) * self.stride
        cx0 = np.where(x0 > 0, x0 + half, -np.inf)
        cy0 = np.where(y0 > 0, y0 + half, -np.inf)
        cx1 = np.where(x0 < last_x, x0 + self.stride + half, np.inf)
        cy1 = np.where(y0 < last_y, y0 + self.stride + half, np.inf)
        return np.stack([cx0, cy0, cx1, cy1], axis=1)


def owned(detections: Detections, window: np.ndarray, core: np.ndarray, grid: TileGrid) -> Detections:
    """Apply the ownership rule to one tile's detections, given in full-image pixels."""
    if not len(detections):
        return detections
    x0, y0, x1, y1 = (float(v) for v in window)
    boxes = np.clip(
        detections.boxes, [x0, y0, x0, y0], [x1, y1, x1, y1]
    )  # nothing outside the tile's real pixels (padding included)
    cx = (boxes[:, 0] + boxes[:, 2]) / 2.0
    cy = (boxes[:, 1] + boxes[:, 3]) / 2.0
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if x0 > 0:
        keep &= boxes[:, 0] > x0
    if y0 > 0:
        keep &= boxes[:, 1] > y0
    if x1 < grid.width:
        keep &= boxes[:, 2] < x1
    if y1 < grid.height:
        keep &= boxes[:, 3] < y1
    keep &= (cx >= core[0]) & (cx < core[2]) & (cy >= core[1]) & (cy < core[3])
    return Detections(boxes[keep], detections.scores[keep], detections.classes[keep])


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
    """Pixels as uint8 for the model.

    ``NONE`` clips to 0..255 (uint8 input is returned as is); ``MINMAX`` scales the
    ``bits``-bit range (or the dtype's range) to 0..255; ``DRA`` stretches ``stretch``
    (per-band ``(low, high)`` computed once per image, broadcast along the last axis) or else
    the 2nd–98th percentile of the given pixels to 0..255.
    """
    if pixels.dtype == np.uint8 and range_adjustment != "DRA":
        return pixels
    data = np.nan_to_num(pixels.astype(np.float64, copy=False), nan=0.0, posinf=0.0, neginf=0.0)
    if range_adjustment == "DRA" and stretch is not None:
        floor = np.asarray(stretch[0], dtype=np.float64)
        ceiling = np.asarray(stretch[1], dtype=np.float64)
        data = (data - floor) * (255.0 / np.maximum(ceiling - floor, 1e-9))
    elif range_adjustment == "MINMAX":
        if bits:
            top = float(2**bits - 1)
        elif np.issubdtype(pixels.dtype, np.integer):
            top = float(np.iinfo(pixels.dtype).max)
        else:
            top = float(data.max()) or 1.0
        data = data * (255.0 / top)
    elif range_adjustment == "DRA":
        low, high = np.percentile(data, [2, 98]) if data.size else (0.0, 1.0)
        data = (data - low) * (255.0 / max(high - low, 1e-9))
    return np.clip(np.rint(data), 0, 255).astype(np.uint8)
