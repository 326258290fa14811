"""Raster output: each chunk task writes its window (snapped to the COG's block grid,
:func:`snap_bounds`) as a tiled GeoTIFF *part* in the COG's own encoding (512-pixel tiles, ZSTD),
with its share of every overview level beside it, each on the block grid too; the client then lays
the parts' compressed tiles out as a Cloud-Optimized GeoTIFF (:func:`write_cog`): a tile is
encoded once, by the chunk task that owns it, while other chunks are still being read. Only the
overview levels whose tiles span chunks (the smallest) are assembled and encoded there.

The COG is in the image's grid: its CRS and geotransform, or its RPCs (RPC images) or GCPs.
Band 1 is the class id (with a colour table where it is the only band; class names in the band's metadata as
``CLASS_NAMES`` (JSON) and ``CLASS_<id>=<name>``); optional bands 2.. are each class's score (uint8,
0..255 for 0..1, same dtype as band 1). Pixels outside a regionOfInterest have the dtype's largest
class id, the COG's nodata where it has no score bands (:func:`nodata_value`). Internal 512-pixel
tiles, ZSTD (level 1), overviews of nearest samples (a class id is never averaged;
:func:`overview_layout`). Written to a temporary name beside the final one and renamed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import warnings
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
import rasterio
import rasterio.errors
import rasterio.shutil
import rasterio.windows
from rasterio.io import MemoryFile
from rasterio.rpc import RPC

from pipeline.reading import ImageInfo

BLOCK = 512
#: version of the parts (:func:`part_pieces`, :func:`write_tiff`; the regions' ``.npz``,
#: ``graphs.segment_job.save_regions``) and of the chunks they cover (:func:`snap_bounds`):
#: a resume keeps no part written in another format
PART_FORMAT = 3
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
    in the chunk's part (right of the chunk's own pixels, one level under the other, each from
    a block corner of the part)."""
    x0, y0, x1, y1 = bounds
    width, height = image_size
    layout = []
    top = 0
    for factor in overview_factors(width, height):
        ix0, ix1 = (int(v) for v in np.searchsorted(_samples(width, factor), [x0, x1]))
        iy0, iy1 = (int(v) for v in np.searchsorted(_samples(height, factor), [y0, y1]))
        layout.append((factor, (ix0, iy0, ix1, iy1), (_blocks(x1 - x0) * BLOCK, top)))
        top += _blocks(iy1 - iy0) * BLOCK  # each share starts on the part's block grid
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
    right, bottom = width, height
    for factor, (ix0, iy0, ix1, iy1), (left, top) in overview_layout(bounds, image_size):
        if ix1 <= ix0 or iy1 <= iy0:
            continue
        rows = _take(_samples(ih, factor)[iy0:iy1] - bounds[1])
        cols = _take(_samples(iw, factor)[ix0:ix1] - bounds[0])
        pieces.append((np.ascontiguousarray(bands[:, rows][:, :, cols]), (left, top)))
        right, bottom = max(right, left + ix1 - ix0), max(bottom, top + iy1 - iy0)
    return (right, bottom), pieces


