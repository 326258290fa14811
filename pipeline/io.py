"""Opening images lazily, and their sensor models.

``open_image`` returns a chunked, dask-backed ``xarray.DataArray`` (bands, y, x) through
rioxarray: GDAL reads the blocks each chunk needs, never the whole file. ``describe`` reads
only the header, and ``sensor_model`` builds the pixel → lon/lat model that geolocation uses.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import rasterio
from affine import Affine
from pyproj import CRS, Transformer

log = logging.getLogger(__name__)

WGS84 = CRS.from_epsg(4326)


class ImageError(RuntimeError):
    """An image that cannot be opened or read; ``str()`` is one line."""


def gdal_path(url: str) -> str:
    """The path GDAL opens for ``url``: ``s3://b/k`` → ``/vsis3/b/k``, ``file://p`` → ``p``."""
    if url.startswith("s3://"):
        return "/vsis3/" + url[len("s3://") :]
    if url.startswith("file://"):
        return url[len("file://") :]
    return url


@contextmanager
def gdal_env(url: str) -> Iterator[None]:
    """GDAL configuration for reading ``url`` (set per read, never in ``os.environ``)."""
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"):
        yield


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@dataclass(frozen=True)
class ImageInfo:
    """What the header says about an image: enough to plan a job without reading pixels."""

    url: str
    width: int
    height: int
    bands: int
    dtype: str
    block_width: int
    block_height: int
    bits: int | None
    nodata: float | None
    crs: str | None
    transform: tuple[float, ...] | None
    driver: str


def describe(url: str) -> ImageInfo:
    """Read an image's header; raise :class:`ImageError` with one line if it cannot be opened."""
    try:
        with gdal_env(url), rasterio.open(gdal_path(url)) as src:
            block_h, block_w = src.block_shapes[0] if src.block_shapes else (src.height, src.width)
            bits = src.tags(1, "IMAGE_STRUCTURE").get("NBITS")
            georeferenced = src.crs is not None and not src.transform.is_identity
            return ImageInfo(
                url=url,
                width=src.width,
                height=src.height,
                bands=src.count,
                dtype=str(src.dtypes[0]),
                block_width=int(block_w),
                block_height=int(block_h),
                bits=int(bits) if bits else None,
                nodata=src.nodata,
                crs=src.crs.to_wkt() if georeferenced else None,
                transform=tuple(src.transform)[:6] if georeferenced else None,
                driver=src.driver,
            )
    except FileNotFoundError:
        raise ImageError(f"image not found: {url}") from None
    except rasterio.errors.RasterioIOError as exc:
        message = _one_line(exc)
        if "No such file" in message or "does not exist" in message:
            raise ImageError(f"image not found: {url}") from None
        raise ImageError(f"cannot open image {url}: {message}") from None


def open_image(url: str, chunks: int | tuple[int, int] = 4096) -> Any:
    """The image as a lazily chunked ``xarray.DataArray`` ``(band, y, x)``.

    ``chunks`` is the chunk side in pixels (or ``(rows, cols)``); all bands share a chunk.
    Sensor model and header facts are in ``.attrs["sensor_model"]`` and ``.attrs["info"]``.
    """
    import rioxarray

    info = describe(url)
    rows, cols = (chunks, chunks) if isinstance(chunks, int) else chunks
    try:
        with gdal_env(url):
            array = rioxarray.open_rasterio(
                gdal_path(url),
                chunks={"band": -1, "y": rows, "x": cols},
                lock=False,
                masked=False,
                cache=False,
            )
    except rasterio.errors.RasterioIOError as exc:
        raise ImageError(f"cannot open image {url}: {_one_line(exc)}") from None
    array.attrs["info"] = info
    array.attrs["sensor_model"] = sensor_model(info)
    return array


def read_window(url: str, window: tuple[int, int, int, int]) -> np.ndarray:
    """Pixels ``(bands, rows, cols)`` of ``(x0, y0, x1, y1)``, read directly (small windows)."""
    x0, y0, x1, y1 = window
    with gdal_env(url), rasterio.open(gdal_path(url)) as src:
        return src.read(window=rasterio.windows.Window(x0, y0, x1 - x0, y1 - y0))


class SensorModel(Protocol):
    """Pixel ``(x, y)`` (the pixel convention of :mod:`pipeline.detections`) to lon/lat."""

    georeferenced: bool

    def pixel_to_lonlat(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ...


@dataclass(frozen=True)
class PixelSensorModel:
    """No georeferencing: coordinates stay in pixels."""

    georeferenced: bool = False

    def pixel_to_lonlat(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)


@dataclass(frozen=True)
class AffineSensorModel:
    """An affine geotransform in a CRS: pixel corners map through it as they are (GDAL)."""

    transform: tuple[float, ...]
    crs_wkt: str
    georeferenced: bool = True

    def pixel_to_lonlat(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a, b, c, d, e, f = self.transform[:6]
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        map_x = a * x + b * y + c
        map_y = d * x + e * y + f
        crs = CRS.from_wkt(self.crs_wkt)
        if crs.equals(WGS84) or (crs.is_geographic and crs.geodetic_crs == WGS84.geodetic_crs):
            return map_x, map_y
        transformer = Transformer.from_crs(crs, WGS84, always_xy=True)
        lon, lat = transformer.transform(map_x, map_y)
        return np.asarray(lon), np.asarray(lat)

    @property
    def affine(self) -> Affine:
        return Affine(*self.transform[:6])


def sensor_model(info: ImageInfo) -> SensorModel:
    """The best sensor model the header offers (affine, or pixel space with a warning)."""
    if info.transform is not None and info.crs is not None:
        return AffineSensorModel(info.transform, info.crs)
    log.warning("%s has no georeferencing: features stay in pixel coordinates", info.url)
    return PixelSensorModel()
