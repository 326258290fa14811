"""Polygons that cross the antimeridian, cut as RFC 7946 asks (§3.1.9).

A sensor model gives longitudes in ``[-180, 180)``, so a ring that crosses ±180 jumps by about
360° between two corners. :func:`crosses` finds those rings (vectorised), :func:`unwrap` makes
their longitudes continuous, and :func:`split` cuts such a continuous polygon into the parts
that lie east and west of the line, each shifted back into ``[-180, 180]``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import shapely

# The world, and its copies one turn to the west and east: a continuous ring lies within these.
_SHIFTS = (-360.0, 0.0, 360.0)
_WINDOWS = [shapely.box(-180.0 - shift, -90.0, 180.0 - shift, 90.0) for shift in _SHIFTS]


def crosses(lon: np.ndarray) -> np.ndarray:
    """Which rows of ``N × K`` ring longitudes (wrapped) jump across the antimeridian."""
    lon = np.asarray(lon, dtype=np.float64)
    if lon.size == 0:
        return np.zeros(len(lon), dtype=bool)
    return np.asarray(np.abs(np.diff(lon, axis=-1)).max(axis=-1) > 180.0)


def unwrap(lon: np.ndarray) -> np.ndarray:
    """Longitudes made continuous along the last axis (no jumps of more than 180°)."""
    return np.rad2deg(np.unwrap(np.deg2rad(np.asarray(lon, dtype=np.float64)), axis=-1))


def split(geometry: Any) -> Any:
    """A polygon with continuous longitudes, cut at ±180 into a (Multi)Polygon within
    ``[-180, 180]``, counter-clockwise. A polygon that does not cross is returned as it is."""
    parts: list[Any] = []
    for shift, window in zip(_SHIFTS, _WINDOWS, strict=True):
        part = shapely.intersection(geometry, window)
        polygons = [p for p in shapely.get_parts(part) if isinstance(p, shapely.Polygon) and p.area > 0]
        parts.extend(shapely.transform(p, lambda xy, s=shift: xy + [s, 0.0]) for p in polygons)
    if len(parts) <= 1:
        return shapely.orient_polygons(parts[0] if parts else geometry)
    return shapely.orient_polygons(shapely.MultiPolygon(parts))
