"""Tile encoding for endpoint targets (``imageProcessorTileFormat``/``Compression``).

Tiles are written with rasterio/GDAL into in-memory files. GDAL cannot create PNG, JPEG or a
JPEG/J2K-compressed NITF directly, so those are written as an in-memory GeoTIFF first and copied
(GDAL's CreateCopy); GeoTIFF and uncompressed NITF (OSML's default) are written directly.

Encoding and decoding run under a GDAL environment without an AWS session: otherwise rasterio
builds a boto3 session (15-40 ms of GIL-holding Python) for every in-memory dataset it opens
whenever ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` are set, which dominated the cost of a
tile (throughput fell to 0.15 of an endpoint's capacity).

An uncompressed NITF is GDAL's header, which depends only on the tile's shape (GDAL writes a
fixed ``FDT``), then the pixels band after band. Each GDAL open of a NITF parses GDAL's 186 KB
``nitf_spec.xml`` (about 3 ms), so the header is made by GDAL once per shape and reused
(:func:`_nitf_header`); the bytes are the same as GDAL's.
"""

from __future__ import annotations

import threading
import warnings
from contextlib import AbstractContextManager, nullcontext
from functools import lru_cache

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.env import local as _rasterio_local
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile
from rasterio.session import DummySession

from pipeline.models.base import ModelError

DEFAULT_TILE_FORMAT = "NITF"  #: as OSML's ``imageProcessorTileFormat``

#: valid compressions per format ("NONE" means the format's default)
VALID_COMPRESSIONS: dict[str, tuple[str, ...]] = {
    "NITF": ("NONE", "JPEG", "J2K"),
    "GTIFF": ("NONE", "JPEG", "LZW"),
    "PNG": ("NONE",),
    "JPEG": ("NONE", "JPEG"),
}

CONTENT_TYPES = {
    "NITF": "image/nitf",
    "GTIFF": "image/tiff",
    "PNG": "image/png",
    "JPEG": "image/jpeg",
}

# tiles carry no georeferencing on purpose (catch_warnings is not thread-safe, so filter once)
warnings.filterwarnings("ignore", category=NotGeoreferencedWarning, module=r"rasterio\..*")

_DRIVERS = {"NITF": "NITF", "GTIFF": "GTiff", "PNG": "PNG", "JPEG": "JPEG"}
_CREATION = {
    ("NITF", "JPEG"): {"IC": "C3"},
    ("NITF", "J2K"): {"IC": "C8"},
    ("GTIFF", "JPEG"): {"COMPRESS": "JPEG"},
    ("GTIFF", "LZW"): {"COMPRESS": "LZW"},
}


def tile_env() -> AbstractContextManager[object]:
    """A GDAL environment for in-memory tiles: the thread's own if it has one, else one without
    an AWS session (tiles never touch S3)."""
    return nullcontext() if _rasterio_local._env else rasterio.Env(session=DummySession())


def check_format(tile_format: str, compression: str) -> None:
    """Raise :class:`ModelError` naming both fields for an invalid combination."""
    valid = VALID_COMPRESSIONS.get(tile_format.upper())
    if valid is None:
        raise ModelError(
            f"imageProcessorTileFormat {tile_format!r} is not one of {', '.join(VALID_COMPRESSIONS)}"
        )
    if compression.upper() not in valid:
        raise ModelError(
            f"imageProcessorTileFormat {tile_format} cannot use imageProcessorTileCompression "
            f"{compression} (valid: {', '.join(valid)})"
        )


def _bands_for(tile: np.ndarray, tile_format: str, compression: str) -> np.ndarray:
    """Drop bands that a format cannot hold: JPEG takes 1 or 3, PNG 1 to 4."""
    bands = tile.shape[2]
    jpeg = tile_format == "JPEG" or compression == "JPEG"
    if (jpeg and bands not in (1, 3)) or (tile_format == "PNG" and bands > 4):
        return tile[..., :3] if bands >= 3 else tile[..., :1]
    return tile


