"""Opening images lazily, and their sensor models.

``open_image`` returns a chunked, dask-backed ``xarray.DataArray`` (bands, y, x) whose chunks
GDAL reads window by window, never the whole file; ``lazy_pixels`` is the bare dask array. Every
open and read runs inside :func:`rasterio_env` with the image's *read options*
(:func:`read_options`: a small picklable dict of GDAL config, for ``s3://`` the endpoint and
region of the client and the ``imageReadRole``, nothing secret), so Dask workers read with the
settings of the client, sign with credentials of their own (renewed before they expire; a read
denied as expired is retried once) and an ``imageReadRole`` applies to its image only.
``describe`` reads only the header, and ``sensor_model`` builds the pixel ↔ lon/lat model that
geolocation and regions of interest use.

Image URLs: local paths, ``file://``, ``s3://bucket/key`` (read through ``/vsis3/`` with HTTP
range requests) and any GDAL path. One image segment of a multi-segment NITF is
``NITF_IM:<k>:<url>`` (:func:`image_segments` lists them).
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import rasterio
import rasterio.errors
import rasterio.windows
from affine import Affine
from pyproj import CRS, Transformer

from pipeline.security import GDAL_RETRY_OPTIONS, GDAL_SAFE_OPTIONS, image_size_problem, open_raster

log = logging.getLogger(__name__)

WGS84 = CRS.from_epsg(4326)

#: compressed bytes GDAL may fetch up front for one windowed read of a tiled GeoTIFF, in exact
#: merged range requests (GDAL's default, 10 MB, is less than a chunk: the rest of the window
#: then goes through /vsicurl/'s read-ahead, which fetched 1.4x the blocks that it needed)
RAW_BLOCK_PREFETCH_BYTES = 256 * 2**20

#: GDAL options every read uses
#: (no directory listing, .netrc, VRT Python or curl logs; retries of transient HTTP faults;
#: a chunk's blocks fetched in exact range requests; GTiff's multi-threaded read, which decodes
#: blocks straight into the band-last chunk buffer instead of splitting them per band into
#: the block cache and interleaving them again: 2.1 instead of 2.3 CPU s for 25 chunks)
BASE_OPTIONS = {**GDAL_SAFE_OPTIONS, **GDAL_RETRY_OPTIONS,
                "GDAL_MAX_RAW_BLOCK_CACHE_SIZE": str(RAW_BLOCK_PREFETCH_BYTES),
                "GDAL_NUM_THREADS": "2"}

#: options of reads over the network: one GDAL thread. With two, GTiff fetches a window's blocks
#: through a background ``AdviseRead`` whose failure (a 403 of expired credentials, a 5xx after
#: GDAL's retries) is only printed, and the read returns zeros without an error (measured with
#: GDAL 3.10.3; one thread fetches the same merged ranges in as many requests and raises)
REMOTE_OPTIONS = {"GDAL_NUM_THREADS": "1"}

_SEGMENT = re.compile(r"^NITF_IM:(\d+):(.+)$", re.IGNORECASE)


class ImageError(RuntimeError):
    """An image that cannot be opened or read; ``str()`` is one line."""


def split_segment(url: str) -> tuple[int | None, str]:
    """``NITF_IM:2:<url>`` → ``(2, <url>)``; any other URL → ``(None, url)``."""
    match = _SEGMENT.match(url)
    return (int(match.group(1)), match.group(2)) if match else (None, url)


def gdal_path(url: str) -> str:
    """The path GDAL opens for ``url``: ``s3://b/k`` → ``/vsis3/b/k``, ``file://p`` → ``p``."""
    segment, source = split_segment(url)
    if segment is not None:
        return f"NITF_IM:{segment}:{gdal_path(source)}"
    if url.startswith("s3://"):
        return "/vsis3/" + url[len("s3://") :]
    if url.startswith("file://"):
        return url[len("file://") :]
    return url


def in_s3(url: str) -> bool:
    """Whether ``url`` (or the image segment it names) is read from S3."""
    return split_segment(url)[1].startswith(("s3://", "/vsis3/"))