def _blocks(length: int) -> int:
    return -(-length // BLOCK)


def alignment(chunk: int) -> int:
    """The grid a chunk side of ``chunk`` pixels snaps to: 512 × the largest power of 2 that
    fits, so that the tiles of the overview levels down to that factor lie in one chunk."""
    return BLOCK * 2 ** int(np.log2(max(1, chunk // BLOCK)))


def snap_bounds(bounds: tuple[int, int, int, int], image_size: tuple[int, int], step: int
                ) -> tuple[int, int, int, int]:
    """``bounds`` with each inner edge moved to the nearest multiple of ``step`` (the image's
    edges stay): the snapped chunks still partition the image (some may be empty) and each
    owns whole COG tiles. Stitching does not depend on the chunks, so nor does the raster."""
    def snap(value: int, size: int) -> int:
        return value if value in (0, size) else min(size, (value + step // 2) // step * step)

    width, height = image_size
    x0, y0, x1, y1 = bounds
    return snap(x0, width), snap(y0, height), snap(x1, width), snap(y1, height)


def _profile(width: int, height: int, count: int, dtype: str) -> dict[str, Any]:
    """The COG's tile encoding: 512-pixel tiles, ZSTD level 1 (on class rasters 6x faster to
    write than DEFLATE level 1 and smaller), bands interleaved by pixel."""
    return {"driver": "GTiff", "width": width, "height": height, "count": count, "dtype": dtype,
            "compress": "ZSTD", "zstd_level": 1, "tiled": True, "blockxsize": BLOCK, "blockysize": BLOCK,
            "interleave": "pixel"}


def write_tiff(path: str | Path, size: tuple[int, int], pieces: list[tuple[np.ndarray, tuple[int, int]]]
               ) -> None:
    """``pieces`` (arrays at their ``(left, top)``) as a ``size`` GeoTIFF in the COG's tile
    encoding (:func:`_profile`) without georeferencing, zero elsewhere."""
    count, dtype = pieces[0][0].shape[0], pieces[0][0].dtype
    with rasterio.Env(GDAL_NUM_THREADS="1"), warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)  # parts: pixels only
        with rasterio.open(path, "w", **_profile(*size, count, dtype.name)) as dst:
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


def nodata_value(dtype: str) -> int:
    """The class id of pixels outside a regionOfInterest: the dtype's largest value."""
    return int(np.iinfo(np.dtype(dtype)).max)


def _band_xml(count: int, dtype: str, class_names: tuple[str, ...]) -> str:
    """The VRT bands (no sources) that carry the COG's band metadata, nodata and colours."""
    gdal_type = {"uint8": "Byte", "uint16": "UInt16"}[dtype]
    names = json.dumps(list(class_names))
    nodata = f"<NoDataValue>{nodata_value(dtype)}</NoDataValue>" if count == 1 else ""
    bands = []
    for band in range(1, count + 1):
        if band == 1:
            meta = (f'<MDI key="CLASS_NAMES">{escape(names)}</MDI>'
                    + "".join(f'<MDI key="CLASS_{k}">{escape(n)}</MDI>' for k, n in enumerate(class_names)))
            extra = (f"<Description>class</Description>{nodata}<Metadata>{meta}</Metadata>"
                     "<ColorInterp>Palette</ColorInterp><ColorTable>"
                     + "".join('<Entry c1="{}" c2="{}" c3="{}" c4="{}"/>'.format(*PALETTE[k % len(PALETTE)])
                               for k in range(len(class_names))) + "</ColorTable>")
        else:
            name = class_names[band - 2]
            extra = (f"<Description>score:{escape(name)}</Description>"
                     f'<Metadata><MDI key="CLASS">{escape(name)}</MDI><MDI key="SCALE">255</MDI></Metadata>')
        bands.append(f'<VRTRasterBand dataType="{gdal_type}" band="{band}">{extra}</VRTRasterBand>')
    return (f'<Metadata><MDI key="SEGMENTATION_CLASSES">{escape(names)}</MDI></Metadata>'
            + "".join(bands))


# ------------------------------------------------------------------ the COG's TIFF structure
_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 16: 8, 17: 8, 18: 8}
#: tags that an overview's IFD repeats from the main one (encoding, colours, nodata)
_OVERVIEW_TAGS = {258, 259, 262, 277, 284, 317, 320, 338, 339, 42113}
#: tags of the layout, written for each IFD
_LAYOUT_TAGS = {254, 256, 257, 273, 278, 279, 322, 323, 324, 325}
#: compressed tiles past which the COG is a BigTIFF (a classic TIFF's offsets end at 4 GiB)
BIGTIFF_PAYLOAD = 2**32 - 2**26
Entry = tuple[int, int, bytes]  # TIFF type, count, value bytes (little-endian)


def _ifds(data: bytes) -> tuple[bytes, list[dict[int, Entry]]]:
    """A little-endian TIFF's bytes before its first IFD (a COG's ghost header) and its IFDs."""
    big = data[2:4] == b"+\0"
    if data[:2] != b"II" or data[2:4] not in (b"*\0", b"+\0"):
        raise ValueError("not a little-endian TIFF")
    head, count_fmt, entry_size, inline = (16, "<Q", 20, 8) if big else (8, "<H", 12, 4)
    offset = struct.unpack_from("<Q" if big else "<I", data, 8 if big else 4)[0]
    first, ifds = offset, []
    while offset:
        (n,) = struct.unpack_from(count_fmt, data, offset)
        start = offset + struct.calcsize(count_fmt)
        entries: dict[int, Entry] = {}
        for k in range(n):
            at = start + k * entry_size
            tag, kind = struct.unpack_from("<HH", data, at)
            count = struct.unpack_from("<Q" if big else "<I", data, at + 4)[0]
            size = _SIZES.get(kind, 1) * count
            where = at + (12 if big else 8)
            if size > inline:
                where = struct.unpack_from("<Q" if big else "<I", data, where)[0]
            entries[tag] = (kind, count, bytes(data[where:where + size]))
        ifds.append(entries)
        offset = struct.unpack_from("<Q" if big else "<I", data, start + n * entry_size)[0]
    return bytes(data[head:first]), ifds


def _numbers(entry: Entry) -> np.ndarray:
    kind, count, value = entry
    return np.frombuffer(value, {3: "<u2", 4: "<u4", 16: "<u8"}[kind], count)


class _Tiles:
    """The compressed tiles of a TIFF's first IFD (``data``: its bytes), on its 512-pixel grid."""

    def __init__(self, data: bytes):
        self.data = data
        ifd = _ifds(data)[1][0]
        self.columns = _blocks(int(_numbers(ifd[256])[0]))
        self.offsets, self.counts = _numbers(ifd[324]), _numbers(ifd[325])

    def tile(self, col: int, row: int) -> bytes:
        index = row * self.columns + col
        start = int(self.offsets[index])
        return self.data[start:start + int(self.counts[index])]


def _encoded(array: np.ndarray) -> _Tiles:
    """``bands × h × w`` in the COG's tile encoding, in memory."""
    count, height, width = array.shape
    with rasterio.Env(GDAL_NUM_THREADS="1"), warnings.catch_warnings(), MemoryFile() as memory:
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with memory.open(**_profile(width, height, count, array.dtype.name)) as dst:
            dst.write(array)
        return _Tiles(memory.read())


def _template(info: ImageInfo, count: int, dtype: str, class_names: tuple[str, ...], work: Path
              ) -> tuple[bytes, dict[int, Entry]]:
    """GDAL's COG ghost header and main-IFD tags (georeferencing, metadata, colours, encoding)
    for the image, from a 16 × 16 COG that GDAL writes with them (sizes and tiles replaced)."""
    vrt, tif = work / "template.vrt", work / "template.tif"
    small = dataclasses.replace(info, width=16, height=16)
    vrt.write_text(f'<VRTDataset rasterXSize="16" rasterYSize="16">{_geo_xml(small)}'
                   f"{_band_xml(count, dtype, class_names)}</VRTDataset>")
    with rasterio.Env(GDAL_PAM_ENABLED="NO"):
        rasterio.shutil.copy(str(vrt), str(tif), driver="COG", BLOCKSIZE=BLOCK, COMPRESS="ZSTD", LEVEL=1)
    ghost, ifds = _ifds(tif.read_bytes())
    return ghost, ifds[0]


def _level_tiles(parts: list[tuple[tuple[int, int, int, int], _Tiles, str]], level: int | None,
                 size: tuple[int, int], count: int, dtype: str) -> list[list[bytes]]:
    """The rows of compressed tiles of the full-resolution level (``level`` None) or of
    overview ``level`` (an index into :func:`overview_layout`): copied from the parts where
    every chunk's share starts on the level's block grid, else (the smallest levels) read from
    the parts' shares and encoded here."""
    width, height = size
    factor = 1 if level is None else overview_factors(width, height)[level]
    level_w, level_h = -(-width // factor), -(-height // factor)
    shares = []
    for bounds, tiles, path in parts:
        if level is None:
            share, (left, top) = bounds, (0, 0)
        else:
            _, share, (left, top) = overview_layout(bounds, size)[level]
        if share[2] > share[0] and share[3] > share[1]:
            shares.append((share, (left, top), tiles, path))
    def aligned(value: int, edge: int) -> bool:
        return value % BLOCK == 0 or value == edge

    if all(aligned(x0, level_w) and aligned(x1, level_w) and aligned(y0, level_h) and aligned(y1, level_h)
           for (x0, y0, x1, y1), *_ in shares):
        grid: list[list[bytes]] = [[b""] * _blocks(level_w) for _ in range(_blocks(level_h))]
        for (x0, y0, x1, y1), (left, top), tiles, _ in shares:
            for row in range(_blocks(y1 - y0)):
                for col in range(_blocks(x1 - x0)):
                    tile = tiles.tile(left // BLOCK + col, top // BLOCK + row)
                    grid[y0 // BLOCK + row][x0 // BLOCK + col] = tile
        return grid
    mosaic = np.zeros((count, level_h, level_w), dtype)
    for (x0, y0, x1, y1), (left, top), _, path in shares:
        with rasterio.open(path) as src:
            src.read(window=rasterio.windows.Window(left, top, x1 - x0, y1 - y0), out=mosaic[:, y0:y1, x0:x1])
    encoded = _encoded(mosaic)
    return [[encoded.tile(col, row) for col in range(_blocks(level_w))] for row in range(_blocks(level_h))]


def _entry(tag: int, kind: int, values: list[int] | np.ndarray) -> tuple[int, Entry]:
    array = np.asarray(values, {3: "<u2", 4: "<u4", 16: "<u8"}[kind])
    return tag, (kind, len(array), array.tobytes())


def _write_layout(path: Path, ghost: bytes, main: dict[int, Entry], size: tuple[int, int],
                  levels: list[list[list[bytes]]]) -> None:
    """A COG as GDAL's COG driver lays one out: the ghost header, every IFD (full resolution
    first), their values, then the tiles from the smallest overview to full resolution, each
    with its size before it and its last 4 bytes repeated after it (``BLOCK_LEADER``,
    ``BLOCK_TRAILER``), row by row."""
    width, height = size
    payload = sum(len(t) + 8 for level in levels for row in level for t in row)
    big = payload > BIGTIFF_PAYLOAD
    offset_kind, inline, entry_size, word = (16, 8, 20, "<Q") if big else (4, 4, 12, "<I")
    ifds: list[dict[int, Entry]] = []
    for index, level in enumerate(levels):
        factor = 1 if index == 0 else overview_factors(width, height)[index - 1]
        tags = {k: v for k, v in main.items()
                if k not in _LAYOUT_TAGS and (index == 0 or k in _OVERVIEW_TAGS)}
        tiles = sum(len(row) for row in level)
        tags.update([_entry(256, 4, [-(-width // factor)]), _entry(257, 4, [-(-height // factor)]),
                     _entry(322, 3, [BLOCK]), _entry(323, 3, [BLOCK]),
                     _entry(324, offset_kind, [0] * tiles), _entry(325, offset_kind, [0] * tiles)])
        if index:
            tags.update([_entry(254, 4, [1])])  # a reduced-resolution image
        ifds.append(dict(sorted(tags.items())))
    head = 16 if big else 8
    ghost_at = head
    position = ghost_at + len(ghost) + len(ghost) % 2
    ifd_at = []
    for tags in ifds:
        ifd_at.append(position)
        position += (8 if big else 2) + entry_size * len(tags) + (8 if big else 4)
    values_at: dict[tuple[int, int], int] = {}
    for index, tags in enumerate(ifds):
        for tag, (_, _, value) in tags.items():
            if len(value) > inline:
                position += position % 2
                values_at[index, tag] = position
                position += len(value)
    data_at = position + position % 2
    # tile offsets: the smallest overview first, full resolution last
    cursor = data_at
    for index in reversed(range(len(levels))):
        starts, counts = [], []
        for row in levels[index]:
            for tile in row:
                starts.append(cursor + 4)
                counts.append(len(tile))
                cursor += len(tile) + 8
        ifds[index].update([_entry(324, offset_kind, starts), _entry(325, offset_kind, counts)])
    out = bytearray(cursor)
    out[:head] = (b"II+\0" + struct.pack("<HHQ", 8, 0, ifd_at[0]) if big
                  else b"II*\0" + struct.pack("<I", ifd_at[0]))
    out[ghost_at:ghost_at + len(ghost)] = ghost
    for index, tags in enumerate(ifds):
        at = ifd_at[index]
        struct.pack_into("<Q" if big else "<H", out, at, len(tags))
        at += 8 if big else 2
        for tag, (kind, count, value) in tags.items():
            struct.pack_into("<HH" + word[1], out, at, tag, kind, count)
            field_at = at + (12 if big else 8)
            if len(value) > inline:
                struct.pack_into(word, out, field_at, values_at[index, tag])
                out[values_at[index, tag]:values_at[index, tag] + len(value)] = value
            else:
                out[field_at:field_at + len(value)] = value
            at += entry_size
        struct.pack_into(word, out, at, ifd_at[index + 1] if index + 1 < len(ifds) else 0)
    cursor = data_at
    for index in reversed(range(len(levels))):
        for row in levels[index]:
            for tile in row:
                struct.pack_into("<I", out, cursor, len(tile))
                out[cursor + 4:cursor + 4 + len(tile)] = tile
                out[cursor + 4 + len(tile):cursor + 8 + len(tile)] = tile[-4:].rjust(4, b"\0")
                cursor += len(tile) + 8
    path.write_bytes(out)


def write_cog(parts: Parts, info: ImageInfo, count: int, dtype: str, class_names: tuple[str, ...],
              destination: str | Path) -> str:
    """Lay the parts' tiles out as a COG at ``destination`` (a local path; temporary name, then
    renamed): the full-resolution tiles and those of every overview level whose chunk shares
    start on its block grid are copied as they are (no decoding, no encoding); the smallest
    levels are read from the parts' shares and encoded here. GDAL writes the georeferencing,
    metadata and colours (into a 16 × 16 template COG whose tags are copied)."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staged = destination.with_suffix(".partial.tif")
    size = (info.width, info.height)
    work = destination.with_suffix(".partial")
    work.mkdir(exist_ok=True)
    try:  # one Env for every GDAL call (each would build an AWS session outside one)
        with rasterio.Env(GDAL_NUM_THREADS="1"), warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)  # the parts
            ghost, main = _template(info, count, dtype, class_names, work)
            loaded = [(bounds, _Tiles(Path(path).read_bytes()), path) for bounds, path in parts]
            levels = [_level_tiles(loaded, level, size, count, dtype)
                      for level in [None, *range(len(overview_factors(*size)))]]
        _write_layout(staged, ghost, main, size, levels)
        os.replace(staged, destination)
    finally:
        for leftover in (staged, *work.glob("*")):
            if leftover.exists():
                leftover.unlink()
        work.rmdir()
    return str(destination)
