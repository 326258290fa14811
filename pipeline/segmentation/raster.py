"""Raster output: each chunk task writes its window as a tiled GeoTIFF *part* (ZSTD), with its
share of every overview level beside it; one task then mosaics the parts (a VRT whose overviews
are VRTs of the parts' overview shares) into a Cloud-Optimized GeoTIFF with GDAL's COG driver,
which copies those overviews rather than computing them.

The COG is in the image's grid: its CRS and geotransform, or its RPCs (RPC images) or GCPs.
Band 1 is the class id (with a colour table where it is the only band; class names in the band's metadata as
``CLASS_NAMES`` (JSON) and ``CLASS_<id>=<name>``, and as the band's category names in the
sidecar-free VRT); optional bands 2.. are each class's score (uint8, 0..255 for 0..1, same
dtype as band 1). Pixels outside a regionOfInterest have the dtype's largest class id, the COG's
nodata where it has no score bands (:func:`nodata_value`). Internal 512-pixel tiles, DEFLATE,
overviews of nearest samples (a class id is never averaged; :func:`overview_layout`). Written to
a temporary name beside the final one and renamed.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
import rasterio
import rasterio.errors
import rasterio.shutil
import rasterio.windows
from rasterio.rpc import RPC

from pipeline.reading import ImageInfo

BLOCK = 512
#: a distinct colour per class (class 0, the background, is transparent black)
PALETTE = [(0, 0, 0, 0), (31, 119, 180, 255), (255, 127, 14, 255), (44, 160, 44, 255),
           (214, 39, 40, 255), (148, 103, 189, 255), (140, 86, 75, 255), (227, 119, 194, 255),
           (127, 127, 127, 255), (188, 189, 34, 255), (23, 190, 207, 255)]


def band_data(classes: np.ndarray, scores: np.ndarray | None, score_bands: bool,
              n_classes: int) -> np.ndarray:
    """The bands of a part: class ids, then (``score_bands``) each class's score as 0..255
    (``scores`` None: the one-hot of ``classes``)."""
    if not score_bands:
        return classes[None]
    if scores is None:
        ids = np.arange(n_classes, dtype=classes.dtype)[:, None, None]
        return np.concatenate([classes[None], (classes[None] == ids).astype(classes.dtype) * 255])
    quantised = np.rint(np.clip(scores, 0.0, 1.0) * 255).astype(classes.dtype)
    return np.concatenate([classes[None], quantised])


def overview_factors(width: int, height: int) -> list[int]:
    """The COG's overview factors: 2, 4, ... until a level fits in one block, as GDAL's."""
    factors: list[int] = []
    factor = 1
    while max(-(-width // factor), -(-height // factor)) > BLOCK:
        factor *= 2
        factors.append(factor)
    return factors


def _samples(length: int, factor: int) -> np.ndarray:
    """The full-resolution index that each overview pixel along an axis takes (nearest: the
    middle of its ``factor`` pixels, the last pixel for a partial last one)."""
    return np.minimum(np.arange(-(-length // factor)) * factor + factor // 2, length - 1)


def overview_layout(bounds: tuple[int, int, int, int], image_size: tuple[int, int]
                    ) -> list[tuple[int, tuple[int, int, int, int], tuple[int, int]]]:
    """Per overview factor: the overview pixels ``(x0, y0, x1, y1)`` whose samples lie in the
    chunk ``bounds`` (so each overview pixel comes from exactly one chunk), and where they sit
    in the chunk's part (right of the chunk's own pixels, one level under the other)."""
    x0, y0, x1, y1 = bounds
    width, height = image_size
    layout = []
    top = 0
    for factor in overview_factors(width, height):
        ix0, ix1 = (int(v) for v in np.searchsorted(_samples(width, factor), [x0, x1]))
        iy0, iy1 = (int(v) for v in np.searchsorted(_samples(height, factor), [y0, y1]))
        layout.append((factor, (ix0, iy0, ix1, iy1), (x1 - x0, top)))
        top += iy1 - iy0
    return layout


def _take(samples: np.ndarray) -> slice | np.ndarray:
    """``samples`` (evenly spaced but maybe the last) as a slice where they are evenly spaced."""
    if len(samples) > 1 and (np.diff(samples) == samples[1] - samples[0]).all():
        return slice(int(samples[0]), int(samples[-1]) + 1, int(samples[1] - samples[0]))
    return samples


def part_pieces(bands: np.ndarray, bounds: tuple[int, int, int, int], image_size: tuple[int, int]
                ) -> tuple[tuple[int, int], list[tuple[np.ndarray, tuple[int, int]]]]:
    """A chunk's part: its bands at ``(0, 0)``, and right of them its share of each overview
    level (nearest samples: a class id is never averaged; see :func:`overview_layout`);
    the part's ``(width, height)`` and its pieces with their ``(left, top)``."""
    _, height, width = bands.shape
    pieces = [(bands, (0, 0))]
    iw, ih = image_size
    extra = 0
    for factor, (ix0, iy0, ix1, iy1), (left, top) in overview_layout(bounds, image_size):
        if ix1 <= ix0 or iy1 <= iy0:
            continue
        rows = _take(_samples(ih, factor)[iy0:iy1] - bounds[1])
        cols = _take(_samples(iw, factor)[ix0:ix1] - bounds[0])
        pieces.append((np.ascontiguousarray(bands[:, rows][:, :, cols]), (left, top)))
        extra = max(extra, ix1 - ix0)
    return (width + extra, height), pieces