def read_options(url: str, role: str | None = None) -> dict[str, str]:
    """The GDAL options to read ``url`` with (picklable, nothing secret: they travel in tasks).

    For ``s3://`` these carry the endpoint (from ``AWS_ENDPOINT_URL[_S3]``), region and where
    the reading process gets its credentials (:func:`pipeline.aws.gdal_s3_options`: its own
    default chain, or ``role`` assumed there); :func:`rasterio_env` resolves them in that
    process on every read.
    """
    from pipeline import aws

    options = aws.GdalOptions(BASE_OPTIONS)
    path = split_segment(gdal_path(url))[1]
    if path.startswith(("/vsis3/", "/vsicurl/", "/vsigs/", "/vsiaz/", "/vsioss/", "/vsiswift/")) or \
            "://" in path:
        options.update(REMOTE_OPTIONS)
    if in_s3(url):
        try:
            options.update(aws.gdal_s3_options(role))
        except aws.AwsError as exc:
            raise ImageError(f"cannot read {url}: {exc}") from None
    return options


def rasterio_env(options: dict[str, str]) -> Any:
    """``rasterio.Env`` for GDAL ``options``. An S3 read signs with this process's credentials:
    rasterio's ``AWSSession`` over its boto3 session (:func:`pipeline.aws.read_session`), whose
    refreshable credentials are read afresh each time an ``Env`` is entered; it reads unsigned
    (``AWS_NO_SIGN_REQUEST``) only when this process has no credentials at all."""
    from rasterio.session import AWSSession

    from pipeline import aws

    config = dict(options)
    config.pop(aws.SIGNER_OPTION, None)
    config.pop(aws.STS_OPTION, None)
    owner = aws.read_session(options)
    if owner is None:
        return rasterio.Env(**config)
    if aws.credentials(owner) is None:
        return rasterio.Env(AWS_NO_SIGN_REQUEST="YES", **config)
    return rasterio.Env(session=AWSSession(session=owner, endpoint_url=config.get("AWS_S3_ENDPOINT")),
                        **config)


@contextmanager
def gdal_env(url: str, options: dict[str, str] | None = None) -> Iterator[None]:
    """GDAL configuration for reading ``url`` (set per read, never in ``os.environ``)."""
    with rasterio_env(options if options is not None else read_options(url)):
        yield


#: GDAL's part of a reason is cut to this many characters
MAX_GDAL_REASON = 240


def gdal_error_line(exc: BaseException) -> str:
    """One redacted line for ``exc``; for rasterio's "Read failed. See previous exception for
    details." it is GDAL's own cause (and its root cause, where that says more), e.g.
    ``band 1: IReadBlock failed at X offset 0, Y offset 0: TIFFReadEncodedTile() failed.
    (TIFFFillTile:Read error at row 4294967295, col 4294967295, tile 0; got 0 bytes, expected 1224)``."""
    from pipeline.redact import redact

    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    if "See previous exception" in line:
        causes, seen = [], {id(exc)}
        cause = exc.__cause__ or exc.__context__
        while cause is not None and id(cause) not in seen:
            seen.add(id(cause))
            first = str(cause).strip().splitlines()
            if first:
                causes.append(first[0])
            cause = cause.__cause__ or cause.__context__
        if causes:
            line = causes[0]
            if causes[-1] not in line:
                line = f"{line} ({causes[-1]})"
            line = line if len(line) <= MAX_GDAL_REASON else line[: MAX_GDAL_REASON - 1] + "…"
    return redact(line)


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
    #: GDAL's RPC metadata (``RPC.to_dict()``), when the image has an RPC sensor model
    rpcs: dict[str, Any] | None = None
    #: ground control points ``(row, col, x, y, z)`` and their CRS (WKT)
    gcps: tuple[tuple[float, float, float, float, float], ...] = ()
    gcp_crs: str | None = None
    #: image segments of a multi-segment NITF (``NITF_IM:k:...``), empty otherwise
    subdatasets: tuple[str, ...] = ()
    #: overview factors of band 1
    overviews: tuple[int, ...] = ()
    #: the header's metadata (NITF fields and TREs), for ``sourceMetadata``
    tags: dict[str, str] = field(default_factory=dict, repr=False)
    #: the ``xml:TRE`` metadata domain (NITF), for ICHIPB
    tre_xml: str | None = field(default=None, repr=False)


