"""Regions of interest: a lon/lat WKT polygon mapped into an image's pixels through its
sensor model, the chunks it touches, and the detections inside it."""

from __future__ import annotations

from typing import Any

import numpy as np
import shapely

from pipeline.detections import Detections
from pipeline.reading import ImageError
from pipeline.sensor_models import SensorModel
from pipeline.tiling import TileGrid

#: boundary vertices (about) per ROI before it is mapped through a sensor model
DENSIFY_VERTICES = 256


def roi_pixels(wkt: str, model: SensorModel, width: int, height: int, url: str) -> Any:
    """The ROI ``wkt`` (lon/lat) as a pixel-space polygon clipped to the image.

    The boundary is densified first, so that curved mappings (RPC) stay accurate. Raises
    :class:`ImageError` if the image is not georeferenced or the ROI misses it.
    """
    if not model.georeferenced:
        raise ImageError(f"regionOfInterest needs a georeferenced image: {url} has none")
    ground = shapely.from_wkt(wkt)
    xmin, ymin, xmax, ymax = ground.bounds
    step = max(xmax - xmin, ymax - ymin) * 4 / DENSIFY_VERTICES or 1e-6
    ground = shapely.segmentize(ground, step)

    def to_pixels(coords: np.ndarray) -> np.ndarray:
        x, y = model.lonlat_to_pixel(coords[:, 0], coords[:, 1])
        return np.column_stack([x, y])

    pixels = shapely.make_valid(shapely.transform(ground, to_pixels))
    inside = shapely.intersection(pixels, shapely.box(0, 0, width, height))
    if inside.is_empty or inside.area <= 0:
        raise ImageError(f"regionOfInterest does not intersect image {url}")
    return inside


def chunk_mask(roi: Any, grid: TileGrid) -> np.ndarray:
    """``(chunks_y, chunks_x)`` booleans: which chunks' tile windows touch the ROI."""
    rows, cols = np.meshgrid(np.arange(grid.chunks_y), np.arange(grid.chunks_x), indexing="ij")
    windows = np.array([grid.chunk_window(int(r), int(c))
                        for r, c in zip(rows.ravel(), cols.ravel(), strict=True)])
    boxes = shapely.box(windows[:, 0], windows[:, 1], windows[:, 2], windows[:, 3])
    return np.asarray(shapely.intersects(boxes, roi)).reshape(rows.shape)


def tiles_in(mask: np.ndarray | None, grid: TileGrid) -> int:
    """Tiles of the chunks that ``mask`` selects (all tiles without a mask)."""
    if mask is None:
        return grid.n_tiles
    return sum(grid.chunk_tile_count(int(r), int(c)) for r, c in np.argwhere(mask))


def keep_in_roi(detections: Detections, roi: Any) -> Detections:
    """The detections whose boxes intersect the pixel-space ROI."""
    if roi is None or not len(detections):
        return detections
    b = detections.boxes
    inside = shapely.intersects(shapely.box(b[:, 0], b[:, 1], b[:, 2], b[:, 3]), roi)
    return detections.select(np.asarray(inside, dtype=bool))