def write_tiff(path: str | Path, size: tuple[int, int], pieces: list[tuple[np.ndarray, tuple[int, int]]]
               ) -> None:
    """``pieces`` (arrays at their ``(left, top)``) as a ``size`` tiled GeoTIFF without
    georeferencing, zero elsewhere (ZSTD level 1: 15x faster than DEFLATE level 1 on class
    rasters, and smaller)."""
    width, height = size
    count, dtype = pieces[0][0].shape[0], pieces[0][0].dtype
    tiled = height >= 16 and width >= 16
    profile: dict[str, Any] = {"driver": "GTiff", "width": width, "height": height, "count": count,
                               "dtype": dtype.name, "compress": "ZSTD", "zstd_level": 1, "tiled": tiled}
    if tiled:
        profile.update(blockxsize=min(BLOCK, 16 * (width // 16)), blockysize=min(BLOCK, 16 * (height // 16)))
    with rasterio.Env(GDAL_NUM_THREADS="1"), warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)  # parts: pixels only
        with rasterio.open(path, "w", **profile) as dst:
            for array, (left, top) in pieces:
                dst.write(array, window=rasterio.windows.Window(left, top, array.shape[2], array.shape[1]))


def _geo_xml(info: ImageInfo) -> str:
    """The VRT elements that put the mosaic in the image's grid and CRS (or RPCs/GCPs)."""
    parts = []
    if info.crs and info.transform:
        a, b, c, d, e, f = info.transform
        parts.append(f"<SRS>{escape(info.crs)}</SRS>")
        parts.append(f"<GeoTransform>{c!r}, {a!r}, {b!r}, {f!r}, {d!r}, {e!r}</GeoTransform>")
    if info.rpcs:
        items = "".join(f'<MDI key="{k}">{escape(str(v))}</MDI>'
                        for k, v in RPC(**info.rpcs).to_gdal().items())
        parts.append(f'<Metadata domain="RPC">{items}</Metadata>')
    if info.gcps and not info.transform:
        gcps = "".join(f'<GCP Id="{i}" Pixel="{col!r}" Line="{row!r}" X="{x!r}" Y="{y!r}" Z="{z!r}"/>'
                       for i, (row, col, x, y, z) in enumerate(info.gcps))
        parts.append(f"<GCPList Projection=\"{escape(info.gcp_crs or '')}\">{gcps}</GCPList>")
    return "".join(parts)


Parts = list[tuple[tuple[int, int, int, int], str]]


def _sources(parts: Parts, band: int, size: tuple[int, int], level: int | None) -> str:
    """SimpleSources of ``band`` of every part: its chunk's pixels (``level`` None) or its share
    of overview level ``level`` (an index into :func:`overview_layout`)."""
    sources = []
    for bounds, part in parts:
        if level is None:
            x0, y0, x1, y1 = bounds
            left = top = 0
        else:
            _, (x0, y0, x1, y1), (left, top) = overview_layout(bounds, size)[level]
        if x1 <= x0 or y1 <= y0:
            continue
        sources.append(
            f"<SimpleSource><SourceFilename relativeToVRT=\"0\">{escape(part)}</SourceFilename>"
            f"<SourceBand>{band}</SourceBand>"
            f'<SrcRect xOff="{left}" yOff="{top}" xSize="{x1 - x0}" ySize="{y1 - y0}"/>'
            f'<DstRect xOff="{x0}" yOff="{y0}" xSize="{x1 - x0}" ySize="{y1 - y0}"/></SimpleSource>')
    return "".join(sources)


def nodata_value(dtype: str) -> int:
    """The class id of pixels outside a regionOfInterest: the dtype's largest value."""
    return int(np.iinfo(np.dtype(dtype)).max)


def mosaic_vrt(parts: Parts, info: ImageInfo, count: int, dtype: str, class_names: tuple[str, ...],
               path: str | Path) -> str:
    """A VRT of the parts (each at its ``(x0, y0, x1, y1)``) in the image's grid, with one
    VRT per overview level (``<path>.ovr<factor>.vrt``) of the parts' overview shares as its
    overviews (so GDAL's COG driver copies them instead of computing them)."""
    gdal_type = {"uint8": "Byte", "uint16": "UInt16"}[dtype]
    names = json.dumps(list(class_names))
    size = (info.width, info.height)
    nodata = f"<NoDataValue>{nodata_value(dtype)}</NoDataValue>" if count == 1 else ""
    levels = []
    for level, factor in enumerate(overview_factors(*size)):
        level_path = f"{path}.ovr{factor}.vrt"
        Path(level_path).write_text(
            f'<VRTDataset rasterXSize="{-(-info.width // factor)}" rasterYSize="{-(-info.height // factor)}">'
            + "".join(f'<VRTRasterBand dataType="{gdal_type}" band="{band}">{nodata}'
                      f"{_sources(parts, band, size, level)}</VRTRasterBand>" for band in range(1, count + 1))
            + "</VRTDataset>")
        levels.append(level_path)
    bands = []
    for band in range(1, count + 1):
        overviews = "".join(f'<Overview><SourceFilename relativeToVRT="0">{escape(level)}</SourceFilename>'
                            f"<SourceBand>{band}</SourceBand></Overview>" for level in levels)
        if band == 1:
            meta = (f'<MDI key="CLASS_NAMES">{escape(names)}</MDI>'
                    + "".join(f'<MDI key="CLASS_{k}">{escape(n)}</MDI>' for k, n in enumerate(class_names)))
            extra = (f"<Description>class</Description>{nodata}<Metadata>{meta}</Metadata>"
                     "<ColorInterp>Palette</ColorInterp><ColorTable>"
                     + "".join('<Entry c1="{}" c2="{}" c3="{}" c4="{}"/>'.format(*PALETTE[k % len(PALETTE)])
                               for k in range(len(class_names))) + "</ColorTable>"
                     "<CategoryNames>" + "".join(f"<Category>{escape(n)}</Category>" for n in class_names)
                     + "</CategoryNames>")
        else:
            name = class_names[band - 2]
            extra = (f"<Description>score:{escape(name)}</Description>"
                     f'<Metadata><MDI key="CLASS">{escape(name)}</MDI><MDI key="SCALE">255</MDI></Metadata>')
        bands.append(f'<VRTRasterBand dataType="{gdal_type}" band="{band}">{extra}'
                     f"{_sources(parts, band, size, None)}{overviews}</VRTRasterBand>")
    text = (f'<VRTDataset rasterXSize="{info.width}" rasterYSize="{info.height}">{_geo_xml(info)}'
            f'<Metadata><MDI key="SEGMENTATION_CLASSES">{escape(names)}</MDI></Metadata>'
            + "".join(bands) + "</VRTDataset>")
    Path(path).write_text(text)
    return str(path)


def write_cog(parts: Parts, info: ImageInfo, count: int, dtype: str, class_names: tuple[str, ...],
              destination: str | Path) -> str:
    """Mosaic the parts into a COG at ``destination`` (a local path; temporary name, then
    renamed). GDAL streams the mosaic block by block (no whole-image array) and copies the
    overviews from the parts (nothing resampled here)."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    vrt = destination.with_suffix(".partial.vrt")
    staged = destination.with_suffix(".partial.tif")
    mosaic_vrt(parts, info, count, dtype, class_names, vrt)
    try:
        with rasterio.Env(GDAL_CACHEMAX=256, GDAL_NUM_THREADS="ALL_CPUS"):
            rasterio.shutil.copy(str(vrt), str(staged), driver="COG", BLOCKSIZE=BLOCK,
                                 COMPRESS="ZSTD", LEVEL=1, BIGTIFF="IF_SAFER", NUM_THREADS="ALL_CPUS")
        os.replace(staged, destination)
    finally:
        for leftover in (vrt, staged, staged.with_suffix(".tif.aux.xml"),
                         *destination.parent.glob(f"{vrt.name}.ovr*.vrt")):
            if leftover.exists():
                leftover.unlink()
    return str(destination)