def _read_info(url: str, src: Any) -> ImageInfo:
    block_h, block_w = src.block_shapes[0] if src.block_shapes else (src.height, src.width)
    bits = src.tags(1, "IMAGE_STRUCTURE").get("NBITS")
    georeferenced = src.crs is not None and not src.transform.is_identity
    rpcs = src.rpcs.to_dict() if src.rpcs else None
    gcps, gcp_crs = src.gcps
    tags = dict(src.tags())
    if src.driver == "NITF":
        tags.update({f"TRE_{k}": v for k, v in src.tags(ns="TRE").items()})
    tre_xml = None
    if src.driver == "NITF" and "xml:TRE" in src.tag_namespaces():
        tre_xml = src.tags(ns="xml:TRE").get("xml:TRE") or None
    return ImageInfo(
        url=url,
        width=src.width,
        height=src.height,
        bands=src.count,
        dtype=str(src.dtypes[0]) if src.count else "uint8",
        block_width=int(block_w),
        block_height=int(block_h),
        bits=int(bits) if bits else None,
        nodata=src.nodata,
        crs=src.crs.to_wkt() if georeferenced else None,
        transform=tuple(src.transform)[:6] if georeferenced else None,
        driver=src.driver,
        rpcs=rpcs,
        gcps=tuple((g.row, g.col, g.x, g.y, g.z or 0.0) for g in gcps),
        gcp_crs=gcp_crs.to_wkt() if gcps and gcp_crs else None,
        subdatasets=tuple(s for s in src.subdatasets if s.upper().startswith("NITF_IM:")),
        overviews=tuple(src.overviews(1)) if src.count else (),
        tags=tags,
        tre_xml=tre_xml,
    )


def describe(url: str, options: dict[str, str] | None = None) -> ImageInfo:
    """Read an image's header; raise :class:`ImageError` with one line if it cannot be opened."""
    try:
        with gdal_env(url, options), warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with open_raster(gdal_path(url)) as src:  # image drivers only
                info = _read_info(url, src)
    except FileNotFoundError:
        raise ImageError(f"image not found: {url}") from None
    except rasterio.errors.RasterioIOError as exc:
        message = gdal_error_line(exc)
        if "No such file" in message or "does not exist" in message or "HTTP response code: 404" in message:
            raise ImageError(f"image not found: {url}") from None
        raise ImageError(f"cannot open image {url}: {message}") from None
    problem = image_size_problem(info.width, info.height, info.bands)
    if problem:
        raise ImageError(f"refused image {url}: {problem}")
    return info


def image_segments(url: str, options: dict[str, str] | None = None) -> list[str]:
    """The images in ``url``: one per image segment of a multi-segment NITF, else ``[url]``.

    An unreadable file gives ``[url]`` (planning it reports the error).
    """
    if split_segment(url)[0] is not None:
        return [url]
    try:
        info = describe(url, options)
    except ImageError:
        return [url]
    if len(info.subdatasets) <= 1:
        return [url]
    return [f"NITF_IM:{k}:{url}" for k in range(len(info.subdatasets))]


@dataclass(frozen=True)
class RasterSource:
    """A picklable, array-like view of an image that reads windows on demand (for dask)."""

    url: str
    shape: tuple[int, int, int]
    dtype: np.dtype[Any]
    options: dict[str, str] = field(repr=False)

    @property
    def ndim(self) -> int:
        return 3

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        bands, rows, cols = key
        indexes = list(range(1, self.shape[0] + 1))[bands]
        window = rasterio.windows.Window.from_slices(rows, cols, height=self.shape[1], width=self.shape[2])
        return self._read(indexes, window)

    def read(self, window: tuple[int, int, int, int]) -> np.ndarray:
        """Pixels ``(bands, rows, cols)`` of ``(x0, y0, x1, y1)``, stored band-last (a
        transposed view of ``(rows, cols, bands)``): GDAL writes them in the order that
        tiles are cut in, so cutting a tile copies whole rows."""
        x0, y0, x1, y1 = window
        out = np.empty((y1 - y0, x1 - x0, self.shape[0]), dtype=self.dtype).transpose(2, 0, 1)
        indexes = list(range(1, self.shape[0] + 1))
        return self._read(indexes, rasterio.windows.Window(x0, y0, x1 - x0, y1 - y0), out)

    def _read(self, indexes: list[int], window: Any, out: np.ndarray | None = None) -> np.ndarray:
        cap_block_cache()
        for attempt in (1, 2):
            with gdal_env(self.url, self.options):
                try:
                    return _open_cached(self.url, self.options).read(indexes, window=window, out=out)
                except rasterio.errors.RasterioIOError:
                    _forget(self.url, self.options)  # the next read reopens it
                    if attempt == 2 or not _renewed_after_failure(self.options):
                        raise
        raise AssertionError("unreachable")


