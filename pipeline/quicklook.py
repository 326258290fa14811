"""Quick-look PNGs: an overview of the image (decimated read, never a full read) with boxes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling

from pipeline.io import gdal_env, gdal_path


def overview(url: str, max_side: int = 1024) -> tuple[np.ndarray, float]:
    """A decimated ``(h, w, 3)`` or ``(h, w)`` uint8 view of ``url`` and its scale factor.

    GDAL serves the read from the file's overviews where it has them.
    """
    with gdal_env(url), rasterio.open(gdal_path(url)) as src:
        scale = max(1.0, max(src.width, src.height) / max_side)
        shape = (max(1, int(src.height / scale)), max(1, int(src.width / scale)))
        bands = [1, 2, 3] if src.count >= 3 else [1]
        data = src.read(bands, out_shape=(len(bands), *shape), resampling=Resampling.average)
    data = data.astype(np.float64)
    low, high = np.percentile(data, [1, 99]) if data.size else (0.0, 1.0)
    scaled = np.clip((data - low) * (255.0 / max(high - low, 1e-9)), 0, 255).astype(np.uint8)
    image = np.moveaxis(scaled, 0, -1) if len(bands) == 3 else scaled[0]
    return image, scale


def quicklook(url: str, boxes: np.ndarray, path: str | Path, max_side: int = 1024,
              truth: np.ndarray | None = None) -> Path:
    """Write a PNG of ``url`` with ``boxes`` (full-image pixels) drawn in red (truth in cyan)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

    image, scale = overview(url, max_side)
    height, width = image.shape[:2]
    fig = plt.figure(figsize=(width / 100, height / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
    for drawn, colour in ((truth, "cyan"), (boxes, "red")):
        if drawn is None or not len(drawn):
            continue
        b = np.asarray(drawn, dtype=np.float64) / scale
        rings = np.stack([b[:, [0, 1]], b[:, [2, 1]], b[:, [2, 3]], b[:, [0, 3]]], axis=1)
        ax.add_collection(PolyCollection(rings, facecolors="none", edgecolors=colour, linewidths=0.8))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
