"""Reading images lazily: GDAL settings, URLs, headers, windows and the dataset cache.

``open_image`` returns a chunked, dask-backed ``xarray.DataArray`` (bands, y, x) whose chunks
GDAL reads window by window, never the whole file; ``lazy_pixels`` is the bare dask array. Every
open and read runs inside :func:`rasterio_env` with the image's *read options*
(:func:`read_options`: a small picklable dict of GDAL config, for ``s3://`` the endpoint and
region of the client and the ``imageReadRole``, nothing secret), so Dask workers read with the
settings of the client, sign with credentials of their own (renewed before they expire; a read
denied as expired is retried once) and an ``imageReadRole`` applies to its image only.
``describe`` reads only the header. Sensor models are in :mod:`pipeline.sensor_models`, pixel
statistics and the range adjustment in :mod:`pipeline.range_stats`.

Image URLs: local paths, ``file://``, ``s3://bucket/key`` (read through ``/vsis3/`` with HTTP
range requests) and any GDAL path. One image segment of a multi-segment NITF is
``NITF_IM:<k>:<url>`` (:func:`image_segments` lists them).
"""

from __future__ import annotations

import copy
import logging
import os
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import rasterio
import rasterio.errors
import rasterio.windows
from affine import Affine

from pipeline.security import GDAL_RETRY_OPTIONS, GDAL_SAFE_OPTIONS, image_size_problem, open_raster

log = logging.getLogger(__name__)

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

#: options of band-by-band reads (``RasterSource.read(..., band_last=False)``: per-pixel
#: segmentation): one GDAL thread decodes a pixel-interleaved file into a band-sequential buffer
#: with 25% less CPU than into a band-last one, and with less CPU than two threads (bench_segment's
#: headline job at 8192² with either setting, two runs each: 0.29-0.30 instead of 0.31-0.32 s)
BAND_SEQUENTIAL_OPTIONS = {"GDAL_NUM_THREADS": "1"}


def band_sequential(options: dict[str, str]) -> dict[str, str]:
    """``options`` (of the same type) for a band-by-band read: :data:`BAND_SEQUENTIAL_OPTIONS` over them."""
    merged = copy.copy(options)
    merged.update(BAND_SEQUENTIAL_OPTIONS)
    return merged

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
    #: each band's scale and offset (value = scale × pixel + offset); empty when all are 1 and 0
    scales: tuple[float, ...] = ()
    offsets: tuple[float, ...] = ()


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
        **_linear(src),
    )


def _linear(src: Any) -> dict[str, tuple[float, ...]]:
    scales = tuple(1.0 if v is None else float(v) for v in src.scales)
    offsets = tuple(0.0 if v is None else float(v) for v in src.offsets)
    if all(v == 1.0 for v in scales) and not any(offsets):
        return {}
    return {"scales": scales, "offsets": offsets}


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

    def read(self, window: tuple[int, int, int, int], band_last: bool = True) -> np.ndarray:
        """Pixels ``(bands, rows, cols)`` of ``(x0, y0, x1, y1)``, stored band-last (a
        transposed view of ``(rows, cols, bands)``): GDAL writes them in the order that
        tiles are cut in, so cutting a tile copies whole rows. ``band_last=False``: stored
        band by band, for per-pixel work on whole bands (read with one GDAL thread,
        :data:`BAND_SEQUENTIAL_OPTIONS`; band arithmetic runs on contiguous rows)."""
        x0, y0, x1, y1 = window
        if band_last:
            out = np.empty((y1 - y0, x1 - x0, self.shape[0]), dtype=self.dtype).transpose(2, 0, 1)
        else:
            out = np.empty((self.shape[0], y1 - y0, x1 - x0), dtype=self.dtype)
        indexes = list(range(1, self.shape[0] + 1))
        options = self.options if band_last else band_sequential(self.options)
        return self._read(indexes, rasterio.windows.Window(x0, y0, x1 - x0, y1 - y0), out, options)

    def _read(self, indexes: list[int], window: Any, out: np.ndarray | None = None,
              options: dict[str, str] | None = None) -> np.ndarray:
        cap_block_cache()
        options = self.options if options is None else options
        for attempt in (1, 2):
            with gdal_env(self.url, options):
                try:
                    return _open_cached(self.url, options).read(indexes, window=window, out=out)
                except rasterio.errors.RasterioIOError:
                    _forget(self.url, options)  # the next read reopens it
                    if attempt == 2 or not _renewed_after_failure(options):
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

    from pipeline.redact import public_url

    rows, cols = (chunks, chunks) if isinstance(chunks, int) else chunks
    from pipeline.aws import GdalOptions

    options = GdalOptions(options) if options is not None else read_options(url)
    source = RasterSource(url, (info.bands, info.height, info.width), np.dtype(info.dtype), options)
    file = public_url(url).split("?", 1)[0].rsplit("/", 1)[-1]  # a name never holds a presigned query
    name = f"read-{file}-{tokenize(url, info.width, info.height, rows, cols)}"
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
    metadata: Any = None,
) -> Any:
    """The image as a lazily chunked ``xarray.DataArray`` ``(band, y, x)``.

    ``chunks`` is the chunk side in pixels (or ``(rows, cols)``); all bands share a chunk.
    Sensor model and header facts are in ``.attrs["sensor_model"]`` and ``.attrs["info"]``;
    ``x``/``y`` are pixel-centre coordinates in the image's CRS where it has an affine one.
    ``metadata``: a STAC Item's :class:`pipeline.stac.AssetMetadata`, for what the file lacks
    (:func:`pipeline.stac.resolve`). Bands with a scale or offset give ``scale × pixel +
    offset`` (float, nodata pixels NaN); ``.rio.nodata`` is the image's nodata.
    """
    import rioxarray  # noqa: F401 - registers the ``.rio`` accessor used below
    import xarray as xr

    from pipeline.sensor_models import sensor_model
    from pipeline.stac import resolve

    options = read_options(url, role)
    info, _ = resolve(describe(url, options), metadata)
    data = lazy_pixels(url, info, chunks, options)
    coords: dict[str, Any] = {"band": np.arange(1, info.bands + 1)}
    if info.transform is not None:
        a, _, c, _, e, f = info.transform[:6]
        coords["x"] = c + a * (np.arange(info.width) + 0.5)
        coords["y"] = f + e * (np.arange(info.height) + 0.5)
    array = xr.DataArray(data, dims=("band", "y", "x"), coords=coords)
    if info.scales:
        valid = array if info.nodata is None else array.where(array != info.nodata)
        array = valid * np.array(info.scales)[:, None, None] + np.array(info.offsets)[:, None, None]
    if info.crs is not None:
        array = array.rio.write_crs(info.crs)
        array = array.rio.write_transform(Affine(*info.transform[:6]))  # type: ignore[index]
    if info.nodata is not None:
        array = array.rio.write_nodata(np.nan if info.scales else info.nodata)
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