# ---------------------------------------------------------------------------- worker read state
#: GDAL's block cache per process (bytes), unless ``GDAL_CACHEMAX`` is set in the environment.
#: Chunk reads are disjoint windows, so a big cache (GDAL's default: 5% of RAM) only grows the
#: worker; this holds a chunk's seam blocks for a neighbour read by the same worker.
BLOCK_CACHE_BYTES = 96 * 2**20
#: open datasets kept per thread (an open is a header read; a VRT mosaic's is a parse)
OPEN_DATASETS = 4
_local = threading.local()
_cache_capped = False


def cap_block_cache() -> None:
    """Cap GDAL's block cache in this process at :data:`BLOCK_CACHE_BYTES` (once)."""
    global _cache_capped
    if not _cache_capped:
        if "GDAL_CACHEMAX" not in os.environ:
            from rasterio.env import set_gdal_config

            set_gdal_config("GDAL_CACHEMAX", BLOCK_CACHE_BYTES)
        _cache_capped = True



def _dataset_key(url: str, options: dict[str, str]) -> tuple[Any, ...]:
    """Path, options, file version and the credentials that the active ``Env`` signs with: GDAL
    keeps a file's signing settings from its open, so renewed credentials reopen it."""
    from rasterio.env import getenv, hasenv

    path = gdal_path(url)
    try:  # a local file replaced since it was opened is opened again
        stat = os.stat(split_segment(path)[1])
        version: tuple[int, ...] = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
    except OSError:
        version = ()
    config = getenv() if hasenv() else {}
    signer = hash((config.get("AWS_ACCESS_KEY_ID"), config.get("AWS_SESSION_TOKEN")))
    return (path, tuple(sorted(options.items())), version, signer)


def _renewed_after_failure(options: dict[str, str]) -> bool:
    """After an S3 read failed, renew this process's credentials for ``options`` if they are
    temporary (an assumed role, an instance or task role); True if the read is worth one more
    try. GDAL's error seldom says why (a denied block read is "Read error ... got 0 bytes"), and
    S3 answers expired credentials with 403, with no body at all to a HEAD request."""
    from pipeline import aws

    owner = aws.read_session(options)
    found = aws.credentials(owner) if owner is not None else None
    if found is None or not aws.renewable(found):
        return False
    log.info("an S3 read failed; renewing %s credentials and reading again", found.method)
    aws.renew(found)
    return True


def _open_cached(url: str, options: dict[str, str]) -> Any:
    """The open dataset for ``url`` in this thread (call inside its ``gdal_env``)."""
    cache: OrderedDict[tuple[Any, ...], Any] = _local.__dict__.setdefault("datasets", OrderedDict())
    key = _dataset_key(url, options)
    src = cache.pop(key, None)
    if src is None or src.closed:
        src = open_raster(gdal_path(url))
    cache[key] = src
    while len(cache) > OPEN_DATASETS:
        cache.popitem(last=False)[1].close()
    return src


def _forget(url: str, options: dict[str, str]) -> None:
    cache = _local.__dict__.get("datasets", {})
    src = cache.pop(_dataset_key(url, options), None)
    if src is not None:
        src.close()


def lazy_pixels(
    url: str,
    info: ImageInfo,
    chunks: int | tuple[int, int] = 4096,
    options: dict[str, str] | None = None,
) -> Any:
    """The pixels as a dask array ``(bands, y, x)``: each chunk opens and reads its own window
    under ``options`` inside its task."""
    import dask.array as da
    from dask.base import tokenize

    rows, cols = (chunks, chunks) if isinstance(chunks, int) else chunks
    from pipeline.aws import GdalOptions

    options = GdalOptions(options) if options is not None else read_options(url)
    source = RasterSource(url, (info.bands, info.height, info.width), np.dtype(info.dtype), options)
    name = f"read-{url.rsplit('/', 1)[-1]}-{tokenize(url, info.width, info.height, rows, cols)}"
    return da.from_array(
        source,
        chunks=(info.bands, rows, cols),
        name=name,
        lock=False,
        asarray=False,
        fancy=False,
        meta=np.empty((0, 0, 0), dtype=info.dtype),
    )


