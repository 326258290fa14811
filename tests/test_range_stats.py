"""The one dynamic-range adjustment: its range (per band) and its float32 stretch, checked
against an independent float64 computation, and its peak memory on a full chunk."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from pipeline.range_stats import dynamic_range, stretch
from pipeline.tiling import cut_tiles, to_uint8


def reference(pixels: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """The stretch in float64, written out independently (non-finite pixels as 0)."""
    data = np.nan_to_num(pixels.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    scaled = (data - np.asarray(low, np.float64)) * (255.0 / (np.asarray(high, np.float64) - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.uint8 and got.shape == want.shape
    difference = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert difference.max() <= 1, f"{int(difference.max())} grey levels off"
    assert (difference == 0).mean() > 0.999  # off by one only where float32 rounds a .5 the other way


@pytest.mark.parametrize("dtype", ["uint16", "int16", "float32", "int32", "float64"])
def test_stretch_matches_float64_within_one_grey_level(dtype: str) -> None:
    rng = np.random.default_rng(7)
    base = 1e9 if dtype in ("int32", "float64") else 0.0  # wide values: float32 alone would lose them
    pixels = (base + rng.integers(0, 2047, size=(300, 301, 4))).astype(dtype)
    low = base + np.array([100.0, 37.25, 0.0, 512.5])
    high = base + np.array([1900.0, 1500.75, 2047.0, 600.0])
    if dtype.startswith("float"):
        pixels[0, :3, 0] = [np.nan, np.inf, -np.inf]
    assert_close(stretch(pixels, low, high), reference(pixels, low, high))
    assert_close(to_uint8(pixels, "DRA", 11, (list(low), list(high))), reference(pixels, low, high))


def test_stretch_of_a_strided_tile_view_and_other_modes() -> None:
    rng = np.random.default_rng(3)
    chunk = rng.integers(0, 4096, size=(3, 300, 400), dtype=np.uint16)
    windows = np.array([[0, 0, 256, 256], [100, 0, 356, 256]])
    tiles = cut_tiles(chunk, (0, 0), windows, 256, view=True)
    assert not tiles.flags.writeable  # overlapping read-only view of the chunk
    low, high = np.array([10.0, 20.0, 30.0]), np.array([4000.0, 3000.0, 2000.0])
    assert_close(to_uint8(tiles, "DRA", 12, (low, high)), reference(np.asarray(tiles), low, high))
    assert_close(to_uint8(tiles, "MINMAX", 12), reference(np.asarray(tiles), np.zeros(3), np.full(3, 4095.0)))
    assert_close(to_uint8(tiles, "NONE"), reference(np.asarray(tiles), np.zeros(3), np.full(3, 255.0)))


def test_dra_without_image_statistics_stretches_each_band_by_its_percentiles() -> None:
    rng = np.random.default_rng(5)
    pixels = np.stack([rng.normal(500, 50, (200, 200)), rng.normal(3000, 400, (200, 200))], axis=-1)
    pixels = pixels.astype(np.uint16)
    low = np.percentile(pixels.reshape(-1, 2).astype(np.float64), 2, axis=0)
    high = np.percentile(pixels.reshape(-1, 2).astype(np.float64), 98, axis=0)
    assert dynamic_range(pixels.reshape(-1, 2).T) == (list(low), list(high))
    got = to_uint8(pixels, "DRA")
    assert_close(got, reference(pixels, low, high))
    assert 0 < got[..., 0].mean() < 255 and 0 < got[..., 1].mean() < 255  # each band spread on its own


def test_dra_of_a_chunk_needs_no_float64_copy() -> None:
    """A 4-band 16-bit 4096² chunk: the stretch's peak allocation stays within one float32
    copy plus the uint8 result (it is far below: one 4 MiB working block)."""
    chunk = np.random.default_rng(1).integers(0, 2048, size=(4096, 4096, 4), dtype=np.uint16)
    n = chunk.size
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        out = to_uint8(chunk, "DRA", 11, ([10.0, 20.0, 30.0, 40.0], [2000.0, 1900.0, 1800.0, 1700.0]))
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    bound = 4 * n + n + 16 * 2**20  # one float32 copy + the uint8 result + a margin
    float64_bound = 3 * 8 * n + n  # today's float64 way: about three float64 copies, then uint8
    assert out.dtype == np.uint8 and out.shape == chunk.shape
    assert n <= peak <= bound, (f"peak {peak / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB "
                                f"(a float64 stretch needs about {float64_bound / 2**20:.0f} MiB)")
    assert float64_bound > bound
    sample = (slice(0, 64), slice(None), slice(None))
    low, high = np.array([10.0, 20.0, 30.0, 40.0]), np.array([2000.0, 1900.0, 1800.0, 1700.0])
    assert_close(out[sample], reference(chunk[sample], low, high))
