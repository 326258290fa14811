"""A generated georeferenced demo scene with bright objects planted at known places.

The background is smooth texture that never reaches the ``bright-objects`` threshold; objects
(rectangles and discs smaller than the tile overlap) are planted at random places and, on
purpose, across tile and chunk edges. The truth is each object's tight pixel box.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin

from pipeline.tiling import DEFAULT_CHUNK_TARGET, chunk_size

DEMO_CRS = "EPSG:32617"  # UTM 17N (Florida)
DEMO_ORIGIN = (404_000.0, 3_286_000.0)
DEMO_RESOLUTION = 0.5


@dataclass(frozen=True)
class Scene:
    """A written scene and its truth boxes ``[xmin, ymin, xmax, ymax]`` in pixels."""

    path: Path
    truth: np.ndarray


def _background(size: int, rng: np.random.Generator, bands: int) -> np.ndarray:
    """Smooth terrain-like texture (bilinear upsampled noise plus grain), below 190."""
    step = 48
    coarse = rng.uniform(50, 150, size=(size // step + 2, size // step + 2))
    rows = np.linspace(0, coarse.shape[0] - 1.001, size)
    r0 = rows.astype(int)
    fr = (rows - r0)[:, None]
    fc = (rows - r0)[None, :]
    smooth = (
        coarse[r0][:, r0] * (1 - fr) * (1 - fc)
        + coarse[r0 + 1][:, r0] * fr * (1 - fc)
        + coarse[r0][:, r0 + 1] * (1 - fr) * fc
        + coarse[r0 + 1][:, r0 + 1] * fr * fc
    )
    tint = np.array([0.85, 1.0, 0.75, 0.9, 0.8, 0.7, 0.6, 0.5])[:bands]
    grain = rng.normal(0, 8, size=(bands, size, size))
    return np.clip(smooth[None] * tint[:, None, None] + grain, 0, 190).astype(np.uint8)


def _edge_positions(size: int, tile_size: int, overlap: int, chunk: int) -> np.ndarray:
    stride = tile_size - overlap
    tile_edges = np.arange(stride, size, stride)
    tile_ends = np.arange(tile_size, size, stride)
    chunk_edges = np.arange(chunk, size, chunk)
    return np.unique(np.concatenate([tile_edges, tile_ends, chunk_edges, chunk_edges + overlap]))


def plant_objects(
    size: int,
    count: int,
    rng: np.random.Generator,
    edges: np.ndarray,
    max_extent: int,
) -> list[tuple[str, int, int, int, int]]:
    """Non-touching objects ``(shape, x0, y0, w, h)``; about a third straddle an edge."""
    taken = np.zeros((size // 8 + 1, size // 8 + 1), dtype=bool)
    objects: list[tuple[str, int, int, int, int]] = []
    attempts = 0
    while len(objects) < count and attempts < count * 50:
        attempts += 1
        w, h = (int(v) for v in rng.integers(4, max_extent, size=2))
        x0, y0 = (int(v) for v in rng.integers(2, size - max_extent - 2, size=2))
        if len(edges) and len(objects) % 3 == 0:  # straddle a vertical edge, sometimes both
            x0 = int(rng.choice(edges)) - int(rng.integers(1, w))
            if len(objects) % 2 == 0:
                y0 = int(rng.choice(edges)) - int(rng.integers(1, h))
        if not (1 <= x0 and x0 + w < size - 1 and 1 <= y0 and y0 + h < size - 1):
            continue
        cells = taken[(y0 - 2) // 8 : (y0 + h + 2) // 8 + 1, (x0 - 2) // 8 : (x0 + w + 2) // 8 + 1]
        if cells.any():
            continue
        cells[:] = True
        objects.append(("disc" if rng.random() < 0.4 else "rect", x0, y0, w, h))
    return objects


#: chunks of the demo job: its 4096² scene makes 2 × 2 chunks (one chunk at the default), so
#: that both workers of a 2-core machine have work and objects straddle chunk edges
DEMO_CHUNK_TARGET = 2048


def write_scene(
    path: str | Path,
    size: int = 4096,
    count: int = 150,
    tile_size: int = 512,
    overlap: int = 64,
    bands: int = 3,
    seed: int = 7,
    chunk_target: int = DEFAULT_CHUNK_TARGET,
) -> Scene:
    """Write a tiled, compressed GeoTIFF with overviews (a COG layout) and return its truth;
    some objects straddle the tile edges and the edges of chunks of ``chunk_target``."""
    rng = np.random.default_rng(seed)
    pixels = _background(size, rng, bands)
    edges = _edge_positions(size, tile_size, overlap, chunk_size(tile_size, overlap, chunk_target))
    max_extent = max(6, min(40, overlap - 4))
    truth = []
    for shape, x0, y0, w, h in plant_objects(size, count, rng, edges, max_extent):
        yy, xx = np.mgrid[0:h, 0:w]
        if shape == "disc":
            mask = ((xx + 0.5 - w / 2) / (w / 2)) ** 2 + ((yy + 0.5 - h / 2) / (h / 2)) ** 2 <= 1.0
        else:
            mask = np.ones((h, w), dtype=bool)
        value = int(rng.integers(225, 256))
        for band in range(bands):
            pixels[band, y0 : y0 + h, x0 : x0 + w][mask] = value
        rows, cols = np.nonzero(mask)
        truth.append([x0 + cols.min(), y0 + rows.min(), x0 + cols.max() + 1, y0 + rows.max() + 1])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": bands,
        "dtype": "uint8",
        "crs": DEMO_CRS,
        "transform": from_origin(*DEMO_ORIGIN, DEMO_RESOLUTION, DEMO_RESOLUTION),
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "deflate",
        "interleave": "pixel",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels)
        dst.build_overviews([2, 4, 8, 16], rasterio.enums.Resampling.average)
    return Scene(path, np.array(truth, dtype=np.float64).reshape(-1, 4))


def match_truth(found: np.ndarray, truth: np.ndarray) -> tuple[int, int, int]:
    """``(matched truth objects, duplicate features, features matching no object)``:
    a feature matches an object when its box equals the object's box exactly."""
    if not len(found):
        return 0, 0, 0
    keys = {tuple(box): k for k, box in enumerate(truth.tolist())}
    hits = [keys.get(tuple(box)) for box in np.asarray(found, dtype=np.float64).tolist()]
    matched = [h for h in hits if h is not None]
    return len(set(matched)), len(matched) - len(set(matched)), hits.count(None)
