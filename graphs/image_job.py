"""The image job: request → plan → read → infer → geolocate → merge → write, wired with Dask.

``image_job(request)`` gives the lazy collections (one object array of
:class:`~pipeline.infer.ChunkResult` per image) for users who want to persist or inspect them;
``run_job`` computes them on a cluster, chunk by chunk, and reduces the results.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import dask.array as da
import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio.errors
import shapely
from dask.base import tokenize

from pipeline import events as ev
from pipeline import synthetic
from pipeline.aws import GdalOptions, split_s3_url
from pipeline.detections import Detections
from pipeline.failures import one_line
from pipeline.geolocate import empty_features, to_features
from pipeline.infer import ChunkResult, TileTally, detect_chunk
from pipeline.merge import border_mask, distill, settled
from pipeline.metrics import StageTimer
from pipeline.models import ModelSpec, check_model
from pipeline.nitf import source_metadata
from pipeline.range_stats import range_adjustment
from pipeline.reading import (
    ImageError,
    ImageInfo,
    RasterSource,
    describe,
    gdal_error_line,
    image_segments,
    read_options,
    read_window,
    split_segment,
)
from pipeline.redact import public_url, redact
from pipeline.request import ImageRequest, S3Output
from pipeline.roi import chunk_mask, keep_in_roi, roi_pixels
from pipeline.security import work_prefix
from pipeline.sensor_models import RPCSensorModel, SensorModel, footprint, sensor_model
from pipeline.sinks import Sink, with_image_shapes
from pipeline.tiling import (
    DEFAULT_CHUNK_TARGET,
    FIXED_STRIDE,
    VARIABLE_OVERLAP,
    TileGrid,
    chunk_size,
    processing_bounds,
    to_uint8,
)

log = logging.getLogger(__name__)


class WindowSource(Protocol):
    """What a chunk task reads its pixels from: a file (:class:`~pipeline.reading.RasterSource`)
    or a generated image (:class:`~pipeline.synthetic.SyntheticSource`)."""

    @property
    def url(self) -> str: ...

    def read(self, window: tuple[int, int, int, int], band_last: bool = True) -> np.ndarray: ...


@dataclass(frozen=True)
class ImagePlan:
    """One image of a job, planned from its header alone."""

    url: str
    info: ImageInfo
    grid: TileGrid
    sensor_model: SensorModel
    #: GDAL options for every read of this image (endpoint, credentials: never logged)
    read_options: dict[str, str] = field(default_factory=dict, repr=False)
    #: the resolved rangeAdjustment and its parameters (see ``pipeline.range_stats.range_adjustment``)
    range_adjustment: dict[str, Any] = field(default_factory=lambda: {"type": "NONE"})
    #: the regionOfInterest in pixels, and which chunks touch it (None: the whole image)
    roi: Any = None
    chunk_mask: np.ndarray | None = None
    #: what the image's STAC Item supplied and where the file won (``pipeline.stac.resolve``)
    stac: dict[str, Any] | None = None

    @property
    def feature_columns(self) -> dict[str, Any]:
        """Extra feature properties: ``sourceMetadata`` (NITF header) and ``imageSegment``."""
        columns: dict[str, Any] = {}
        meta = source_metadata(self.info.tags, self.info.driver)
        if meta:
            columns["sourceMetadata"] = meta
        segment, _ = split_segment(self.url)
        if segment is not None:
            columns["imageSegment"] = segment
        return columns

    def describe(self) -> dict[str, Any]:
        """Sensor model, range adjustment and ROI facts for the summary (no secrets)."""
        model = self.sensor_model
        facts: dict[str, Any] = {"sensorModel": model.kind, "rangeAdjustment": self.range_adjustment,
                                 "tiling": {"strategy": self.grid.strategy,
                                            "tilesAcross": self.grid.tiles_x, "tilesDown": self.grid.tiles_y}}
        outline = footprint(model, self.info.width, self.info.height)
        if outline is not None:
            facts["footprint"] = json.loads(shapely.to_geojson(outline))
        if isinstance(model, RPCSensorModel):
            facts["elevation"] = model.describe()
            if model.chip is not None:
                facts["chip"] = list(model.chip)
        if self.chunk_mask is not None:
            facts["regionOfInterest"] = {
                "chunks": int(self.chunk_mask.sum()),
                "chunksSkipped": int(self.chunk_mask.size - self.chunk_mask.sum()),
                "pixelBounds": [round(v, 2) for v in self.roi.bounds],
            }
        if self.stac:
            facts["stacMetadata"] = self.stac
        return facts


@dataclass
class ImageOutcome(TileTally):
    """What happened to one image (its tiles' tally summed over its chunks)."""

    url: str
    status: str = ev.SUCCESS
    reason: str | None = None
    plan: ImagePlan | None = None
    before_merge: int = 0
    after_merge: int = 0
    timer: StageTimer = field(default_factory=StageTimer)
    chunks: list[ChunkResult] = field(default_factory=list)
    border: list[Detections] = field(default_factory=list)
    #: False for a pixel-only image in a job that also has georeferenced images: its features
    #: keep their pixel boxes (``imageGeometry``) and have no lon/lat geometry
    ground: bool = True
    #: features per class after the merge, counted as they are written
    classes: Counter[str] = field(default_factory=Counter)
    #: a FAILED image whose failure a retry cannot change (:mod:`pipeline.failures`)
    permanent: bool = False

    def add_finished(self, record: dict[str, Any], border: Detections) -> None:
        """Tally a chunk that an earlier run finished (its manifest ``record``) and keep its
        ``border`` detections for the border pass (see :class:`pipeline.parts.PartStore`)."""
        self.raw_detections += record["rawDetections"]
        self.dropped_detections += record.get("droppedDetections", 0)
        self.before_merge += record["detections"]
        self.after_merge += record["features"]
        self.timer.add("model", record["modelSeconds"])
        self.classes.update(record.get("classes", {}))
        self.border.append(border)

    def summary(self) -> dict[str, Any]:
        info = self.plan.info if self.plan else None
        return {
            "url": self.url,
            "status": self.status,
            "reason": self.reason,
            "width": info.width if info else None,
            "height": info.height if info else None,
            "bands": info.bands if info else None,
            "dtype": info.dtype if info else None,
            "georeferenced": bool(self.plan and self.plan.sensor_model.georeferenced),
            **(self.plan.describe() if self.plan else {}),
            "tiles": self.tiles,
            "failedTiles": self.failed_tiles,
            "detections": {
                "model": self.raw_detections,
                "dropped": self.dropped_detections,
                "beforeMerge": self.before_merge,
                "afterMerge": self.after_merge,
            },
            "classes": dict(self.classes.most_common()),
            "seconds": self.timer.as_dict(),
        }


def model_spec(request: ImageRequest) -> ModelSpec:
    """The picklable model description that workers build their adapter from."""
    processor = request.image_processor
    return ModelSpec(
        type=processor.type,
        name=processor.name,
        parameters=dict(request.image_processor_parameters),
        tile_format=request.tile_format,
        tile_compression=request.tile_compression,
        assumed_role=processor.assumed_role,
        options=processor.spec_options,  # imageProcessor.maxConcurrency wins over endpoint defaults
    )


def _describe(url: str) -> ImageInfo:
    """The header of ``url``: a file or object, or a ``synthetic://`` image."""
    return synthetic.describe(url) if synthetic.is_synthetic(url) else describe(url)


def image_urls(request: ImageRequest) -> list[str]:
    """The request's images: STAC Items and ``stacSearch`` expanded to their assets
    (:func:`pipeline.stac.expand_request`), a multi-segment NITF to one image per segment."""
    from pipeline.stac import expand_request

    urls: list[str] = []
    for url in expand_request(request).image_urls:
        if synthetic.is_synthetic(url) or not url.lower().endswith((".ntf", ".nitf", ".nsf")):
            urls.append(url)
            continue
        try:
            options = read_options(url, request.image_read_role)
        except ImageError:
            urls.append(url)
            continue
        urls.extend(image_segments(url, options))
    return urls


def task_url(url: str, client: Any = None) -> Any:
    """``url`` as chunk tasks carry it. A URL with a secret in it (a presigned query, user info)
    is scattered to the workers of ``client`` (default: the current client) once, and the tasks
    hold only its key (Dask hands them the value): it is never in the scheduler's task specs or
    in a pickle of the graph."""
    from pipeline.redact import public_url

    if public_url(url) == url:
        return url
    if client is None:
        from distributed import get_client

        try:
            client = get_client()
        except ValueError:  # no cluster: a graph that is only looked at
            return url
    return client.scatter(url, hash=False, broadcast=True)


def plan_where_readable(client: Any, request: ImageRequest, url: str,
                        chunk_target: int = DEFAULT_CHUNK_TARGET) -> ImagePlan:
    """:func:`plan_image` in this process, or on a worker when ``url`` is in S3 and this process
    has no AWS credentials of its own (the workers sign with theirs; a plan holds no secret)."""
    from pipeline import aws
    from pipeline.reading import in_s3
    from pipeline.stac import image_metadata

    if client is not None and in_s3(url) and not aws.has_credentials():
        options = read_options(url, request.image_read_role)  # this process's endpoint and region
        metadata = image_metadata(request.job_id, url)  # this process expanded the request
        return client.submit(plan_image, request, url, chunk_target, options, metadata, pure=False).result()
    return plan_image(request, url, chunk_target)


def plan_image(request: ImageRequest, url: str, chunk_target: int = DEFAULT_CHUNK_TARGET,
               read_with: dict[str, str] | None = None, metadata: Any = None,
               sample: bool = True) -> ImagePlan:
    """Read the header of ``url`` and lay out its tile grid (raises :class:`ImageError`).

    Resolves, once per image: the read options (endpoint, region, ``imageReadRole``), the
    sensor model (with ``elevation``), the range adjustment (DRA statistics; the sample read
    also proves the pixels readable) and the region of interest's chunks. ``read_with``: read
    options resolved elsewhere (by a client that plans on a worker). ``metadata``: the image's
    STAC :class:`~pipeline.stac.AssetMetadata` (default: from the job's STAC expansion), laid
    over the header by :func:`pipeline.stac.resolve`. ``sample=False`` leaves out
    :func:`sample_pixels` (for a caller that reads the pixels next and samples if that fails).
    """
    from pipeline.stac import image_metadata, resolve

    stac: dict[str, Any] = {}
    if synthetic.is_synthetic(url):
        info = _describe(url)
        options: dict[str, str] = {}
    else:
        options = read_with if read_with is not None else read_options(url, request.image_read_role)
        metadata = metadata if metadata is not None else image_metadata(request.job_id, url)
        info, stac = resolve(describe(url, options), metadata)
    if info.width < 1 or info.height < 1 or info.bands < 1:
        raise ImageError(f"image has no pixels: {url} ({info.width}x{info.height}x{info.bands})")
    elevation = request.elevation.model_dump(exclude_none=True) if request.elevation else None
    model = sensor_model(info, elevation, options)
    roi = None
    if request.region_of_interest:
        roi = roi_pixels(request.region_of_interest, model, info.width, info.height, url)
    grid = tile_grid(request, info.width, info.height, chunk_target, roi)
    mask = chunk_mask(roi, grid) if roi is not None else None
    if not grid.n_tiles:
        log.warning("%s: no tile fits %sx%s pixels with %s tiling (as in OSML): nothing to detect",
                    url, info.width, info.height, grid.strategy)
    if synthetic.is_synthetic(url):
        adjustment = {"type": request.range_adjustment or "NONE", "requested": request.range_adjustment}
    else:
        adjustment = range_adjustment(request.range_adjustment, info, options)
    plan = ImagePlan(url, info, grid, model, options, adjustment, roi, mask, stac or None)
    if sample:
        sample_pixels(plan)
    return plan


def sample_pixels(plan: ImagePlan) -> None:
    """Read one pixel (the regionOfInterest's corner) of a file: unreadable pixels fail the
    plan here, in one line (raises). The DRA's statistics have sampled them already."""
    if synthetic.is_synthetic(plan.url) or plan.range_adjustment["type"] == "DRA":
        return
    x, y = (int(v) for v in plan.roi.bounds[:2]) if plan.roi is not None else (0, 0)
    read_window(plan.url, (x, y, x + 1, y + 1), plan.read_options)


def tile_grid(request: ImageRequest, width: int, height: int,
              chunk_target: int = DEFAULT_CHUNK_TARGET, roi: Any = None) -> TileGrid:
    """The request's tile grid of a ``width × height`` image (``tilingStrategy``, default
    ``FIXED_STRIDE``); a ``VARIABLE_OVERLAP`` grid covers the ROI's bounds, as in OSML."""
    strategy = request.tiling_strategy or FIXED_STRIDE
    bounds = None
    if roi is not None and strategy == VARIABLE_OVERLAP:
        bounds = processing_bounds(roi.bounds, width, height)
    return TileGrid(width, height, request.tile_size, request.tile_overlap,
                    chunk_size(request.tile_size, request.tile_overlap, chunk_target), strategy, bounds)


@dataclass(frozen=True)
class ChunkModel:
    """What a chunk's model task needs besides its pixels."""

    grid: TileGrid
    spec: ModelSpec
    range_adjustment: str
    bits: int | None
    stretch: tuple[list[float], list[float]] | None = None  # the image's DRA, if any
    roi: Any = None
    #: the image's nodata value (the file's, else its STAC Item's): 0 in the model's tiles
    nodata: float | None = None

    def detect(self, block: np.ndarray, row: int, col: int) -> ChunkResult:
        """Tiles of chunk ``(row, col)`` (pixels ``block``) → the chunk's owned detections."""
        origin = self.grid.chunk_window(row, col)[:2]
        adjustment = self.range_adjustment
        invalid = block == self.nodata if self.nodata is not None and not np.isnan(self.nodata) else None
        if self.stretch is not None:  # the image's DRA, once per chunk (tiles are then uint8)
            block = np.moveaxis(to_uint8(np.moveaxis(block, 0, -1), "DRA", self.bits, self.stretch), -1, 0)
            adjustment = "NONE"
        if invalid is not None and invalid.any():  # a new array: the block may be shared
            block = np.where(invalid, np.zeros((), block.dtype), block)
        result = detect_chunk(block, origin, (row, col), self.grid, self.spec, adjustment, self.bits)
        if self.roi is not None:
            result.detections = keep_in_roi(result.detections, self.roi)
        return result


def read_chunk(source: WindowSource, grid: TileGrid, row: int, col: int) -> tuple[np.ndarray, float] | str:
    """Read (or render) chunk ``(row, col)``'s window: ``(pixels, read seconds)``, or the
    one-line reason why the read failed (the chunk's tiles then fail with it)."""
    x0, y0, x1, y1 = grid.chunk_window(row, col)
    began = time.perf_counter()
    try:
        return source.read((x0, y0, x1, y1)), time.perf_counter() - began
    except rasterio.errors.RasterioIOError as exc:
        return f"cannot read pixels {x0},{y0},{x1},{y1} of {source.url}: {gdal_error_line(exc)}"


def detect_read(read: tuple[np.ndarray, float] | str, model: ChunkModel, row: int, col: int) -> ChunkResult:
    """Detect in the pixels that :func:`read_chunk` read: the chunk's :class:`ChunkResult`
    (every tile failed with the read's reason if it failed)."""
    if isinstance(read, str):
        return ChunkResult.failed((row, col), model.grid.chunk_tiles(row, col), read)
    pixels, read_seconds = read
    began = time.perf_counter()
    result = model.detect(pixels, row, col)
    result.read_seconds = read_seconds
    result.task_seconds = read_seconds + time.perf_counter() - began
    return result


def _one(value: Any) -> np.ndarray:
    out = np.empty((1, 1), dtype=object)
    out[0, 0] = value
    return out


def _read_pixels_task(_: np.ndarray, source: WindowSource, grid: TileGrid,
                      block_info: dict[Any, Any] | None = None) -> np.ndarray:
    """:func:`read_chunk` as a block task: a 1 × 1 object array of what it gave."""
    assert block_info is not None
    return _one(read_chunk(source, grid, *block_info[0]["chunk-location"]))


def _detect_pixels_task(read: np.ndarray, model: ChunkModel,
                        block_info: dict[Any, Any] | None = None) -> np.ndarray:
    """:func:`detect_read` as a block task: a 1 × 1 object array of the :class:`ChunkResult`."""
    assert block_info is not None
    return _one(detect_read(read[0, 0], model, *block_info[0]["chunk-location"]))


def _read_chunk_task(_: np.ndarray, source: WindowSource, model: ChunkModel,
                     block_info: dict[Any, Any] | None = None) -> np.ndarray:
    """Read (or render) one chunk's window, its tiles and halo, and detect in it: both halves
    in one task, so that no pixels move between workers."""
    assert block_info is not None
    row, col = block_info[0]["chunk-location"]
    return _one(detect_read(read_chunk(source, model.grid, row, col), model, row, col))


def chunk_inputs(plan: ImagePlan, spec: ModelSpec, client: Any = None) -> tuple[WindowSource, ChunkModel]:
    """What every chunk task of ``plan``'s image reads from and detects with (see
    :func:`chunk_results`; ``client``: the cluster for :func:`task_url`)."""
    info = plan.info
    adjustment = plan.range_adjustment
    stretch = (adjustment["low"], adjustment["high"]) if "low" in adjustment else None
    source: WindowSource
    if synthetic.is_synthetic(plan.url):
        source = synthetic.SyntheticSource(plan.url)
    else:
        source = RasterSource(task_url(plan.url, client), (info.bands, info.height, info.width),
                              np.dtype(info.dtype), GdalOptions(plan.read_options))
    return source, ChunkModel(plan.grid, spec, adjustment["type"], info.bits, stretch, plan.roi, info.nodata)


def chunk_results(plan: ImagePlan, request: ImageRequest, spec: ModelSpec, client: Any = None) -> da.Array:
    """Lazy ``(chunks_y, chunks_x)`` object array of :class:`ChunkResult` for one image.

    Each chunk holds a whole number of tile strides plus a halo of ``overlap`` pixels on the
    right and bottom, which is exactly what the chunk's last tiles reach into. Every chunk task
    reads its own window (chunk and halo) under the image's read options, or renders it for a
    ``synthetic://`` image: no pixels move between workers, a task holds one window at a time,
    and a chunk outside the regionOfInterest costs no read. A model pinned by Dask resources
    (a GPU) splits each chunk into a read task that any worker runs and a pinned model task.
    ``client``: the cluster the tasks will run on (see :func:`task_url`; default: the current).
    """
    grid = plan.grid
    info = plan.info
    adjustment = plan.range_adjustment
    name = f"detect-{plan.url.split('?', 1)[0].rsplit('/', 1)[-1]}"  # never a presigned query
    roi_wkt = plan.roi.wkt if plan.roi is not None else None
    source, model = chunk_inputs(plan, spec, client)
    # one element per chunk, one chunk per element: map_blocks over it runs a task per chunk
    # and hands it its (row, col) in block_info (the element's value is never read)
    # (named, so that dask does not tokenise it by pickling np.zeros: ~0.5 ms an image)
    token = tokenize(plan.url, grid, spec.key, adjustment, roi_wkt, info.nodata)
    chunk_index_grid = da.zeros((grid.chunks_y, grid.chunks_x), chunks=1, dtype=np.uint8,
                                name=f"chunk-index-{token}")
    results_meta = {"dtype": object, "meta": np.empty((0, 0), dtype=object)}
    resources = spec.options.get("resources")
    if not resources:
        return da.map_blocks(_read_chunk_task, chunk_index_grid, source=source, model=model,
                             name=f"{name}-{token}", **results_meta)
    # A model pinned to some workers (a GPU) gets its pixels read by any worker: the pinned
    # workers only run the model, and reading is spread over the whole cluster. Only the model
    # tasks carry the resources; run_job computes them unoptimised (fusion would drop them).
    pixels = da.map_blocks(_read_pixels_task, chunk_index_grid, source=source, grid=grid,
                           name=f"read-{name}-{token}", **results_meta)
    results = da.map_blocks(_detect_pixels_task, pixels, model=model, name=f"{name}-{token}",
                            **results_meta)
    results.dask.layers[results.name].annotations = {"resources": dict(resources)}
    return results


def image_job(request: ImageRequest) -> dict[str, da.Array]:
    """The lazy Dask collections of a job: ``{image url: chunk results}`` (unreadable
    images are left out; :func:`run_job` reports them)."""
    spec = model_spec(request)
    check_model(spec)
    graphs = {}
    for url in image_urls(request):
        try:
            graphs[url] = chunk_results(plan_image(request, url), request, spec)
        except ImageError as exc:
            log.warning("%s", exc)
    return graphs


@dataclass
class JobResult:
    """What a job produced: the features, the summary and where the outputs went."""

    features: gpd.GeoDataFrame
    summary: dict[str, Any]
    outputs: list[str] = field(default_factory=list)
    #: a FAILED job whose every image failed in a way that a retry cannot change (the queue
    #: worker then dead-letters its message at once; see :mod:`pipeline.failures`)
    permanent: bool = False

    @property
    def status(self) -> str:
        return str(self.summary["status"])

    def plot(self, image: str | None = None, ax: Any = None, **kwargs: Any) -> Any:
        """A quick look of ``image`` (default: the first) with its features; see :mod:`pipeline.plots`."""
        from pipeline.plots import plot_result

        return plot_result(self, image=image, ax=ax, **kwargs)

    def plot_summary(self) -> Any:
        """The summary chart (time per stage, tiles/s over time, detections per class)."""
        from pipeline.plots import show_summary

        return show_summary(self.summary, self.features)

    def explore(self, **kwargs: Any) -> Any:
        """An interactive folium map of the features (needs folium and mapclassify)."""
        from pipeline.plots import explore

        return explore(self.features, **kwargs)


ProgressFactory = Callable[[int], Any]


def finish_image(outcome: ImageOutcome) -> None:
    """The image's status from its failed tiles (sorted by row, then column)."""
    outcome.failed_tiles.sort(key=lambda t: (t["window"][1], t["window"][0]))
    if outcome.status == ev.FAILED:
        return
    if outcome.failed_tiles and len(outcome.failed_tiles) >= outcome.tiles:
        outcome.status = ev.FAILED
        outcome.reason = f"all {outcome.tiles} tiles failed: {outcome.failed_tiles[0]['reason']}"
    elif outcome.failed_tiles:
        outcome.status = ev.PARTIAL
        outcome.reason = f"{len(outcome.failed_tiles)} of {outcome.tiles} tiles failed"


def job_status(outcomes: list[ImageOutcome]) -> str:
    """SUCCESS if every image succeeded, FAILED if none produced anything, else PARTIAL."""
    statuses = {o.status for o in outcomes}
    if statuses == {ev.SUCCESS}:
        return ev.SUCCESS
    if statuses == {ev.FAILED}:
        return ev.FAILED
    return ev.PARTIAL


def work_location(request: ImageRequest) -> tuple[str | Path, str | None]:
    """Where a job keeps its part files and manifest, and the role that writes there:
    ``<first LOCAL output>/<jobId>.parts``, else ``s3://<first S3 output>/<jobId>.parts/``
    (with that output's role), else ``<MODEL_RUNNER_WORK_PREFIX>/<jobId>.parts/`` (a Kinesis-only
    job), else ``<tmp>/model-runner/<jobId>.parts``. Beside S3 outputs or under the work prefix,
    a redelivered job resumes in any process."""
    name = f"{request.job_id}.parts"
    outputs = request.all_outputs
    for output in outputs:
        if output.type == "LOCAL":
            return Path(output.path) / name, None
    for output in outputs:
        if output.type == "S3":
            return f"s3://{output.bucket}/{_join(output.prefix, name)}/", output.role
    prefix = work_prefix()
    if prefix is not None:
        return f"{prefix.rstrip('/')}/{name}/", None
    return Path(tempfile.gettempdir()) / "model-runner" / name, None


def done_marker(request: ImageRequest) -> S3Output | None:
    """Where a job without LOCAL or S3 outputs (Kinesis only) leaves its summary, so that a
    redelivered message finds it done: ``<MODEL_RUNNER_WORK_PREFIX>/<jobId>.summary.json``
    (an S3 output of no formats; None for other jobs or without a work prefix)."""
    prefix = work_prefix()
    if prefix is None or any(o.type in ("LOCAL", "S3") for o in request.all_outputs):
        return None
    bucket, key = split_s3_url(prefix)
    return S3Output(bucket=bucket, prefix=key, formats=())


def _join(prefix: str, name: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{name}" if prefix else name


# ---------------------------------------------------------------- the reduction
# Chunk results → one image's merged, geolocated features: settle_chunk for each chunk (as it
# arrives), then finish_image and border_pass. run_job streams it (each chunk's features are
# written as a part); lazy_features runs it in memory (reduce_image).

#: what an empty chunk writes (only its length is read)
_NO_FEATURES = empty_features(False)
WGS84_NAME = "EPSG:4326"


def _image_features(outcome: ImageOutcome, merged: Detections, request: ImageRequest) -> gpd.GeoDataFrame:
    """The features of one image's merged detections (see ``ImageOutcome.ground``)."""
    plan = outcome.plan
    assert plan is not None
    features = to_features(merged, plan.sensor_model, image_url=plan.url, job_id=request.job_id,
                           feature_properties=request.merged_feature_properties,
                           extra_columns=plan.feature_columns)
    if not outcome.ground:
        features = features.set_geometry(gpd.GeoSeries([None] * len(features), crs=WGS84_NAME))
    return features


def settle_chunk(outcome: ImageOutcome, result: ChunkResult, request: ImageRequest
                 ) -> tuple[gpd.GeoDataFrame, Detections, dict[str, int]]:
    """One chunk's step of the reduction. Its detections that no other chunk can touch
    (outside the chunk's border reach, or settled there) are merged and geolocated: the
    features returned, with their count per class. The others wait in ``outcome.border`` for
    :func:`border_pass` (and are returned, for a part store). The chunk's tiles, failed
    tiles, counts and model seconds are tallied in ``outcome``."""
    plan = outcome.plan
    assert plan is not None
    detections = result.detections
    with outcome.timer.stage("merge"):
        border = border_mask(detections.boxes, plan.grid.chunk_reach(*result.chunk))
        final = settled(detections, border, request.distillation)
        merged = distill(detections.select(final), request.distillation)
        waiting = detections.select(~final)
    with outcome.timer.stage("geolocate"):  # most chunks of a big image find nothing
        features = _image_features(outcome, merged, request) if len(merged) else _NO_FEATURES
    classes = _class_counts(merged)
    outcome.classes.update(classes)
    outcome.border.append(waiting)
    outcome.add(result)
    outcome.before_merge += len(detections)
    outcome.after_merge += len(features)
    outcome.timer.add("model", result.model_seconds)
    return features, waiting, classes


def _class_counts(detections: Detections) -> dict[str, int]:
    names, counts = np.unique(detections.classes.astype(str), return_counts=True)
    return {str(name): int(n) for name, n in zip(names, counts, strict=True)}


def border_pass(outcome: ImageOutcome, request: ImageRequest) -> gpd.GeoDataFrame:
    """The last step of the reduction: merge the detections that chunks left at their
    borders (``outcome.border``, emptied) and geolocate them."""
    with outcome.timer.stage("merge"):
        waiting = Detections.concat(outcome.border)
        merged = distill(waiting, request.distillation)
    outcome.border.clear()
    outcome.classes.update(_class_counts(merged))
    with outcome.timer.stage("geolocate"):  # most images leave nothing at their borders
        features = _image_features(outcome, merged, request) if len(merged) else _NO_FEATURES
    outcome.after_merge += len(features)
    return features


def reduce_image(outcome: ImageOutcome, request: ImageRequest, results: list[ChunkResult]
                 ) -> gpd.GeoDataFrame:
    """The whole reduction of one image in memory (as :func:`run_job` streams it): the
    features of its chunk ``results``; ``outcome`` gets its status and failed tiles."""
    frames = [settle_chunk(outcome, result, request)[0] for result in results]
    finish_image(outcome)
    if outcome.status != ev.FAILED:
        frames.append(border_pass(outcome, request))
    outcome.border.clear()
    return concat_features([f for f in frames if len(f)], outcome.ground)


def concat_features(frames: list[gpd.GeoDataFrame], georeferenced: bool) -> gpd.GeoDataFrame:
    """Feature frames as one (empty ones with the columns of a job without features)."""
    if not frames:
        return empty_features(georeferenced)
    return gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=frames[0].crs)


def ground_in_mixed_jobs(outcomes: list[ImageOutcome]) -> None:
    """A job's features are all lon/lat or all pixels: where georeferenced and pixel-only
    images are mixed, the pixel-only ones give features without geometry."""
    planned = [o for o in outcomes if o.plan is not None]
    pixel_only = [o for o in planned if o.plan and not o.plan.sensor_model.georeferenced]
    if pixel_only and len(pixel_only) < len(planned):
        for outcome in pixel_only:
            outcome.ground = False
            log.warning("%s has no georeferencing: its features have no geometry in this job "
                        "(their pixel boxes are in imageGeometry)", outcome.url)


def lazy_features(request: ImageRequest) -> Any:
    """A ``dask.delayed`` GeoDataFrame of the job's features, reduced as :func:`run_job`
    reduces them (same columns, ``sourceMetadata`` included): each image planned once, only
    the chunks in its regionOfInterest computed. ``.attrs["failedTiles"]`` lists the failed
    tiles (``url``, ``window``, ``reason``); an unreadable image is left out (logged)."""
    import dask

    spec = model_spec(request)
    check_model(spec)
    outcomes = []
    for url in image_urls(request):
        try:
            outcomes.append(ImageOutcome(url, plan=plan_image(request, url)))
        except ImageError as exc:
            log.warning("%s", exc)
    ground_in_mixed_jobs(outcomes)
    images = []
    for outcome in outcomes:
        assert outcome.plan is not None
        mask = outcome.plan.chunk_mask
        chunks = chunk_results(outcome.plan, request, spec).to_delayed()
        wanted = [item for chunk, item in np.ndenumerate(chunks) if mask is None or mask[chunk]]
        images.append(dask.delayed(_reduced_image, pure=True)(outcome, request, wanted))
    georeferenced = any(o.plan.sensor_model.georeferenced for o in outcomes if o.plan)
    return dask.delayed(_job_features, pure=True)(images, georeferenced)


def _reduced_image(outcome: ImageOutcome, request: ImageRequest, chunks: list[np.ndarray]
                   ) -> tuple[gpd.GeoDataFrame, list[dict[str, Any]]]:
    features = reduce_image(outcome, request, [chunk[0, 0] for chunk in chunks])
    return features, [{"url": public_url(outcome.url), **tile} for tile in outcome.failed_tiles]


def _job_features(images: list[tuple[gpd.GeoDataFrame, list[dict[str, Any]]]],
                  georeferenced: bool) -> gpd.GeoDataFrame:
    features = with_image_shapes(concat_features([f for f, _ in images if len(f)], georeferenced))
    features.attrs["failedTiles"] = [tile for _, tiles in images for tile in tiles]
    return features


def worker_seconds(results: list[ChunkResult]) -> dict[str, float]:
    """Where the workers' time went, summed over the chunk tasks as they timed themselves:
    ``read`` (pixel reads and decoding), ``model``, and ``encode`` (the rest: cutting tiles,
    converting them, parsing answers); a pinned model's read seconds are those of the worker
    that read its pixels."""
    task = sum(r.task_seconds for r in results)
    read = min(sum(r.read_seconds for r in results), task)
    model = min(sum(r.model_seconds for r in results), task - read)
    totals = {"read": read, "encode": task - read - model, "model": model}
    return {name: round(value, 4) for name, value in totals.items()}


#: chunks in flight at least, for a model pinned to some workers (see :func:`submission_window`)
MIN_WINDOW = 32


def submission_window(client: Any) -> int:
    """Chunks a job keeps in flight when its pixels are read apart from its model: twice the
    cluster's threads, and at least :data:`MIN_WINDOW` (so an adaptive cluster still sees work
    queued), which bounds the pixels that wait for the model to that many chunks."""
    return max(MIN_WINDOW, 2 * total_threads(client))


def total_threads(client: Any) -> int:
    """The threads of ``client``'s cluster's workers."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return sum(int(w.get("nthreads", 1)) for w in workers)


def run_job(
    request: ImageRequest,
    client: Any,
    *,
    progress: ProgressFactory | None = None,
    bus: ev.EventBus | None = None,
    sinks: list[Sink] | None = None,
    chunk_target: int = DEFAULT_CHUNK_TARGET,
    resume: bool = False,
    work_dir: str | Path | None = None,
    collect_features: bool = True,
    keep_parts: bool = False,
) -> JobResult:
    """Run ``request`` on ``client`` (a ``distributed.Client``) and write its outputs.

    Streaming: each chunk's result is merged and written to a part file in ``work_dir`` (a
    directory or an S3 prefix; default :func:`work_location`) as it arrives, and listed in the
    manifest there; only detections near chunk borders wait for a cross-chunk merge at the end, and the final
    files are assembled from the parts. ``resume=True`` keeps the chunks the manifest lists
    and computes only the others. ``collect_features=False`` leaves
    :attr:`JobResult.features` empty (the features are in the outputs), so that memory stays
    flat however large the job. The parts are removed after a successful job unless
    ``keep_parts``.
    """
    from graphs.job_loop import JobLoop

    return JobLoop(request, client, window=submission_window, progress=progress, bus=bus,
                   sinks=sinks, chunk_target=chunk_target, resume=resume, work_dir=work_dir,
                   collect_features=collect_features, keep_parts=keep_parts).run()


def job_reason(outcomes: list[ImageOutcome]) -> str | None:
    """One line for why a job is not a SUCCESS: the reason of its one image that did not
    succeed, or how many did not and each one's reason, the image named where its reason does
    not name it (None when every image succeeded)."""
    failing = [o for o in outcomes if o.status != ev.SUCCESS]
    if not failing:
        return None
    reasons = []
    for outcome in failing:
        url = public_url(outcome.url)
        reason = redact(outcome.reason or outcome.status)
        reasons.append(reason if url in reason else f"{url}: {reason}")
    if len(outcomes) == 1:
        return reasons[0]
    return f"{len(failing)} of {len(outcomes)} images did not succeed: {'; '.join(reasons)}"


def _future_error(value: Any) -> str:
    """One line for what ``as_completed(with_results=True, raise_errors=False)`` gave back
    instead of a result: a cancellation, or Distributed's ``(type, exception, traceback)``."""
    exc = value[1] if isinstance(value, tuple) and len(value) == 3 else value
    if isinstance(exc, BaseException):
        return one_line(exc)
    return f"task gave no result: {type(value).__name__}"
