"""The Python API: ``run`` a request, ``detect`` on a small window, ``open_image`` lazily."""

from __future__ import annotations

from typing import Any

import geopandas as gpd

from pipeline.detections import Detections
from pipeline.geolocate import to_features
from pipeline.infer import detect_chunk
from pipeline.io import describe, read_window, sensor_model
from pipeline.models import ModelSpec, check_model
from pipeline.request import ImageRequest
from pipeline.tiling import TileGrid, chunk_size


def run(request: ImageRequest | dict[str, Any], client: Any = None, *, progress: bool = False,
        workers: int | None = None) -> Any:
    """Run a job and write its outputs; returns a :class:`graphs.JobResult`.

    ``client`` is a ``distributed.Client``; without one, a LocalCluster is started for the job.
    """
    from graphs.cluster import connect
    from graphs.image_job import run_job

    if not isinstance(request, ImageRequest):
        request = ImageRequest.parse(request)
    bar = _progress_bar if progress else None
    if client is not None:
        return run_job(request, client, progress=bar)
    with connect("local", workers) as local:
        return run_job(request, local, progress=bar)


def _progress_bar(total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tile", desc="tiles", smoothing=0.1)


def detect(
    url: str,
    model: ModelSpec | dict[str, Any] = ModelSpec("BUILTIN", "bright-objects"),
    window: tuple[int, int, int, int] | None = None,
    *,
    tile_size: int = 1024,
    overlap: int = 50,
    range_adjustment: str = "NONE",
) -> gpd.GeoDataFrame:
    """Run ``model`` eagerly on ``window`` ``(x0, y0, x1, y1)`` of ``url`` (default: whole image,
    for small images) and return the geolocated features, with the same tiling and ownership
    rules as a job. ``model`` is a ``ModelSpec`` or ``{"type": ..., "name": ..., "parameters": ...}``.
    """
    spec = model if isinstance(model, ModelSpec) else ModelSpec(**model)
    check_model(spec)
    info = describe(url)
    x0, y0, x1, y1 = window or (0, 0, info.width, info.height)
    x0, y0 = max(0, x0), max(0, y0)
    x1, y1 = min(info.width, x1), min(info.height, y1)
    pixels = read_window(url, (x0, y0, x1, y1))
    width, height = x1 - x0, y1 - y0
    grid = TileGrid(width, height, tile_size, overlap,
                    chunk_size(tile_size, overlap, max(width, height) + tile_size))
    result = detect_chunk(pixels, (0, 0), (0, 0), grid, spec, range_adjustment, info.bits)
    found = result.detections.shifted(x0, y0) if len(result.detections) else Detections()
    return to_features(found, sensor_model(info), image_url=url, job_id="detect")


__all__ = ["run", "detect"]
