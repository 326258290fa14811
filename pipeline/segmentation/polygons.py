"""Polygon output: class regions → polygons, dissolved across chunk seams, geolocated.

Per chunk and polygon class, the 4-connected regions of the chunk's class raster become one
polygon each (``rasterio.features.shapes``, holes included), with the sum of the class's
probability over the region and its pixel count. A region whose bounds reach an edge of its
chunk that is not an image edge may continue in the neighbouring chunk: those are *seam*
regions, and per class they are dissolved (``shapely.coverage_union_all`` of regions that only
share edges) into whole regions, each one polygon, their sums and counts added. Then the
optional simplification (pixels) and minimum area (m²), and the features: class, score = the
mean probability inside, ``area_m2`` (WGS84, of the geolocated polygon) in
``modelProperties``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
from rasterio import features
from scipy import ndimage

from pipeline.detections import Detections, model_extras
from pipeline.sensor_models import SensorModel

FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


@dataclass
class Regions:
    """Polygons (full-image pixels) of one class, with probability sums and pixel counts."""

    class_index: np.ndarray
    polygons: np.ndarray
    sums: np.ndarray
    counts: np.ndarray
    seam: np.ndarray  # True: may continue in a neighbouring chunk

    @classmethod
    def empty(cls) -> Regions:
        return cls(np.empty(0, np.int64), np.empty(0, object), np.empty(0), np.empty(0, np.int64),
                   np.empty(0, bool))

    @classmethod
    def concat(cls, parts: list[Regions]) -> Regions:
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate([getattr(p, f) for p in parts])
                     for f in ("class_index", "polygons", "sums", "counts", "seam")))

    def __len__(self) -> int:
        return len(self.polygons)

    def select(self, keep: np.ndarray) -> Regions:
        return Regions(self.class_index[keep], self.polygons[keep], self.sums[keep], self.counts[keep],
                       self.seam[keep])


def chunk_regions(classes: np.ndarray, scores: np.ndarray | None, bounds: tuple[int, int, int, int],
                  image_size: tuple[int, int], polygon_classes: list[int]) -> Regions:
    """The regions of ``polygon_classes`` in one chunk's class raster (``bounds`` in the image;
    ``scores`` None: the one-hot of ``classes``)."""
    x0, y0, x1, y1 = bounds
    width, height = image_size
    parts = []
    for k in polygon_classes:
        mask = classes == k
        labels, count = ndimage.label(mask, structure=FOUR_CONNECTED)
        if not count:
            continue
        flat = np.flatnonzero(mask)  # the class's pixels only: sparse classes cost little
        rows, cols = np.divmod(flat, mask.shape[1])
        inside = labels.ravel()[flat]
        counts = np.bincount(inside, minlength=count + 1)[1:]
        sums = (counts.astype(np.float64) if scores is None  # one-hot: probability 1 inside
                else np.bincount(inside, weights=scores[k][rows, cols], minlength=count + 1)[1:])
        polygons = region_polygons(labels, counts, rows, cols, inside, (x0, y0))
        box = shapely.bounds(polygons)
        seam = (((box[:, 0] <= x0) & (x0 > 0)) | ((box[:, 1] <= y0) & (y0 > 0))
                | ((box[:, 2] >= x1) & (x1 < width)) | ((box[:, 3] >= y1) & (y1 < height)))
        parts.append(Regions(np.full(count, k), polygons, sums, counts, seam))
    return Regions.concat(parts)


#: pack regions into a canvas while their boxes cover less than this share of the chunk
PACK_BELOW = 0.5


def region_polygons(labels: np.ndarray, counts: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                    inside: np.ndarray, origin: tuple[int, int]) -> np.ndarray:
    """One polygon per label ``1 .. len(counts)`` of ``labels`` (4-connected regions of
    ``counts`` pixels; ``rows``, ``cols``: the labelled pixels in row-major order, ``inside``
    their labels), in pixels
    from ``origin``. ``rasterio.features.shapes`` costs ~10 ns per pixel it scans, labelled or
    not, so where the regions' boxes cover little of the chunk each region's box is copied
    into a canvas of boxes side by side (:func:`shelf_pack`) and the canvas is traced instead:
    a region's pixels, and so its rings, are the same in its box as in the chunk."""
    count = len(counts)
    order = np.argsort(inside, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    top, bottom = np.minimum.reduceat(rows[order], starts), np.maximum.reduceat(rows[order], starts) + 1
    left, right = np.minimum.reduceat(cols[order], starts), np.maximum.reduceat(cols[order], starts) + 1
    heights, widths = bottom - top, right - left
    if int((heights * widths).sum()) >= PACK_BELOW * labels.size:
        return traced(features.shapes(labels, mask=labels > 0, connectivity=4), count,
                      np.zeros((count, 2)) - origin)
    at_x, at_y, canvas_height = shelf_pack(widths, heights)
    canvas = np.zeros((canvas_height, int((at_x + widths).max())), np.int32)
    shift_x, shift_y = at_x - left, at_y - top  # chunk pixel + shift = canvas pixel, per region
    canvas[rows + shift_y[inside - 1], cols + shift_x[inside - 1]] = inside
    return traced(features.shapes(canvas, mask=canvas > 0, connectivity=4), count,
                  np.column_stack([shift_x - origin[0], shift_y - origin[1]]))


def traced(shapes: Iterable[tuple[dict[str, Any], float]], count: int, shifts: np.ndarray) -> np.ndarray:
    """The polygons of ``rasterio.features.shapes`` (one per label ``1 .. count``), each moved
    by minus its label's ``shifts`` row, built at once from their rings (``shapely.geometry.shape``
    per polygon costs ~6x more)."""
    rings: list[np.ndarray] = []
    owners: list[int] = []
    for geometry, label in shapes:
        for ring in geometry["coordinates"]:
            rings.append(np.asarray(ring, dtype=np.float64))
            owners.append(int(label) - 1)
    owner = np.asarray(owners, dtype=np.int64)
    order = np.argsort(owner, kind="stable")  # by polygon, each polygon's shell first
    sizes = np.array([len(r) for r in rings], dtype=np.int64)[order]
    coords = np.concatenate([rings[k] for k in order.tolist()])
    coords -= np.repeat(shifts[owner[order]], sizes, axis=0)
    linear = shapely.linearrings(coords, indices=np.repeat(np.arange(len(order)), sizes))
    polygons = np.empty(count, dtype=object)
    polygons[:] = shapely.polygons(linear, indices=owner[order])
    return polygons


def shelf_pack(widths: np.ndarray, heights: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Places ``(x, y)`` for boxes side by side in shelves (tallest first) no wider than the
    widest box or the square root of their total area, and the canvas height."""
    shelf_width = max(int(widths.max()), int(np.sqrt(float((widths * heights).sum()))))
    at_x, at_y = np.zeros(len(widths), np.int64), np.zeros(len(widths), np.int64)
    x = y = shelf = 0
    for k in np.argsort(-heights, kind="stable").tolist():
        if x + widths[k] > shelf_width:
            x, y, shelf = 0, y + shelf, 0
        at_x[k], at_y[k] = x, y
        x, shelf = x + int(widths[k]), max(shelf, int(heights[k]))
    return at_x, at_y, y + shelf


def dissolve(regions: Regions) -> Regions:
    """Seam regions of each class united into whole regions (sums and counts added)."""
    whole = regions.select(~regions.seam)
    seams = regions.select(regions.seam)
    merged = [whole]
    for k in np.unique(seams.class_index):
        group = seams.select(seams.class_index == k)
        united = shapely.get_parts(shapely.union_all(group.polygons, grid_size=1.0))
        # each seam region lies in exactly one united region: the one holding a point inside it
        index = shapely.STRtree(united).query(shapely.point_on_surface(group.polygons),
                                              predicate="intersects")
        owner = np.full(len(group), -1)
        owner[index[0]] = index[1]
        sums = np.bincount(owner, weights=group.sums, minlength=len(united))
        counts = np.bincount(owner, weights=group.counts, minlength=len(united)).astype(np.int64)
        merged.append(Regions(np.full(len(united), k), united, sums, counts, np.zeros(len(united), bool)))
    return Regions.concat(merged)


#: WGS84's semi-major axis (m) and first eccentricity squared
WGS84_A, WGS84_E2 = 6378137.0, 6.69437999014e-3


def ground_area(polygons: np.ndarray, model: SensorModel) -> np.ndarray:
    """Areas (m², WGS84) of pixel polygons geolocated through ``model`` (NaN where the image
    is not georeferenced): each polygon's lon/lat area times the ellipsoid's local scale at its
    centroid's latitude (meridional × prime-vertical radius × cos φ), vectorised; within 1e-6
    of pyproj's geodesic area for polygons up to ~10 km across."""
    if not model.georeferenced:
        return np.full(len(polygons), np.nan)

    def through(xy: np.ndarray) -> np.ndarray:
        lon, lat = model.pixel_to_lonlat(xy[:, 0], xy[:, 1])
        return np.column_stack([lon, lat])

    ground = shapely.transform(polygons, through)
    phi = np.radians(shapely.get_y(shapely.centroid(ground)))
    s = 1 - WGS84_E2 * np.sin(phi) ** 2
    meridional, prime_vertical = WGS84_A * (1 - WGS84_E2) / s**1.5, WGS84_A / np.sqrt(s)
    return np.asarray(shapely.area(ground) * meridional * prime_vertical * np.cos(phi) * (np.pi / 180) ** 2)


def to_detections(regions: Regions, class_names: tuple[str, ...], model: SensorModel,
                  simplify: float = 0.0, min_area: float = 0.0) -> Detections:
    """The regions as detections: their polygons as shapes (pixels), bounds as boxes, class
    name, mean probability as score, ``area_m2`` (pixels² where not georeferenced)."""
    polygons = regions.polygons
    if simplify > 0 and len(polygons):
        polygons = shapely.simplify(polygons, simplify, preserve_topology=True)
    area = ground_area(polygons, model)
    if not model.georeferenced:
        area = shapely.area(polygons)
    keep = area >= min_area
    polygons, area = polygons[keep], area[keep]
    regions = regions.select(keep)
    scores = regions.sums / np.maximum(regions.counts, 1)
    extras: list[Any] = [model_extras(properties={"area_m2": float(a), "pixels": int(n)})
                         for a, n in zip(area, regions.counts, strict=True)]
    names = np.array([class_names[k] for k in regions.class_index], dtype=object)
    return Detections(shapely.bounds(polygons).reshape(-1, 4), scores, names, list(polygons), extras)
