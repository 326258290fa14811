"""Pixel statistics and the range adjustment: how pixels deeper than 8 bits become uint8.

One dynamic-range adjustment (DRA): :func:`dynamic_range` computes each band's ``(low, high)``
(the 2nd and 98th percentiles), once per image from :func:`sample_pixels` (or, without image
statistics, from the pixels at hand), and :func:`stretch` applies a linear ``(low, high)`` →
``0..255`` map to a chunk or a batch of tiles, in float32 blocks (never a float64 copy).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import rasterio.errors
import rasterio.windows

from pipeline.reading import ImageError, ImageInfo, gdal_env, gdal_error_line, gdal_path
from pipeline.security import open_raster

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
    if info.nodata is not None and not np.isnan(info.nodata):  # the file's, or its STAC Item's
        data = np.ma.masked_equal(data, info.nodata)
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
    """Per-band ``(low, high)`` of ``samples`` ``(bands, n)``: their ``percentiles`` (finite
    values only; an empty band gets ``(0, 255)``, a constant one a range of 1). The one place
    the DRA's range is computed, band by band (no float64 copy of all the pixels)."""
    lows, highs = [], []
    for band in samples:
        values = np.asarray(band).ravel()
        if not np.issubdtype(values.dtype, np.integer):
            values = values[np.isfinite(values)]
        low, high = np.percentile(values, percentiles) if values.size else (0.0, 255.0)
        if high <= low:
            high = low + 1.0
        lows.append(float(low))
        highs.append(float(high))
    return lows, highs


#: elements of :func:`stretch`'s float32 working block (4 MiB)
STRETCH_BLOCK = 1 << 20


def stretch(pixels: np.ndarray, low: Any, high: Any) -> np.ndarray:
    """``pixels`` mapped linearly from ``(low, high)`` to ``0..255``, rounded, clipped, as uint8.

    ``low``/``high`` are scalars or per-band values, bands on the last axis. The one place a
    range adjustment is applied: in float32, in place in one working block of about
    :data:`STRETCH_BLOCK` elements along the first axis, so the uint8 result is the only
    full-size allocation. Pixels of 16 bits or less are exact in float32; wider ones are
    offset in float64 inside numpy's ufunc buffers. Non-finite pixels count as 0.
    """
    pixels = np.asarray(pixels)
    if pixels.ndim == 0:
        return stretch(pixels.reshape(1), low, high).reshape(())
    low64 = np.asarray(low, dtype=np.float64)
    scale = (255.0 / np.maximum(np.asarray(high, dtype=np.float64) - low64, 1e-9)).astype(np.float32)
    exact = pixels.dtype.itemsize <= 2 or pixels.dtype == np.float32
    floating = not np.issubdtype(pixels.dtype, np.integer) and pixels.dtype != np.bool_
    zero = np.rint(-low64 * scale) if floating else None  # where non-finite pixels land
    out = np.empty(pixels.shape, dtype=np.uint8)
    per_row = max(1, pixels.size // max(1, pixels.shape[0]))
    rows = max(1, min(pixels.shape[0], STRETCH_BLOCK // per_row))
    work = np.empty((rows, *pixels.shape[1:]), dtype=np.float32)
    for start in range(0, pixels.shape[0], rows):
        block = pixels[start:start + rows]
        buf = work[: len(block)]
        if exact:
            np.subtract(block, low64.astype(np.float32), out=buf, dtype=np.float32)
        else:
            np.subtract(block, low64, out=buf, casting="same_kind")
        np.multiply(buf, scale, out=buf)
        np.rint(buf, out=buf)
        if zero is not None:
            np.copyto(buf, np.broadcast_to(zero, buf.shape), where=~np.isfinite(buf))
        np.clip(buf, 0.0, 255.0, out=buf)
        out[start:start + rows] = buf
    return out


def deep_pixels(info: ImageInfo) -> bool:
    """Whether the image is deeper than 8 bits (or not 8-bit unsigned, or scaled)."""
    return (info.bits or 0) > 8 or info.dtype != "uint8" or bool(info.scales)


def range_adjustment(
    requested: str | None, info: ImageInfo, options: dict[str, str] | None = None
) -> dict[str, Any]:
    """The request's ``rangeAdjustment`` for this image, resolved once per image.

    Default: ``DRA`` for images deeper than 8 bits, else ``NONE``. ``DRA`` is a per-band
    2nd–98th percentile stretch of pixels sampled from the image (see :func:`sample_pixels`),
    so every tile of the image gets the same mapping. The result records the parameters
    (``{"type", "low", "high", "percentiles", "sample", "samplePixels"}``) for the summary.

    Bands with a scale and offset (``info.scales``, the file's or its STAC Item's) give the
    model ``scale × pixel + offset`` (recorded as ``scale``, ``offset``): ``DRA`` and ``MINMAX``
    stretch ranges that a positive scale maps linearly, so their tiles are the same; ``NONE``
    clips the scaled values to 0..255, which is the stretch ``low = −offset/scale``,
    ``high = low + 255/scale`` of the raw pixels. A scale that is not positive is not applied.
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
    if info.scales and all(scale > 0 for scale in info.scales):
        record.update(scale=list(info.scales), offset=list(info.offsets))
        if kind == "NONE":
            low = [-offset / scale for scale, offset in zip(info.scales, info.offsets, strict=True)]
            record.update(low=low, high=[v + 255.0 / s for v, s in zip(low, info.scales, strict=True)])
    elif info.scales:
        record["scaleNotApplied"] = list(info.scales)  # not all positive
    return record