def encode_tile(tile: np.ndarray, tile_format: str = DEFAULT_TILE_FORMAT, compression: str = "NONE") -> bytes:
    """Encode an ``H × W × C`` (or ``H × W``) uint8 tile as ``tile_format`` bytes."""
    tile_format, compression = tile_format.upper(), compression.upper()
    check_format(tile_format, compression)
    if tile.ndim == 2:
        tile = tile[..., None]
    tile = _bands_for(np.ascontiguousarray(tile, dtype=np.uint8), tile_format, compression)
    if tile_format == "NITF" and compression == "NONE":
        header = _nitf_header(*tile.shape)
        if header is not None:
            return header + np.moveaxis(tile, -1, 0).tobytes()
    with tile_env():
        return _encode(tile, tile_format, compression)


@lru_cache(maxsize=64)
def _nitf_header(height: int, width: int, bands: int) -> bytes | None:
    """GDAL's uncompressed-NITF header for tiles of this shape, or None where GDAL's file is not
    exactly that header followed by the band-sequential pixels (checked on a patterned tile)."""
    values = np.arange(height * width * bands, dtype=np.uint64) * 7919 % 251
    probe = values.astype(np.uint8).reshape(height, width, bands)
    with tile_env():
        data = _encode(probe, "NITF", "NONE")
    pixels = np.moveaxis(probe, -1, 0).tobytes()
    return data[: -len(pixels)] if data.endswith(pixels) else None


def _encode(tile: np.ndarray, tile_format: str, compression: str) -> bytes:
    height, width, bands = tile.shape
    direct = tile_format == "GTIFF" or (tile_format == "NITF" and compression == "NONE")
    driver = _DRIVERS[tile_format] if direct else "GTiff"
    profile = {"driver": driver, "width": width, "height": height, "count": bands, "dtype": "uint8"}
    options = _CREATION.get((tile_format, compression), {})
    with MemoryFile(ext=".ntf" if driver == "NITF" else ".tif") as source:
        with source.open(**profile, **(options if direct else {})) as dataset:
            dataset.write(np.moveaxis(tile, -1, 0))
        if direct:
            return bytes(source.read())
        with source.open() as dataset, MemoryFile(ext=tile_format.lower()) as target:
            rasterio.shutil.copy(dataset, target.name, driver=_DRIVERS[tile_format], **options)
            return bytes(target.read())


#: uncompressed-NITF headers that :func:`decode_tile` has checked against GDAL, by file size
_known_nitf: dict[int, list[tuple[bytes, tuple[int, int, int]]]] = {}
_known_lock = threading.Lock()


def decode_tile(data: bytes) -> np.ndarray:
    """The ``H × W × C`` uint8 pixels of an encoded tile (any format GDAL reads).

    An uncompressed NITF whose header is one already decoded by GDAL (same bytes, same size) is
    read without GDAL: its pixels follow the header band after band.
    """
    if data[:4] == b"NITF":
        for header, shape in _known_nitf.get(len(data), ()):
            if data.startswith(header):
                pixels = np.frombuffer(data, np.uint8, offset=len(header)).reshape(shape)
                return np.moveaxis(pixels, 0, -1).copy()
    try:
        with tile_env(), MemoryFile(data) as memory, memory.open() as dataset:
            pixels = dataset.read()
    except rasterio.errors.RasterioError as exc:
        raise ModelError(f"cannot decode tile ({str(exc).splitlines()[0]})") from None
    if data[:4] == b"NITF" and pixels.dtype == np.uint8:
        _learn_nitf(data, pixels)
    return np.moveaxis(pixels, 0, -1).astype(np.uint8, copy=False)


def _learn_nitf(data: bytes, pixels: np.ndarray) -> None:
    """Remember ``data``'s header where it is GDAL's uncompressed header for this shape."""
    bands, height, width = pixels.shape
    header = _nitf_header(height, width, bands)
    if header is None or len(data) != len(header) + pixels.size or not data.startswith(header):
        return
    with _known_lock:
        known = _known_nitf.setdefault(len(data), [])
        if len(known) < 8 and all(h != header for h, _ in known):
            known.append((header, (bands, height, width)))
