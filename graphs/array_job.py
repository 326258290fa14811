"""The array job: detection over any lazily chunked ``(band, y, x)`` DataArray.

The array is rechunked to the job's chunk layout (:class:`~pipeline.tiling.TileGrid`: whole
tile strides), each chunk gets the pixels its last tiles reach into as a right/bottom halo
(``dask.array.overlap.overlap``, no boundary), and every chunk runs the URL job's own per-chunk
step (:class:`graphs.image_job.ChunkModel`: tiles, the ownership rule, the range adjustment).
Each chunk task also merges what is final within it (:func:`pipeline.merge.settled`); one
reduce task merges the detections left at chunk borders and geolocates all of them
(:func:`pipeline.geolocate.to_features`). So the same pixels give the same features as a URL
job, whatever the array's own chunks.
"""

from __future__ import annotations

from typing import Any

import dask
import dask.array as da
import geopandas as gpd
import numpy as np
from dask.base import tokenize

from graphs.image_job import ChunkModel
from pipeline.detections import Detections
from pipeline.geolocate import to_features
from pipeline.infer import ChunkResult
from pipeline.merge import border_mask, distill, settled
from pipeline.models import ModelError, ModelSpec
from pipeline.sensor_models import AffineSensorModel, PixelSensorModel, SensorModel
from pipeline.tiling import DEFAULT_CHUNK_TARGET, FIXED_STRIDE, TileGrid, chunk_size


def array_sensor_model(array: Any) -> SensorModel:
    """An affine model from rioxarray's ``.rio.transform()`` and ``.rio.crs``; else the
    ``attrs["sensor_model"]`` of an unsliced :func:`pipeline.open_image` array (an RPC image);
    else pixels."""
    rio = getattr(array, "rio", None)
    if rio is not None and rio.crs is not None:
        return AffineSensorModel(tuple(rio.transform())[:6], rio.crs.to_wkt())
    attrs = getattr(array, "attrs", {})
    info, model = attrs.get("info"), attrs.get("sensor_model")
    if model is not None and info is not None and as_pixels(array).shape[1:] == (info.height, info.width):
        return model  # type: ignore[no-any-return]
    return PixelSensorModel()


def array_bits(array: Any) -> int | None:
    """The significant bits of an :func:`pipeline.open_image` array's pixels (``MINMAX``)."""
    info = getattr(array, "attrs", {}).get("info")
    return getattr(info, "bits", None)


def array_nodata(array: Any) -> float | None:
    """The array's nodata as rioxarray declares it (``.rio.nodata``: its ``_FillValue``, or NaN
    where ``.rio.encoded_nodata`` says it was masked), if any. As in a URL job, such pixels are 0
    in the model's tiles (:class:`graphs.image_job.ChunkModel`; NaN pixels are left as they are)."""
    rio = getattr(array, "rio", None)
    nodata = rio.nodata if rio is not None else None
    return None if nodata is None else float(nodata)


def as_pixels(array: Any) -> da.Array:
    """The pixels of a ``(band, y, x)`` or ``(y, x)`` DataArray (or array) as a dask array
    ``(bands, height, width)``."""
    dims = tuple(getattr(array, "dims", ()))
    if dims and dims[-2:] != ("y", "x"):
        raise ValueError(f"detect needs a DataArray with dims (band, y, x) or (y, x), not {dims}")
    data = getattr(array, "data", array)
    if not isinstance(data, da.Array):
        data = da.from_array(np.asarray(data), chunks=DEFAULT_CHUNK_TARGET)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise ValueError(f"detect needs a (band, y, x) or (y, x) array, not {data.ndim} dimensions")
    return data


def halo(grid: TileGrid) -> tuple[int, int]:
    """How far ``(x, y)`` past its own pixels a chunk's tiles read (the overlap for
    ``FIXED_STRIDE``; the spread overlap, at least, for ``VARIABLE_OVERLAP``)."""
    reach = [0, 0]
    for row in range(grid.chunks_y):
        for col in range(grid.chunks_x):
            x0, y0, x1, y1 = grid.chunk_bounds(row, col)
            wx0, wy0, wx1, wy1 = grid.chunk_window(row, col)
            reach = [max(reach[0], wx1 - x1), max(reach[1], wy1 - y1)]
    return reach[0], reach[1]


def grid_chunks(grid: TileGrid) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The chunk heights and widths of the grid's layout (:meth:`TileGrid.chunk_bounds`)."""
    ys = tuple(grid.chunk_bounds(r, 0)[3] - grid.chunk_bounds(r, 0)[1] for r in range(grid.chunks_y))
    xs = tuple(grid.chunk_bounds(0, c)[2] - grid.chunk_bounds(0, c)[0] for c in range(grid.chunks_x))
    return ys, xs


