"""Sensor models: pixel ``(x, y)`` ↔ lon/lat for geolocation and regions of interest.

:func:`sensor_model` picks the best model an image's header offers (RPC, affine, GCPs, else
pixel space); :func:`footprint` is the image outline; :func:`elevation_model` and
:func:`dem_heights` set an RPC's ground heights (a constant, or a DEM whose orthometric heights
are made ellipsoidal where a geoid grid is at hand).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

import numpy as np
from affine import Affine
from pyproj import CRS, Transformer

from pipeline.reading import ImageInfo, gdal_env, gdal_error_line, gdal_path, rasterio_env, read_options
from pipeline.security import open_raster

log = logging.getLogger(__name__)

WGS84 = CRS.from_epsg(4326)


class SensorModel(Protocol):
    """Pixel ``(x, y)`` (the pixel convention of :mod:`pipeline.detections`) to lon/lat.

    ``kind`` is ``RPC``, ``AFFINE``, ``GCP`` or ``PIXEL``; ``lonlat_to_pixel`` is the inverse
    (used for regions of interest).
    """

    @property
    def georeferenced(self) -> bool: ...

    @property
    def kind(self) -> str: ...

    def pixel_to_lonlat(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ...

    def lonlat_to_pixel(self, lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ...


def _floats(*arrays: Any) -> list[np.ndarray]:
    return [np.atleast_1d(np.asarray(a, dtype=np.float64)) for a in arrays]


@dataclass(frozen=True)
class PixelSensorModel:
    """No georeferencing: coordinates stay in pixels."""

    georeferenced: bool = False
    kind: str = "PIXEL"

    def pixel_to_lonlat(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)

    def lonlat_to_pixel(self, lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(lon, dtype=np.float64), np.asarray(lat, dtype=np.float64)


def _is_wgs84(crs: CRS) -> bool:
    return bool(crs.equals(WGS84) or (crs.is_geographic and crs.geodetic_crs == WGS84.geodetic_crs))


@lru_cache(maxsize=64)
def crs_from_wkt(wkt: str) -> CRS:
    """``CRS.from_wkt``, once per WKT in a process (a parse took ~0.5 ms; a job's images and
    its summary ask for the same few CRSs again and again)."""
    return CRS.from_wkt(wkt)


@lru_cache(maxsize=64)
def _wkt_is_wgs84(wkt: str) -> bool:
    return _is_wgs84(crs_from_wkt(wkt))


@dataclass(frozen=True)
class AffineSensorModel:
    """An affine geotransform in a CRS: pixel corners map through it as they are (GDAL)."""

    transform: tuple[float, ...]
    crs_wkt: str
    georeferenced: bool = True
    kind: str = "AFFINE"

    def pixel_to_lonlat(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a, b, c, d, e, f = self.transform[:6]
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        map_x = a * x + b * y + c
        map_y = d * x + e * y + f
        if _wkt_is_wgs84(self.crs_wkt):
            return wrap_longitude(map_x), map_y
        transformer = Transformer.from_crs(crs_from_wkt(self.crs_wkt), WGS84, always_xy=True)
        lon, lat = transformer.transform(map_x, map_y)
        return np.asarray(lon), np.asarray(lat)

    def lonlat_to_pixel(self, lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lon, lat = _floats(lon, lat)
        if _wkt_is_wgs84(self.crs_wkt):
            map_x, map_y = lon, lat
        else:
            to_map = Transformer.from_crs(WGS84, crs_from_wkt(self.crs_wkt), always_xy=True)
            map_x, map_y = to_map.transform(lon, lat)
        inverse = ~self.affine
        x, y = inverse * (np.asarray(map_x), np.asarray(map_y))
        return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)

    @property
    def affine(self) -> Affine:
        return Affine(*self.transform[:6])


def _affine(t: tuple[float, ...], x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b, c, d, e, f = t[:6]
    return a * x + b * y + c, d * x + e * y + f


@dataclass(frozen=True)
class RPCSensorModel:
    """A rational polynomial camera (GDAL's RPC transformer, vectorised over points).

    Ground heights: ``height`` metres (ellipsoidal, default the RPC's ``HEIGHT_OFF``), or a
    DEM (``dem``, a GDAL path, sampled at each point; GDAL iterates to convergence) whose
    heights ``dem_heights`` makes ellipsoidal (see :func:`dem_heights`). ``chip`` is the
    affine from this image's pixels to the full image the RPC was made for (NITF ICHIPB),
    applied before the RPC is evaluated.
    """

    rpcs: dict[str, Any]
    height: float | None = None
    dem: str | None = None
    options: dict[str, str] = field(default_factory=dict, repr=False)
    chip: tuple[float, ...] | None = None
    dem_heights: DemHeights | None = None
    georeferenced: bool = True
    kind: str = "RPC"

    @property
    def effective_height(self) -> float:
        return float(self.height if self.height is not None else self.rpcs["height_off"])

    def _transformer(self) -> Any:
        from rasterio.rpc import RPC
        from rasterio.transform import RPCTransformer

        # GDAL inverts the RPC iteratively; its default 0.1-pixel stop leaves centimetres
        kwargs: dict[str, Any] = {"RPC_PIXEL_ERROR_THRESHOLD": 1e-4, "RPC_MAX_ITERATIONS": 50}
        if self.dem:
            # our geoid offset (RPC_HEIGHT is added to each DEM height), never GDAL's own
            # vertical shift, which PROJ makes a silent no-op without the geoid grid
            offset = self.dem_heights.offset if self.dem_heights else 0.0
            kwargs.update(RPC_DEM=self.dem, RPC_DEMINTERPOLATION="bilinear", RPC_HEIGHT=offset,
                          RPC_DEM_MISSING_VALUE=str(self.effective_height - offset),
                          RPC_DEM_APPLY_VDATUM_SHIFT="FALSE")
        else:
            kwargs["RPC_HEIGHT"] = self.effective_height
        return RPCTransformer(RPC(**self.rpcs), **kwargs)

    def describe(self) -> dict[str, Any]:
        """The height choice, for the summary."""
        if self.dem:
            return {"dem": self.dem, **(self.dem_heights.describe() if self.dem_heights else {})}
        source = "request" if self.height is not None else "HEIGHT_OFF"
        return {"constant": self.effective_height, "source": source}

    def pixel_to_lonlat(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, y = _floats(x, y)
        if self.chip is not None:
            x, y = _affine(self.chip, x, y)
        if not x.size:
            return x, y
        with rasterio_env(self.options), self._transformer() as transformer:
            lon, lat = transformer.xy(y, x, offset="ul")
        return np.asarray(lon, dtype=np.float64), np.asarray(lat, dtype=np.float64)

    def lonlat_to_pixel(self, lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lon, lat = _floats(lon, lat)
        if not lon.size:
            return lon, lat
        # RPC_HEIGHT (or the DEM) supplies the height in both directions; zs would add to it
        with rasterio_env(self.options), self._transformer() as transformer:
            rows, cols = transformer.rowcol(lon, lat, op=lambda v: v)
        x, y = np.asarray(cols, dtype=np.float64), np.asarray(rows, dtype=np.float64)
        if self.chip is not None:
            x, y = _affine(tuple(~Affine(*self.chip[:6]))[:6], x, y)
        return np.asarray(x), np.asarray(y)


@dataclass(frozen=True)
class GCPSensorModel:
    """Ground control points (for example NITF IGEOLO corners) through GDAL's GCP transformer."""

    gcps: tuple[tuple[float, float, float, float, float], ...]
    crs_wkt: str | None = None
    georeferenced: bool = True
    kind: str = "GCP"

    def _transformer(self) -> Any:
        from rasterio.control import GroundControlPoint
        from rasterio.transform import GCPTransformer

        points = [GroundControlPoint(row=r, col=c, x=gx, y=gy, z=gz) for r, c, gx, gy, gz in self.gcps]
        return GCPTransformer(points)

    def _crs(self) -> CRS:
        return crs_from_wkt(self.crs_wkt) if self.crs_wkt else WGS84

    def pixel_to_lonlat(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, y = _floats(x, y)
        if not x.size:
            return x, y
        with self._transformer() as transformer:
            map_x, map_y = transformer.xy(y, x, offset="ul")
        if not _is_wgs84(self._crs()):
            map_x, map_y = Transformer.from_crs(self._crs(), WGS84, always_xy=True).transform(map_x, map_y)
        return np.asarray(map_x, dtype=np.float64), np.asarray(map_y, dtype=np.float64)

    def lonlat_to_pixel(self, lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lon, lat = _floats(lon, lat)
        if not lon.size:
            return lon, lat
        if not _is_wgs84(self._crs()):
            lon, lat = Transformer.from_crs(WGS84, self._crs(), always_xy=True).transform(lon, lat)
        with self._transformer() as transformer:
            rows, cols = transformer.rowcol(lon, lat, op=lambda v: v)
        return np.asarray(cols, dtype=np.float64), np.asarray(rows, dtype=np.float64)


def wrap_longitude(lon: np.ndarray) -> np.ndarray:
    """Longitudes in ``[-180, 180)``."""
    return np.asarray((np.asarray(lon, dtype=np.float64) + 180.0) % 360.0 - 180.0)


def _antimeridian(info: ImageInfo) -> tuple[float, ...]:
    """GDAL reads NITF IGEOLO corners that cross the antimeridian (160E → 160W) as a
    westward transform more than 180° wide; the image really spans the short way, eastward."""
    assert info.transform is not None
    a, b, c, d, e, f = info.transform[:6]
    if info.driver == "NITF" and info.crs and CRS.from_wkt(info.crs).is_geographic and a * info.width < -180:
        return (a + 360.0 / info.width, b, c, d, e, f)
    return info.transform


def footprint(model: SensorModel, width: int, height: int, per_side: int = 16) -> Any:
    """The image outline in lon/lat (RFC 7946: split at the antimeridian, counter-clockwise),
    or None for an image without georeferencing."""
    import shapely

    from pipeline import antimeridian

    if not model.georeferenced:
        return None
    t = np.linspace(0.0, 1.0, per_side, endpoint=False)
    x = np.concatenate([t * width, np.full(per_side, width), (1 - t) * width, np.zeros(per_side)])
    y = np.concatenate([np.zeros(per_side), t * height, np.full(per_side, height), (1 - t) * height])
    lon, lat = model.pixel_to_lonlat(x, y)
    outline = shapely.make_valid(shapely.Polygon(np.column_stack([antimeridian.unwrap(lon), lat])))
    return antimeridian.split(outline)


#: the heights an RPC expects: WGS 84 ellipsoidal
ELLIPSOIDAL = CRS.from_epsg(4979)


@dataclass(frozen=True)
class DemHeights:
    """What a DEM's heights are, and what is added to them before an RPC uses them.

    ``vertical``: ``ellipsoidal`` (a 3D geographic CRS), ``orthometric`` (a compound CRS with
    a vertical, gravity-related part: heights above a geoid), ``unstated`` (no vertical CRS:
    taken as ellipsoidal, as GDAL's RPC transformer and OSML Model Runner take them) or
    ``unknown`` (the CRS could not be read). ``offset``: metres added to every DEM height, the
    geoid undulation at ``at`` (lon, lat: the RPC's ``LONG_OFF``, ``LAT_OFF``) when ``applied``;
    ``reason`` says why it is not.
    """

    vertical: str
    offset: float = 0.0
    applied: bool = False
    at: tuple[float, float] | None = None
    crs: str | None = None
    reason: str | None = None

    def describe(self) -> dict[str, Any]:
        """The DEM's part of the summary's ``elevation``."""
        if self.vertical in ("unstated", "unknown"):
            return {"vertical": self.vertical, "assumed": "ellipsoidal",
                    **({"reason": self.reason} if self.reason else {})}
        if self.vertical == "ellipsoidal":
            return {"vertical": "ellipsoidal"}
        facts: dict[str, Any] = {"vertical": "orthometric", "verticalCrs": self.crs,
                                 "geoidApplied": self.applied}
        if self.applied:
            facts.update(geoidOffset=self.offset, geoidAt=list(self.at or ()))
        else:
            facts["reason"] = self.reason
        return facts


def _dem_crs(dem: str, options: dict[str, str]) -> CRS | None:
    """The DEM's CRS with its vertical part, from its header (image drivers only)."""
    import rasterio

    with gdal_env(dem, options), rasterio.Env(GTIFF_REPORT_COMPD_CS="YES"), \
            open_raster(gdal_path(dem)) as src:
        return CRS.from_wkt(src.crs.to_wkt()) if src.crs else None


def dem_heights(dem: str, options: dict[str, str], at: tuple[float, float]) -> DemHeights:
    """How the heights of ``dem`` become ellipsoidal near ``at`` (lon, lat).

    A DEM whose CRS says its heights are orthometric gets the geoid undulation at ``at`` (PROJ:
    the compound CRS → EPSG:4979) added to every height, where PROJ has the geoid grid (in a
    :mod:`pyproj.datadir` data directory; nothing is downloaded). Without it, PROJ would
    silently fall back to a "ballpark" transformation that changes nothing: the heights are
    then used as given, with a warning and the reason in :meth:`DemHeights.describe`.
    """
    import rasterio.errors
    from pyproj.network import is_network_enabled
    from pyproj.transformer import TransformerGroup

    try:
        crs = _dem_crs(dem, options)
    except rasterio.errors.RasterioIOError as exc:
        reason = f"cannot read the DEM's CRS: {gdal_error_line(exc)}"
        log.warning("DEM %s: heights used as given (%s)", dem, reason)
        return DemHeights("unknown", reason=reason)
    if crs is None or not crs.is_compound:
        three_d = crs is not None and crs.is_geographic and len(crs.axis_info) == 3
        return DemHeights("ellipsoidal" if three_d else "unstated")
    horizontal, vertical = crs.sub_crs_list[0], crs.sub_crs_list[1]
    name = (vertical.source_crs or vertical).name if vertical.is_bound else vertical.name
    x, y = Transformer.from_crs(WGS84, horizontal, always_xy=True).transform(*at)
    with warnings.catch_warnings():  # pyproj's "best transformation is not available": ours
        warnings.simplefilter("ignore", UserWarning)
        group = TransformerGroup(crs, ELLIPSOIDAL, always_xy=True)
    usable = [t for t in group.transformers if "ballpark" not in t.description.lower()]
    height = float(usable[0].transform(x, y, 0.0)[2]) if usable else math.nan
    if usable and math.isfinite(height):
        return DemHeights("orthometric", height, True, at, name)
    missing = sorted({g.short_name for op in group.unavailable_operations for g in op.grids
                      if not g.available})
    if missing:
        network = "on" if is_network_enabled() else "off"
        reason = f"geoid grid {', '.join(missing)} not found (PROJ network {network})"
    elif usable:
        reason = f"the geoid grid does not cover lon {at[0]:.6f}, lat {at[1]:.6f}"
    else:
        reason = f"PROJ knows no transformation from {name} to WGS 84 ellipsoidal heights"
    log.warning("DEM %s: orthometric heights (%s) used as given, not made ellipsoidal: %s",
                dem, name, reason)
    return DemHeights("orthometric", crs=name, reason=reason)


def elevation_model(
    elevation: dict[str, Any] | None, options: dict[str, str] | None = None
) -> tuple[float | None, str | None, dict[str, str]]:
    """``{"constant": m}`` / ``{"dem": url}`` / None → ``(height, dem GDAL path, DEM options)``."""
    if not elevation:
        return None, None, {}
    if elevation.get("dem"):
        dem = str(elevation["dem"])
        return None, gdal_path(dem), read_options(dem)
    constant = elevation.get("constant")
    return (float(constant) if constant is not None else None), None, {}


def sensor_model(
    info: ImageInfo,
    elevation: dict[str, Any] | None = None,
    options: dict[str, str] | None = None,
) -> SensorModel:
    """The best sensor model the header offers: RPC, else affine, else GCPs, else pixel space
    (with a warning). ``elevation`` sets the RPC's ground height (see :class:`RPCSensorModel`)."""
    if info.rpcs:
        from pipeline.nitf import chip_transform

        height, dem, dem_options = elevation_model(elevation, options)
        chip = chip_transform(info.tre_xml) if info.tre_xml else None
        heights = None
        if elevation and elevation.get("dem"):
            centre = (float(info.rpcs["long_off"]), float(info.rpcs["lat_off"]))
            heights = dem_heights(str(elevation["dem"]), dem_options, centre)
        return RPCSensorModel(dict(info.rpcs), height, dem, dem_options, chip, heights)
    if info.transform is not None and info.crs is not None:
        return AffineSensorModel(_antimeridian(info), info.crs)
    if len(info.gcps) >= 3:
        return GCPSensorModel(info.gcps, info.gcp_crs)
    log.warning("%s has no georeferencing: features stay in pixel coordinates", info.url)
    return PixelSensorModel()
