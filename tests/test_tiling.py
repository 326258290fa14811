"""Tile grids, chunks and the ownership rule (pure functions, no Dask)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.detections import Detections
from pipeline.infer import batches, detect_chunk
from pipeline.models import ModelSpec
from pipeline.tiling import TileGrid, chunk_count, chunk_size, cut_tiles, tile_count, tile_origins, to_uint8


@pytest.mark.parametrize(
    ("length", "tile", "overlap", "expected"),
    [(1024, 1024, 50, 1), (1025, 1024, 50, 2), (100, 1024, 50, 1), (1998, 1024, 50, 2),
     (1999, 1024, 50, 3), (231, 64, 0, 4), (191, 64, 16, 4)],
)
def test_tile_count(length: int, tile: int, overlap: int, expected: int) -> None:
    assert tile_count(length, tile, overlap) == expected


@pytest.mark.parametrize(("width", "height"), [(231, 191), (1, 1), (65, 64), (1000, 3), (129, 257)])
@pytest.mark.parametrize(("tile", "overlap"), [(64, 0), (64, 16), (50, 49), (32, 5)])
def test_every_pixel_covered_and_edges_at_image_edges(width, height, tile, overlap) -> None:
    chunk = chunk_size(tile, overlap, target=100)
    grid = TileGrid(width, height, tile, overlap, chunk)
    windows = np.concatenate(
        [grid.chunk_tiles(r, c) for r in range(grid.chunks_y) for c in range(grid.chunks_x)]
    )
    assert len(windows) == grid.n_tiles == len(np.unique(windows, axis=0))
    covered = np.zeros((height, width), dtype=int)
    for x0, y0, x1, y1 in windows:
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert x1 - x0 <= tile and y1 - y0 <= tile
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1
    assert windows[:, 2].max() == width and windows[:, 3].max() == height
    # the cores partition the plane: every pixel centre is in exactly one core
    cores = grid.cores(windows)
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    count = np.zeros_like(covered)
    for cx0, cy0, cx1, cy1 in cores:
        count += (xs >= cx0) & (xs < cx1) & (ys >= cy0) & (ys < cy1)
    assert (count == 1).all()


@pytest.mark.parametrize(("n_tiles", "per_chunk", "expected"),
                         [(1, 4, 1), (3, 4, 1), (4, 4, 1), (5, 4, 1), (6, 4, 1), (7, 4, 2), (8, 4, 2),
                          (17, 4, 4), (206, 4, 51), (9, 2, 4), (10, 3, 3), (11, 3, 4)])
def test_a_remainder_of_at_most_half_a_chunk_joins_the_last_chunk(n_tiles, per_chunk, expected) -> None:
    assert chunk_count(n_tiles, per_chunk) == expected


@pytest.mark.parametrize(("width", "height"), [(16384, 16384), (1300, 1000), (4000, 900), (100, 100)])
def test_chunks_partition_the_image_and_none_is_empty(width, height) -> None:
    grid = TileGrid(width, height, 256, 40, 432)
    covered = np.zeros((height, width), dtype=np.int8)
    for row in range(grid.chunks_y):
        for col in range(grid.chunks_x):
            x0, y0, x1, y1 = grid.chunk_bounds(row, col)
            covered[y0:y1, x0:x1] += 1
            tiles = grid.chunk_tiles(row, col)
            assert 0 < len(tiles) <= (3 * 2 // 2) ** 2  # at most 1.5 chunks of 2 tiles a side
            assert (tiles[:, 0] >= x0).all() and (tiles[:, 0] < x1).all()  # tiles start inside
            assert (tiles[:, 1] >= y0).all() and (tiles[:, 1] < y1).all()
    assert (covered == 1).all()


def test_one_pixel_wide_last_column_of_tiles() -> None:
    grid = TileGrid(129, 64, 64, 0, 64)
    assert list(tile_origins(129, 64, 0)) == [0, 64, 128]
    last = grid.chunk_tiles(0, 2)
    assert last.tolist() == [[128, 0, 129, 64]]


def test_chunk_holds_whole_strides() -> None:
    assert chunk_size(1024, 50) % 974 == 0
    assert chunk_size(512, 64) == 9 * 448
    with pytest.raises(ValueError):
        TileGrid(100, 100, 64, 16, 50)


def test_cut_tiles_pads_edge_tiles_with_zeros() -> None:
    chunk = np.arange(2 * 10 * 12, dtype=np.uint8).reshape(2, 10, 12) + 1
    batch = cut_tiles(chunk, (100, 200), np.array([[104, 202, 112, 210]]), 16)
    assert batch.shape == (1, 16, 16, 2)
    assert (batch[0, :8, :8, 1] == chunk[1, 2:10, 4:12]).all()
    assert (batch[0, 8:] == 0).all() and (batch[0, :, 8:] == 0).all()


def test_to_uint8() -> None:
    data = np.array([0, 1023, 2047, 4095], dtype=np.uint16)
    assert to_uint8(data, "MINMAX", bits=11).tolist() == [0, 127, 255, 255]
    assert to_uint8(data, "NONE").tolist() == [0, 255, 255, 255]
    assert to_uint8(np.array([np.nan, np.inf, 7.4])).tolist() == [0, 0, 7]


def _planted(width: int, height: int, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    image = np.full((1, height, width), 20, dtype=np.uint8)
    for x0, y0, x1, y1 in boxes:
        image[0, y0:y1, x0:x1] = 250
    return image


def _run_chunks(image: np.ndarray, grid: TileGrid) -> Detections:
    spec = ModelSpec("BUILTIN", "bright-objects")
    parts = []
    for row in range(grid.chunks_y):
        for col in range(grid.chunks_x):
            x0, y0, x1, y1 = grid.chunk_window(row, col)
            pixels = image[:, y0:y1, x0:x1]
            parts.append(detect_chunk(pixels, (x0, y0), (row, col), grid, spec).detections)
    return Detections.concat(parts)


def grid_edges(grid: TileGrid, axis: str) -> list[int]:
    """Every tile edge and chunk edge of one axis of ``grid`` (inside the grid)."""
    a = grid.x if axis == "x" else grid.y
    n_chunks = grid.chunks_x if axis == "x" else grid.chunks_y
    chunk_starts = [int(a.origins[k * grid.tiles_per_chunk]) for k in range(1, n_chunks)]
    return sorted(set(a.origins[1:].tolist()) | set(a.ends[:-1].tolist()) | set(chunk_starts))


def planted_at_edges(grid: TileGrid, size: int) -> list[tuple[int, int, int, int]]:
    """Non-touching ``size`` squares straddling every tile and chunk edge of ``grid`` (both axes)
    and at the grid's corners, all inside the grid's extent."""
    gx0, gy0, gx1, gy1 = grid.extent
    boxes = []
    for k, edge in enumerate(grid_edges(grid, "x")):
        y = gy0 + 5 + (k * 37) % max(1, gy1 - gy0 - size - 10)
        boxes.append((edge - size // 2, y, edge - size // 2 + size, y + size - 1))
    for k, edge in enumerate(grid_edges(grid, "y")):
        x = gx0 + 7 + (k * 53) % max(1, gx1 - gx0 - size - 10)
        boxes.append((x, edge - size // 2, x + size - 1, edge - size // 2 + size))
    boxes += [(gx0, gy0, gx0 + 5, gy0 + 5), (gx1 - 6, gy1 - 4, gx1, gy1)]
    inside = [b for b in boxes if b[0] >= gx0 and b[1] >= gy0 and b[2] <= gx1 and b[3] <= gy1]
    return _non_touching(inside)


@pytest.mark.parametrize("strategy", ["FIXED_STRIDE", "VARIABLE_OVERLAP"])
@pytest.mark.parametrize(("tile", "overlap", "chunk_target"),
                         [(64, 16, 100), (64, 20, 48), (50, 18, 200), (40, 17, 23)])
def test_objects_across_tile_and_chunk_edges_found_exactly_once(tile, overlap, chunk_target,
                                                                strategy) -> None:
    width, height = 300, 260
    grid = TileGrid(width, height, tile, overlap, chunk_size(tile, overlap, chunk_target), strategy)
    boxes = planted_at_edges(grid, overlap - 3)
    assert len(boxes) > len(grid_edges(grid, "x"))  # most edges have their object
    found = _run_chunks(_planted(width, height, boxes), grid)
    expected = sorted(tuple(float(v) for v in b) for b in boxes)
    assert sorted(map(tuple, found.boxes.tolist())) == expected


def _non_touching(boxes: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    kept: list[tuple[int, int, int, int]] = []
    for b in boxes:
        if all(b[2] + 1 < k[0] or k[2] + 1 < b[0] or b[3] + 1 < k[1] or k[3] + 1 < b[1] for k in kept):
            kept.append(b)
    return kept


def test_whole_tiles_of_a_row_are_a_read_only_view_equal_to_a_copy() -> None:
    grid = TileGrid(1000, 700, 128, 16, chunk_size(128, 16, 400))
    x0, y0, x1, y1 = grid.chunk_window(0, 0)
    band_last = np.random.default_rng(3).integers(0, 255, (y1 - y0, x1 - x0, 3), dtype=np.uint8)
    chunk = np.moveaxis(band_last, -1, 0)  # how chunk reads land: band-last memory
    windows = grid.chunk_tiles(0, 0)
    assert [b - a for a, b in batches(windows, 3)] == [3] * (len(windows) // 3) + (
        [len(windows) % 3] if len(windows) % 3 else [])  # contiguous batches across rows by default
    starts = list(batches(windows, 3, by_row=True))
    assert all(len(set(windows[a:b, 1])) == 1 for a, b in starts)  # no batch across tile rows
    assert sum(b - a for a, b in starts) == len(windows) and max(b - a for a, b in starts) == 3
    for start, stop in starts:
        assert cut_tiles(chunk, (x0, y0), windows[start:stop], 128).flags.writeable  # a copy
        batch = cut_tiles(chunk, (x0, y0), windows[start:stop], 128, view=True)
        copy = np.stack([band_last[wy0 - y0 : wy1 - y0, wx0 - x0 : wx1 - x0]
                         for wx0, wy0, wx1, wy1 in windows[start:stop]])
        np.testing.assert_array_equal(batch, copy)
        assert np.shares_memory(batch, band_last) and not batch.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            batch[0, 0, 0, 0] = 1
    # clipped edge tiles (zero-padded) and batches across rows are copies
    edge = grid.chunk_tiles(grid.chunks_y - 1, grid.chunks_x - 1)
    ex0, ey0, ex1, ey1 = grid.chunk_window(grid.chunks_y - 1, grid.chunks_x - 1)
    pixels = np.ones((3, ey1 - ey0, ex1 - ex0), dtype=np.uint8)
    padded = cut_tiles(pixels, (ex0, ey0), edge[-1:], 128, view=True)
    assert padded.flags.writeable and padded[0, -1, -1, 0] == 0
    across = cut_tiles(chunk, (x0, y0), windows[[0, -1]], 128, view=True)
    assert across.flags.writeable and not np.shares_memory(across, band_last)
    # in a row that ends at the image edge, the whole tiles are a batch of their own (a view)
    sizes = [(edge[a:b, 2] - edge[a:b, 0]).tolist() for a, b in batches(edge, 8, by_row=True, tile_size=128)]
    assert sizes[:2] == [[128] * (len(sizes[0])), [1000 - edge[len(sizes[0]), 0]]] and len(sizes[0]) > 1