def with_halo(pixels: da.Array, grid: TileGrid) -> da.Array:
    """The pixels rechunked to the grid's chunks, each with its right/bottom halo.

    Measured (``benchmarks/bench_xarray.py``, 16384² COG): an array already chunked on the grid
    costs no rechunk; one of 512-px chunks costs a rechunk, which beat slicing each chunk's
    window (halo included) straight from the 512-px chunks (3.96 s against 5.45 s)."""
    ys, xs = grid_chunks(grid)
    laid_out = pixels.rechunk((pixels.shape[0], ys, xs))
    hx, hy = halo(grid)
    if hx or hy:
        laid_out = da.overlap.overlap(laid_out, depth={0: 0, 1: (0, hy), 2: (0, hx)}, boundary="none")
    return laid_out


def _detect_block(block: np.ndarray, model: ChunkModel, algorithm: Any,
                  block_info: dict[Any, Any] | None = None) -> np.ndarray:
    """One chunk (its pixels from its own origin, and its halo) → a 1 × 1 object array of
    ``(result, final, waiting)``: the chunk's :class:`ChunkResult` (without detections), its
    merged final detections, and those left for the cross-chunk merge."""
    assert block_info is not None
    row, col = block_info[0]["chunk-location"][1:]
    grid = model.grid
    bx0, by0 = grid.chunk_bounds(row, col)[:2]
    x0, y0, x1, y1 = grid.chunk_window(row, col)
    pixels = np.asarray(block[:, y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0])
    result: ChunkResult = model.detect(pixels, row, col)
    detections = result.detections
    border = border_mask(detections.boxes, grid.chunk_reach(row, col))
    final = settled(detections, border, algorithm)
    merged = distill(detections.select(final), algorithm)
    result.detections = Detections()
    out = np.empty((1, 1), dtype=object)
    out[0, 0] = (result, merged, detections.select(~final))
    return out


def chunk_detections(pixels: da.Array, spec: ModelSpec, grid: TileGrid, *, range_adjustment: str = "NONE",
                     bits: int | None = None, algorithm: Any = None, nodata: float | None = None) -> da.Array:
    """Lazy ``(chunks_y, chunks_x)`` object array of each chunk's ``(result, final, waiting)``;
    ``nodata`` pixels are 0 in the model's tiles."""
    laid_out = with_halo(pixels, grid)
    model = ChunkModel(grid, spec, range_adjustment, bits, nodata=nodata)
    token = tokenize(laid_out.name, grid, spec.key, range_adjustment, algorithm, nodata)
    return da.map_blocks(_detect_block, laid_out, model=model, algorithm=algorithm, drop_axis=0,
                         chunks=((1,) * grid.chunks_y, (1,) * grid.chunks_x), dtype=object,
                         meta=np.empty((0, 0), dtype=object), name=f"detect-array-{token}")


def reduce_chunks(chunks: list[np.ndarray], model: SensorModel, algorithm: Any, image_url: str,
                  job_id: str, feature_properties: dict[str, Any] | None = None) -> gpd.GeoDataFrame:
    """Merge the chunks' border detections across chunks and geolocate every feature; raise
    :class:`ModelError` if any tile failed."""
    parts = [c[0, 0] for c in chunks]
    failed = [t for result, _, _ in parts for t in result.failed_tiles]
    if failed:
        tiles = sum(result.tiles for result, _, _ in parts)
        raise ModelError(f"{len(failed)} of {tiles} tiles failed, first at {failed[0]['window']}: "
                         f"{failed[0]['reason']}")
    border = distill(Detections.concat(waiting for _, _, waiting in parts), algorithm)
    found = Detections.concat([*(final for _, final, _ in parts), border])
    return to_features(found, model, image_url=image_url, job_id=job_id,
                       feature_properties=feature_properties)


def array_job(array: Any, spec: ModelSpec, *, tile_size: int = 1024, overlap: int = 50,
              tiling: str = FIXED_STRIDE, range_adjustment: str = "NONE", algorithm: Any = None,
              image_url: str | None = None, job_id: str = "detect",
              chunk_target: int = DEFAULT_CHUNK_TARGET) -> Any:
    """A ``dask.delayed`` GeoDataFrame of the features that ``spec`` finds in ``array`` (a
    lazily chunked ``(band, y, x)`` DataArray, georeferenced through rioxarray or not);
    ``image_url`` names the source in the features (default: the array's name)."""
    pixels = as_pixels(array)
    _, height, width = pixels.shape
    grid = TileGrid(width, height, tile_size, overlap, chunk_size(tile_size, overlap, chunk_target),
                    tiling.upper())
    chunks = chunk_detections(pixels, spec, grid, range_adjustment=range_adjustment.upper(),
                              bits=array_bits(array), algorithm=algorithm, nodata=array_nodata(array))
    name = image_url or str(getattr(array, "name", None) or "array")
    return dask.delayed(reduce_chunks, pure=True)(
        chunks.to_delayed().ravel().tolist(), array_sensor_model(array), algorithm, name, job_id)