def open_image(
    url: str,
    chunks: int | tuple[int, int] = 4096,
    *,
    role: str | None = None,
    elevation: dict[str, Any] | None = None,
) -> Any:
    """The image as a lazily chunked ``xarray.DataArray`` ``(band, y, x)``.

    ``chunks`` is the chunk side in pixels (or ``(rows, cols)``); all bands share a chunk.
    Sensor model and header facts are in ``.attrs["sensor_model"]`` and ``.attrs["info"]``;
    ``x``/``y`` are pixel-centre coordinates in the image's CRS where it has an affine one.
    """
    import rioxarray  # noqa: F401 - registers the ``.rio`` accessor used below
    import xarray as xr

    options = read_options(url, role)
    info = describe(url, options)
    data = lazy_pixels(url, info, chunks, options)
    coords: dict[str, Any] = {"band": np.arange(1, info.bands + 1)}
    if info.transform is not None:
        a, _, c, _, e, f = info.transform[:6]
        coords["x"] = c + a * (np.arange(info.width) + 0.5)
        coords["y"] = f + e * (np.arange(info.height) + 0.5)
    array = xr.DataArray(data, dims=("band", "y", "x"), coords=coords)
    if info.crs is not None:
        array = array.rio.write_crs(info.crs)
        array = array.rio.write_transform(Affine(*info.transform[:6]))  # type: ignore[index]
    array.attrs["info"] = info
    array.attrs["sensor_model"] = sensor_model(info, elevation, options)
    return array


def read_window(
    url: str, window: tuple[int, int, int, int], options: dict[str, str] | None = None
) -> np.ndarray:
    """Pixels ``(bands, rows, cols)`` of ``(x0, y0, x1, y1)``, read directly (small windows)."""
    x0, y0, x1, y1 = window
    try:
        with gdal_env(url, options), open_raster(gdal_path(url)) as src:  # image drivers only
            return src.read(window=rasterio.windows.Window(x0, y0, x1 - x0, y1 - y0))
    except rasterio.errors.RasterioIOError as exc:
        raise ImageError(f"cannot read pixels of {url}: {gdal_error_line(exc)}") from None


# ---------------------------------------------------------------------------- pixel statistics
#: pixels sampled (about) for the dynamic-range statistics of one image
SAMPLE_PIXELS = 1 << 20


def sample_pixels(
    url: str, info: ImageInfo, options: dict[str, str] | None = None, target: int = SAMPLE_PIXELS
) -> tuple[np.ndarray, str]:
    """About ``target`` pixels ``(bands, n)`` representative of the image, and how they were
    taken: ``full`` (small images), ``overview`` (from the file's overviews), or ``blocks``
    (a sparse grid of whole internal blocks; no full pass over a large image).

    Raises :class:`ImageError` if the pixels cannot be read (the plan's probe read).
    """
    area = info.width * info.height
    try:
        with gdal_env(url, options), open_raster(gdal_path(url)) as src:  # image drivers only
            if area <= target:
                data, how = src.read(masked=True), "full"
            elif info.overviews:
                factor = math.sqrt(area / target)
                shape = (info.bands, max(1, int(info.height / factor)), max(1, int(info.width / factor)))
                data, how = src.read(out_shape=shape, masked=True), "overview"
            else:
                data, how = _sample_blocks(src, info, target), "blocks"
    except rasterio.errors.RasterioIOError as exc:
        raise ImageError(f"cannot read pixels of {url}: {gdal_error_line(exc)}") from None
    flat = data.reshape(data.shape[0], -1)
    if isinstance(flat, np.ma.MaskedArray):
        values = [band.compressed() for band in flat]
        n = min(len(v) for v in values)
        return np.stack([v[:n] for v in values]) if n else np.empty((info.bands, 0)), how
    return np.asarray(flat), how


