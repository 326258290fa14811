"""A synthetic image source: pixels generated on the fly, so huge jobs need no file.

``synthetic://WIDTHxHEIGHT?bands=3&dtype=uint8&spacing=256&size=12&seed=0`` is an image of
``WIDTH × HEIGHT`` pixels with a flat ``background`` and one bright (255) square of ``size``
pixels in every ``spacing × spacing`` cell of a lattice, at a seeded position inside its
cell (``spacing=0``: no objects). It is georeferenced in EPSG:4326 from ``origin=lon,lat``
with ``gsd`` degrees per pixel (``gsd=0``: pixel coordinates only).

:func:`describe` and :func:`open_image` have the interface of :mod:`pipeline.reading`'s: an
:class:`~pipeline.reading.ImageInfo` header and a lazily chunked ``xarray.DataArray``
``(band, y, x)`` whose chunks are rendered independently wherever they are computed.
:class:`SyntheticSource` renders any window in the job's chunk tasks (the same per-chunk path
as a file's windowed reads). :func:`truth` gives the exact object boxes in a window (for tests).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import numpy as np

from pipeline.reading import ImageError, ImageInfo
from pipeline.sensor_models import sensor_model

SCHEME = "synthetic://"
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def is_synthetic(url: str) -> bool:
    return url.startswith(SCHEME)


@dataclass(frozen=True)
class SyntheticImage:
    """The parsed parameters of a ``synthetic://`` URL."""

    width: int
    height: int
    bands: int = 3
    dtype: str = "uint8"
    spacing: int = 256
    size: int = 12
    seed: int = 0
    background: int = 30
    origin: tuple[float, float] = (10.0, 50.0)
    gsd: float = 1e-5
    block: int = 512

    @classmethod
    def parse(cls, url: str) -> SyntheticImage:
        """Parse ``url``; raise :class:`ImageError` naming the bad part."""
        parts = urlsplit(url)
        match = _SIZE.match(parts.netloc + parts.path.rstrip("/"))
        if parts.scheme != "synthetic" or match is None:
            raise ImageError(f"synthetic image URL must be synthetic://WIDTHxHEIGHT[?...]: {url}")
        fields: dict[str, Any] = {"width": int(match[1]), "height": int(match[2])}
        casts: dict[str, Any] = {
            "bands": int, "dtype": str, "spacing": int, "size": int, "seed": int,
            "background": int, "gsd": float, "block": int,
        }
        for key, value in parse_qsl(parts.query):
            try:
                if key == "origin":
                    lon, lat = (float(v) for v in value.split(","))
                    fields[key] = (lon, lat)
                elif key in casts:
                    fields[key] = casts[key](value)
                else:
                    raise ImageError(f"synthetic image URL: unknown parameter {key!r}: {url}")
            except ValueError:
                raise ImageError(f"synthetic image URL: bad value for {key}: {value!r}") from None
        image = cls(**fields)
        if min(image.width, image.height, image.bands, image.block) < 1:
            raise ImageError(f"synthetic image URL: sizes must be positive: {url}")
        if image.spacing and not 0 < image.size < image.spacing:
            raise ImageError(f"synthetic image URL: need 0 < size < spacing: {url}")
        try:
            np.dtype(image.dtype)
        except TypeError:
            raise ImageError(f"synthetic image URL: unknown dtype {image.dtype!r}") from None
        return image

    # ------------------------------------------------------------------ objects
    def _jitter(self, i: np.ndarray, j: np.ndarray, axis: int) -> np.ndarray:
        """Seeded offset of cell ``(i, j)``'s object inside its cell (a splitmix64 hash)."""
        with np.errstate(over="ignore"):
            z = (
                i.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
                + j.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
                + np.uint64(self.seed * 2 + axis + 1) * np.uint64(0x165667B19E3779F9)
            ) & _MASK64
            z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
            z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
            z = z ^ (z >> np.uint64(31))
        return (z % np.uint64(self.spacing - self.size)).astype(np.int64)

    def boxes(self, window: tuple[int, int, int, int]) -> np.ndarray:
        """``k × 4`` integer boxes ``(x0, y0, x1, y1)`` of the objects that touch ``window``,
        clipped to the image."""
        if not self.spacing:
            return np.empty((0, 4), dtype=np.int64)
        x0, y0, x1, y1 = window
        cols = np.arange(max(0, x0 // self.spacing - 1), min(x1, self.width) // self.spacing + 1)
        rows = np.arange(max(0, y0 // self.spacing - 1), min(y1, self.height) // self.spacing + 1)
        i, j = (a.ravel() for a in np.meshgrid(cols, rows))
        bx = i * self.spacing + self._jitter(i, j, 0)
        by = j * self.spacing + self._jitter(i, j, 1)
        out = np.stack([bx, by, np.minimum(bx + self.size, self.width),
                        np.minimum(by + self.size, self.height)], axis=1)
        hit = (out[:, 0] < min(x1, self.width)) & (out[:, 1] < min(y1, self.height))
        hit &= (out[:, 2] > x0) & (out[:, 3] > y0) & (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
        return out[hit]

    def render(self, window: tuple[int, int, int, int]) -> np.ndarray:
        """The pixels ``(bands, rows, cols)`` of ``window`` ``(x0, y0, x1, y1)``."""
        x0, y0, x1, y1 = window
        # band-last storage (a transposed view), like pipeline.reading.RasterSource.read
        pixels = np.full((y1 - y0, x1 - x0, self.bands), self.background, dtype=self.dtype)
        pixels = pixels.transpose(2, 0, 1)
        boxes = self.boxes(window)
        if len(boxes):  # every object pixel inside the window, as (row, col) in window pixels
            steps = np.arange(self.size)
            xs = np.maximum(boxes[:, 0], x0)[:, None] - x0 + steps
            ys = np.maximum(boxes[:, 1], y0)[:, None] - y0 + steps
            valid = (ys < np.minimum(boxes[:, 3], y1)[:, None] - y0)[:, :, None] & (
                xs < np.minimum(boxes[:, 2], x1)[:, None] - x0
            )[:, None, :]
            rows = np.broadcast_to(ys[:, :, None], valid.shape)
            cols = np.broadcast_to(xs[:, None, :], valid.shape)
            pixels[:, rows[valid], cols[valid]] = 255
        return pixels

    # ------------------------------------------------------------------ header
    def info(self, url: str) -> ImageInfo:
        georeferenced = self.gsd > 0
        lon, lat = self.origin
        return ImageInfo(
            url=url,
            width=self.width,
            height=self.height,
            bands=self.bands,
            dtype=self.dtype,
            block_width=self.block,
            block_height=self.block,
            bits=None,
            nodata=None,
            crs='GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,298.257223563]],'
            'PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433],AUTHORITY["EPSG","4326"]]'
            if georeferenced else None,
            transform=(self.gsd, 0.0, lon, 0.0, -self.gsd, lat) if georeferenced else None,
            driver="SYNTHETIC",
        )


def describe(url: str) -> ImageInfo:
    """The header of a synthetic image (raises :class:`ImageError` for a bad URL)."""
    return SyntheticImage.parse(url).info(url)


def truth(url: str, window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """The exact boxes (``k × 4``, full-image pixels) of the objects inside ``window``."""
    image = SyntheticImage.parse(url)
    x0, y0, x1, y1 = window or (0, 0, image.width, image.height)
    boxes = image.boxes((x0, y0, x1, y1))
    inside = (boxes[:, 0] >= x0) & (boxes[:, 1] >= y0) & (boxes[:, 2] <= x1) & (boxes[:, 3] <= y1)
    return boxes[inside]


@dataclass(frozen=True)
class SyntheticSource:
    """A picklable window reader of a synthetic image, like :class:`pipeline.reading.RasterSource`:
    each read renders its window (plus whatever halo it asks for) on the fly."""

    url: str

    @property
    def image(self) -> SyntheticImage:
        return SyntheticImage.parse(self.url)

    def read(self, window: tuple[int, int, int, int], band_last: bool = True) -> np.ndarray:
        """Pixels ``(bands, rows, cols)`` of ``(x0, y0, x1, y1)`` (in whatever layout the
        rendering gives: ``band_last`` is a file's choice)."""
        return self.image.render(window)


def _render_block(image: SyntheticImage, block_info: dict[Any, Any] | None = None) -> np.ndarray:
    assert block_info is not None
    (_, _), (y0, y1), (x0, x1) = block_info[None]["array-location"]
    return image.render((x0, y0, x1, y1))


def open_image(url: str, chunks: int | tuple[int, int] = 4096) -> Any:
    """The synthetic image as a lazily chunked ``xarray.DataArray`` ``(band, y, x)``, with
    ``.attrs["info"]`` and ``.attrs["sensor_model"]`` like :func:`pipeline.reading.open_image`."""
    import dask.array as da
    import xarray as xr

    image = SyntheticImage.parse(url)
    rows, cols = (chunks, chunks) if isinstance(chunks, int) else chunks
    data = da.map_blocks(
        _render_block,
        image,
        dtype=np.dtype(image.dtype),
        chunks=((image.bands,), da.core.normalize_chunks(rows, (image.height,))[0],
                da.core.normalize_chunks(cols, (image.width,))[0]),
        meta=np.empty((0, 0, 0), dtype=image.dtype),
        name="synthetic-" + hashlib.sha256(f"{url}|{rows}|{cols}".encode()).hexdigest()[:16],
    )
    info = image.info(url)
    array = xr.DataArray(data, dims=("band", "y", "x"),
                         coords={"band": np.arange(1, image.bands + 1)})
    array.attrs["info"] = info
    array.attrs["sensor_model"] = sensor_model(info)
    return array
