"""The analyst's side: :func:`segment` runs a segmenter eagerly on a small window."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.models import ModelError
from pipeline.segmentation.contract import BLEND
from pipeline.segmentation.stitch import stitch_chunk
from pipeline.tiling import TileGrid, chunk_size, to_uint8


def segment(url: str, model: Any = "vegetation", window: tuple[int, int, int, int] | None = None, *,
            parameters: dict[str, Any] | None = None, tile_size: int = 512, overlap: int = 64,
            stitch: str = BLEND, range_adjustment: str | None = None) -> Any:
    """Segment ``window`` ``(x0, y0, x1, y1)`` (default: the whole image, for small images) of
    ``url`` in this process; a ``(y, x)`` ``xarray.DataArray`` of class ids, its coordinates in
    the image's CRS (pixel centres; pixel indices where the image has no affine georeferencing).

    ``model`` is a built-in segmenter name (``"vegetation"``, ``"threshold"``), a
    ``"package.module:factory"``, a dict ``{"type", "name", "parameters"}`` or a ModelSpec.
    Tiling and stitching are a job's, over the window (``stitch``: ``BLEND`` or ``CORE``).
    ``range_adjustment`` (default ``DRA`` for images deeper than 8 bits) is computed once over the
    window. ``attrs``: ``class_names``, ``flag_values``/``flag_meanings`` (CF), ``url``,
    ``window``, ``crs``.
    """
    import xarray as xr

    from pipeline.api import as_model_spec, read_clipped_window

    spec = as_model_spec(model, parameters)
    info, (x0, y0, x1, y1), pixels = read_clipped_window(url, window)
    adjustment = (range_adjustment or ("NONE" if info.dtype == "uint8" else "DRA")).upper()
    pixels = np.moveaxis(to_uint8(np.moveaxis(pixels, 0, -1), adjustment, info.bits), -1, 0)
    width, height = x1 - x0, y1 - y0
    grid = TileGrid(width, height, tile_size, overlap,
                    chunk_size(tile_size, overlap, max(width, height) + tile_size))
    result = stitch_chunk(pixels, (0, 0), (0, 0, width, height), grid, spec, stitch.upper())
    if result.failed_tiles:
        first = result.failed_tiles[0]
        raise ModelError(f"{len(result.failed_tiles)} of {result.tiles} tiles failed, first at "
                         f"{first['window']}: {first['reason']}")
    cols, rows = np.arange(x0, x1) + 0.5, np.arange(y0, y1) + 0.5
    if info.transform is not None and info.transform[1] == 0 and info.transform[3] == 0:
        a, _, c, _, e, f = info.transform
        xs, ys = c + a * cols, f + e * rows
    else:
        xs, ys = cols, rows
    names = list(result.class_names)
    return xr.DataArray(
        result.classes, dims=("y", "x"), coords={"y": ys, "x": xs}, name="class",
        attrs={"class_names": names, "flag_values": list(range(len(names))),
               "flag_meanings": " ".join(n.replace(" ", "_") for n in names), "url": url,
               "window": [x0, y0, x1, y1], "crs": info.crs},
    )
