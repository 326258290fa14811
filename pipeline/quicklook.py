"""Quick looks: an overview of an image of any size with boxes drawn on it, as PNG or on axes.

The overview comes from the file's overviews (GeoTIFF/COG overviews, JPEG 2000 resolution
levels) where it has them, else from a nearest-neighbour decimated read. Either way GDAL
fills a small output array block by block: memory stays bounded, and the full-resolution
image is never loaded. A large image without overviews still has every block read once
(``gdaladdo`` or a COG makes that cheap), and a warning says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import Resampling

from pipeline.reading import ImageError, gdal_env, gdal_path
from pipeline.security import open_raster

log = logging.getLogger(__name__)

#: images larger than this many pixels a side without overviews get a warning
LARGE_WITHOUT_OVERVIEWS = 16384

BOX_COLOURS = ("red", "yellow", "lime", "magenta", "orange", "deepskyblue", "white")


@dataclass(frozen=True)
class Overview:
    """A display-ready view of an image: ``pixels`` (``h × w`` or ``h × w × 3`` uint8) and
    ``scale``, the full-image pixels per overview pixel along each axis ``(sx, sy)``."""

    pixels: np.ndarray
    scale: tuple[float, float]
    from_overviews: bool


def read_overview(url: str, max_side: int = 1024) -> Overview:
    """Read ``url`` decimated so that its longer side is at most ``max_side`` pixels."""
    try:
        with gdal_env(url), open_raster(gdal_path(url)) as src:  # image drivers only
            factor = max(1.0, max(src.width, src.height) / max_side)
            shape = (max(1, round(src.height / factor)), max(1, round(src.width / factor)))
            bands = [1, 2, 3] if src.count >= 3 else [1]
            has_overviews = bool(src.overviews(1))
            if not has_overviews and max(src.width, src.height) > LARGE_WITHOUT_OVERVIEWS:
                log.warning("%s (%dx%d) has no overviews: the quick look reads every block once",
                            url, src.width, src.height)
            # With overviews GDAL reads the closest level; without, nearest touches fewest pixels.
            resampling = Resampling.average if has_overviews else Resampling.nearest
            data = src.read(bands, out_shape=(len(bands), *shape), resampling=resampling,
                            masked=True)
            scale = (src.width / shape[1], src.height / shape[0])
    except rasterio.errors.RasterioIOError as exc:
        text = str(exc).strip().splitlines()
        raise ImageError(f"cannot read an overview of {url}: {text[0] if text else exc}") from None
    return Overview(_stretch(data), scale, has_overviews)


def _stretch(data: np.ma.MaskedArray) -> np.ndarray:
    """The 1st–99th percentile of the valid pixels stretched to 0..255 (nodata stays 0)."""
    values = data.compressed().astype(np.float64)
    low, high = np.percentile(values, [1, 99]) if values.size else (0.0, 1.0)
    filled = data.filled(low).astype(np.float64)
    scaled = np.clip((filled - low) * (255.0 / max(high - low, 1e-9)), 0, 255).astype(np.uint8)
    return np.moveaxis(scaled, 0, -1) if scaled.shape[0] == 3 else scaled[0]


def overview(url: str, max_side: int = 1024) -> tuple[np.ndarray, float]:
    """The overview's pixels and its scale (full-image pixels per overview pixel)."""
    view = read_overview(url, max_side)
    return view.pixels, max(view.scale)


def feature_boxes(features: Any, image_url: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(boxes n × 4, classes n)`` in full-image pixels of the features of ``image_url``
    (every feature if None), from the ``imageBBox`` and ``featureClasses`` columns."""
    if features is None or not len(features):
        return np.empty((0, 4)), np.empty(0, dtype=object)
    if image_url is not None and "image_url" in features:
        from pipeline.redact import public_url

        features = features[features["image_url"] == public_url(image_url)]  # as written
    boxes = np.array(features["imageBBox"].tolist(), dtype=np.float64).reshape(-1, 4)
    if "featureClasses" in features:
        classes = np.array([c[0]["iri"] if c else "" for c in features["featureClasses"]], dtype=object)
    else:
        classes = np.full(len(boxes), "feature", dtype=object)
    return boxes, classes


def draw(ax: Any, image: str | Overview, boxes: Any = None, classes: Any = None, *,
         truth: Any = None, max_side: int = 1024, legend: bool = True) -> Any:
    """Draw the overview of ``image`` (a URL or an :class:`Overview`) on matplotlib ``ax`` with
    ``boxes`` (full-image pixels, one colour per class) and ``truth`` boxes in cyan; the axes
    are in full-image pixels."""
    from matplotlib.collections import PolyCollection

    view = image if isinstance(image, Overview) else read_overview(image, max_side)
    sx, sy = view.scale
    height, width = view.pixels.shape[:2]
    extent = (0, width * sx, height * sy, 0)
    ax.imshow(view.pixels, cmap="gray" if view.pixels.ndim == 2 else None,
              interpolation="nearest", extent=extent)
    layers: list[tuple[np.ndarray, str, str]] = []
    if truth is not None and len(truth):
        layers.append((np.asarray(truth, dtype=np.float64).reshape(-1, 4), "cyan", "truth"))
    boxes = np.asarray(boxes if boxes is not None else np.empty((0, 4)), dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(classes if classes is not None else np.full(len(boxes), ""), dtype=object)
    for k, name in enumerate(dict.fromkeys(labels.tolist())):
        layers.append((boxes[labels == name], BOX_COLOURS[k % len(BOX_COLOURS)], str(name)))
    for drawn, colour, label in layers:
        rings = np.stack([drawn[:, [0, 1]], drawn[:, [2, 1]], drawn[:, [2, 3]], drawn[:, [0, 3]]], axis=1)
        ax.add_collection(PolyCollection(list(rings), facecolors="none", edgecolors=colour,
                                         linewidths=0.8, label=f"{label} ({len(drawn)})"))
    ax.set_xlim(0, width * sx)
    ax.set_ylim(height * sy, 0)
    if legend and any(label for _, _, label in layers):
        ax.legend(loc="upper right", fontsize="small", framealpha=0.6)
    return ax


def quicklook(url: str, boxes: Any, path: str | Path, max_side: int = 1024,
              truth: np.ndarray | None = None, classes: Any = None) -> Path:
    """Write a PNG of the overview of ``url`` (one PNG pixel per overview pixel) with ``boxes``
    (full-image pixels) drawn, one colour per class (red first), and ``truth`` in cyan."""
    from matplotlib.figure import Figure

    view = read_overview(url, max_side)
    height, width = view.pixels.shape[:2]
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    draw(ax, view, boxes, classes, truth=truth, legend=False)
    ax.axis("off")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def job_quicklook(result: Any, path: str | Path, image: str | None = None,
                  max_side: int = 1024) -> Path:
    """Write the quick look of a job's ``image`` (default: its first readable image) with that
    image's features, one colour per class (``model-runner run --quicklook``)."""
    readable = [i["url"] for i in result.summary.get("images", []) if i.get("width")]
    if image is None:
        if not readable:
            raise ImageError("no image of the job could be read")
        image = readable[0]
    boxes, classes = feature_boxes(result.features, image)
    return quicklook(image, boxes, path, max_side=max_side, classes=classes)