def _sample_blocks(src: Any, info: ImageInfo, target: int) -> np.ma.MaskedArray:
    side_w = max(info.block_width, 256) if info.block_width < info.width else 256
    side_h = max(info.block_height, 256) if info.block_height < info.height else 256
    side_w, side_h = min(side_w, 1024, info.width), min(side_h, 1024, info.height)
    count = max(1, min(64, target // (side_w * side_h)))
    per_axis = max(1, int(math.sqrt(count)))
    xs = np.linspace(0, info.width - side_w, per_axis).astype(int)
    ys = np.linspace(0, info.height - side_h, per_axis).astype(int)
    if info.block_width < info.width:
        xs = (xs // info.block_width) * info.block_width
    if info.block_height < info.height:
        ys = (ys // info.block_height) * info.block_height
    parts = [
        src.read(window=rasterio.windows.Window(int(x), int(y), side_w, side_h), masked=True)
        for y in ys
        for x in xs
    ]
    return np.ma.concatenate([p.reshape(p.shape[0], -1) for p in parts], axis=1)


def dynamic_range(
    samples: np.ndarray, percentiles: tuple[float, float] = (2.0, 98.0)
) -> tuple[list[float], list[float]]:
    """Per-band ``(low, high)``: the given percentiles of the sampled pixels (finite only)."""
    lows, highs = [], []
    for band in samples.astype(np.float64, copy=False):
        finite = band[np.isfinite(band)]
        low, high = np.percentile(finite, percentiles) if finite.size else (0.0, 255.0)
        if high <= low:
            high = low + 1.0
        lows.append(float(low))
        highs.append(float(high))
    return lows, highs


# ---------------------------------------------------------------------------- sensor models
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
        crs = CRS.from_wkt(self.crs_wkt)
        if _is_wgs84(crs):
            return wrap_longitude(map_x), map_y
        transformer = Transformer.from_crs(crs, WGS84, always_xy=True)
        lon, lat = transformer.transform(map_x, map_y)
        return np.asarray(lon), np.asarray(lat)

    def lonlat_to_pixel(self, lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lon, lat = _floats(lon, lat)
        crs = CRS.from_wkt(self.crs_wkt)
        if _is_wgs84(crs):
            map_x, map_y = lon, lat
        else:
            map_x, map_y = Transformer.from_crs(WGS84, crs, always_xy=True).transform(lon, lat)
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
    DEM (``dem``, a GDAL path, sampled at each point; GDAL iterates to convergence).
    ``chip`` is the affine from this image's pixels to the full image the RPC was made for
    (NITF ICHIPB), applied before the RPC is evaluated.
    """

    rpcs: dict[str, Any]
    height: float | None = None
    dem: str | None = None
    options: dict[str, str] = field(default_factory=dict, repr=False)
    chip: tuple[float, ...] | None = None
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
            kwargs.update(RPC_DEM=self.dem, RPC_DEMINTERPOLATION="bilinear",
                          RPC_DEM_MISSING_VALUE=str(self.effective_height))
        else:
            kwargs["RPC_HEIGHT"] = self.effective_height
        return RPCTransformer(RPC(**self.rpcs), **kwargs)

    def describe(self) -> dict[str, Any]:
        """The height choice, for the summary."""
        if self.dem:
            return {"dem": self.dem}
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
        return CRS.from_wkt(self.crs_wkt) if self.crs_wkt else WGS84

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
        return RPCSensorModel(dict(info.rpcs), height, dem, dem_options, chip)
    if info.transform is not None and info.crs is not None:
        return AffineSensorModel(_antimeridian(info), info.crs)
    if len(info.gcps) >= 3:
        return GCPSensorModel(info.gcps, info.gcp_crs)
    log.warning("%s has no georeferencing: features stay in pixel coordinates", info.url)
    return PixelSensorModel()


# ---------------------------------------------------------------------------- range adjustment
def deep_pixels(info: ImageInfo) -> bool:
    """Whether the image is deeper than 8 bits (or not 8-bit unsigned)."""
    return (info.bits or 0) > 8 or info.dtype != "uint8"


def range_adjustment(
    requested: str | None, info: ImageInfo, options: dict[str, str] | None = None
) -> dict[str, Any]:
    """The request's ``rangeAdjustment`` for this image, resolved once per image.

    Default: ``DRA`` for images deeper than 8 bits, else ``NONE``. ``DRA`` is a per-band
    2nd–98th percentile stretch of pixels sampled from the image (see :func:`sample_pixels`),
    so every tile of the image gets the same mapping. The result records the parameters
    (``{"type", "low", "high", "percentiles", "sample", "samplePixels"}``) for the summary.
    """
    kind = requested or ("DRA" if deep_pixels(info) else "NONE")
    record: dict[str, Any] = {"type": kind, "requested": requested}
    if kind == "DRA":
        samples, how = sample_pixels(info.url, info, options)
        low, high = dynamic_range(samples)
        record.update(low=low, high=high, percentiles=[2.0, 98.0], sample=how,
                      samplePixels=int(samples.shape[1]))
    elif kind == "MINMAX":
        record["bits"] = info.bits
    return record
