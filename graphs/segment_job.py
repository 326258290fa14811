"""The segmentation job: per chunk, read the chunk and its halo, segment, stitch, write the
chunk's part of the class raster and vectorise its regions; then one COG per image and the
class polygons, dissolved across chunk seams, as the job's features.

Each chunk task reads its own window (its pixels plus the halo its covering tiles reach into;
a per-pixel segmenter's chunk reads its pixels alone, a slab of rows at a time) as the detection
job's tasks do: chunks exchange nothing but the pixels they both read, and a task holds one chunk
at a time. What comes back to the client is small: the part's path and the chunk's regions
(polygons with probability sums). The client fetches each part as its chunk finishes and lays the
image's COG out from them.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio.errors
import shapely
from affine import Affine

from graphs.image_job import (
    ImagePlan,
    WindowSource,
    image_urls,
    model_spec,
    plan_where_readable,
)
from pipeline import aws, synthetic
from pipeline import events as ev
from pipeline.aws import GdalOptions
from pipeline.failures import is_permanent
from pipeline.geolocate import empty_features, to_features
from pipeline.models import ModelError, ModelSpec
from pipeline.parts import PartStore, S3Storage, open_storage
from pipeline.parts import _chunk_name as chunk_name
from pipeline.reading import ImageError, RasterSource, gdal_error_line
from pipeline.request import ImageRequest, SegmentationOptions
from pipeline.segmentation.models import check_segmenter, load_segmenter, resolve_segmenter
from pipeline.segmentation.polygons import Regions, chunk_regions, dissolve, to_detections
from pipeline.segmentation.raster import alignment, band_data, part_pieces, snap_bounds, write_cog, write_tiff
from pipeline.segmentation.stitch import (
    Stitched,
    answers_per_pixel,
    class_dtype,
    covering_tiles,
    read_window,
    segment_per_pixel,
    stitch_chunk,
)
from pipeline.sinks import make_sink, upload, write_parquet
from pipeline.tiling import DEFAULT_CHUNK_TARGET, TileGrid, to_uint8

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkJob:
    """What every chunk task of one image needs (small and picklable)."""

    source: WindowSource
    grid: TileGrid
    spec: ModelSpec
    options: SegmentationOptions
    range_adjustment: str
    bits: int | None
    stretch: tuple[list[float], list[float]] | None
    polygon_classes: tuple[int, ...]
    #: the job's work location (a directory or an S3 prefix, see ``pipeline.parts``) and the
    #: role that writes there; None: no raster parts
    parts: str | None
    parts_role: str | None
    #: the client's S3 endpoint (``AWS_ENDPOINT_URL[_S3]``), for workers that have none set
    s3_endpoint: str | None = None
    image: int = 0
    n_classes: int = 2
    #: the regionOfInterest in pixels (None: the whole image)
    roi: Any = None


@dataclass
class ChunkOutcome:
    chunk: tuple[int, int]
    bounds: tuple[int, int, int, int]
    part: str | None = None
    regions: Regions = field(default_factory=Regions.empty)
    #: the regions' file in the work location (a resumed chunk's regions are read from it)
    regions_file: str | None = None
    read: bool = False
    tiles: int = 0
    failed_tiles: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def roi_inside(roi: Any, bounds: tuple[int, int, int, int]) -> np.ndarray:
    """``h × w`` booleans of ``bounds``: True where a pixel's centre lies in the ROI."""
    from rasterio.features import geometry_mask

    x0, y0, x1, y1 = bounds
    return np.asarray(geometry_mask([roi], out_shape=(y1 - y0, x1 - x0), invert=True,
                                    transform=Affine.translation(x0, y0)))


def chunk_bounds(grid: TileGrid, row: int, col: int) -> tuple[int, int, int, int]:
    """The pixels of a segmentation chunk: the grid's chunk snapped to the COG's block grid
    (:func:`~pipeline.segmentation.raster.snap_bounds`), so that its task encodes whole COG
    tiles; may be empty."""
    return snap_bounds(grid.chunk_bounds(row, col), (grid.width, grid.height), alignment(grid.chunk))


def stitch_pixels(job: ChunkJob, bounds: tuple[int, int, int, int]) -> tuple[Stitched, float]:
    """The chunk's stitched answer and the seconds it took to read its pixels (a read's
    :class:`rasterio.errors.RasterioIOError` propagates). A per-pixel segmenter's chunk is read
    and segmented slab by slab (:func:`~pipeline.segmentation.stitch.segment_per_pixel`), any
    other's read with its halo, then its tiles stitched."""
    grid, mode = job.grid, job.options.stitch
    adjustment = "NONE" if job.stretch is not None else job.range_adjustment  # the image's DRA: once
    per_pixel = answers_per_pixel(load_segmenter(job.spec), adjustment)

    def pixels_of(area: tuple[int, int, int, int]) -> np.ndarray:
        """``bands × rows × columns`` of ``area`` (per pixel: stored band by band), stretched
        where the image's DRA is known."""
        pixels = job.source.read(area, band_last=not per_pixel)
        if job.stretch is None:
            return pixels
        return np.moveaxis(to_uint8(np.moveaxis(pixels, 0, -1), "DRA", job.bits, job.stretch), -1, 0)

    began = time.perf_counter()
    if per_pixel:
        stitched = segment_per_pixel(lambda top, bottom: pixels_of((bounds[0], top, bounds[2], bottom)),
                                     bounds, grid, job.spec, mode, adjustment, job.bits)
        return stitched, time.perf_counter() - began - stitched.model_seconds
    window = read_window(covering_tiles(grid, bounds, mode), bounds)
    pixels = pixels_of(window)
    reading = time.perf_counter() - began
    return stitch_chunk(pixels, window[:2], bounds, grid, job.spec, mode, adjustment, job.bits), reading


def segment_chunk(job: ChunkJob, row: int, col: int) -> ChunkOutcome:
    """One chunk: read, segment, stitch, write its part, vectorise its regions. A chunk that
    misses the regionOfInterest is not read: its part is nodata."""
    grid = job.grid
    bounds = chunk_bounds(grid, row, col)
    mode = job.options.stitch
    outcome = ChunkOutcome((row, col), bounds)
    if bounds[2] <= bounds[0] or bounds[3] <= bounds[1]:  # snapped away: its neighbours own it
        return outcome
    began = time.perf_counter()
    width, height = bounds[2] - bounds[0], bounds[3] - bounds[1]
    dtype = class_dtype(job.n_classes)
    nodata = dtype(np.iinfo(dtype).max)
    inside = None if job.roi is None else roi_inside(job.roi, bounds)
    scores = None
    if inside is not None and not inside.any():
        classes = np.full((height, width), nodata, dtype)
        read = model = time.perf_counter()
    else:
        try:
            stitched, reading = stitch_pixels(job, bounds)
        except rasterio.errors.RasterioIOError as exc:
            reason = f"cannot read pixels {bounds} of {job.source.url}: {gdal_error_line(exc)}"
            windows = covering_tiles(grid, bounds, mode)
            outcome.tiles = len(windows)
            outcome.failed_tiles = [{"window": [int(v) for v in w], "reason": reason} for w in windows]
            return outcome
        model = time.perf_counter()
        read = began + reading
        outcome.read = True
        outcome.tiles, outcome.failed_tiles = stitched.tiles, stitched.failed_tiles
        classes, scores = stitched.classes, stitched.scores
        if inside is not None:  # outside the ROI: nodata, no score (a model's answer may be read-only)
            classes = np.where(inside, classes, nodata).astype(dtype, copy=False)
            if scores is not None:
                scores[:, ~inside] = 0
    name = chunk_name(job.image, (row, col))
    storage = work_storage(job.parts, job.parts_role, job.s3_endpoint) if job.parts is not None else None
    if storage is not None:
        bands = band_data(classes, scores, job.options.score_bands, job.n_classes)
        size, pieces = part_pieces(bands, bounds, (grid.width, grid.height))
        outcome.part = storage.publish(f"{name}.tif", lambda path: write_tiff(path, size, pieces))
    written = time.perf_counter()
    if job.options.polygons:
        outcome.regions = chunk_regions(classes, scores, bounds, (grid.width, grid.height),
                                        list(job.polygon_classes))
        if storage is not None and len(outcome.regions):
            regions = outcome.regions
            outcome.regions_file = storage.publish(f"{name}.npz", lambda path: save_regions(regions, path))
    outcome.seconds = {"read": read - began, "segment": model - read, "write": written - model,
                       "polygons": time.perf_counter() - written}
    return outcome


@dataclass
class ImageSegmentation:
    """One image's outcome."""

    url: str
    status: str = "SUCCESS"
    reason: str | None = None
    tiles: int = 0
    failed_tiles: list[dict[str, Any]] = field(default_factory=list)
    rasters: list[str] = field(default_factory=list)
    polygons: int = 0
    #: chunks whose pixels were read (a chunk outside the regionOfInterest is not), and
    #: chunks resumed from a previous run's parts
    chunks_read: int = 0
    chunks_resumed: int = 0
    permanent: bool = False
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class SegmentationResult:
    """What a segmentation job produced."""

    job_id: str
    class_names: tuple[str, ...]
    features: gpd.GeoDataFrame
    images: list[ImageSegmentation]
    outputs: list[str] = field(default_factory=list)
    #: features written (``features`` holds them only where the job collected them)
    feature_count: int = 0

    @property
    def status(self) -> str:
        statuses = {i.status for i in self.images}
        return "SUCCESS" if statuses == {"SUCCESS"} else "FAILED" if statuses == {"FAILED"} else "PARTIAL"

    @property
    def permanent(self) -> bool:
        """A FAILED job that a retry cannot change (every image failed permanently)."""
        return self.status == "FAILED" and all(i.permanent for i in self.images)

    @property
    def reason(self) -> str | None:
        failed = [i for i in self.images if i.status != "SUCCESS"]
        if not failed:
            return None
        if len(self.images) == 1:
            return failed[0].reason
        return f"{len(failed)} of {len(self.images)} images did not succeed: " + "; ".join(
            f"{i.url}: {i.reason}" for i in failed)

    @property
    def summary(self) -> dict[str, Any]:
        return {"jobId": self.job_id, "status": self.status, "reason": self.reason,
                "classNames": list(self.class_names), "features": self.feature_count, "outputs": self.outputs,
                "images": [{"url": i.url, "status": i.status, "reason": i.reason, "tiles": i.tiles,
                            "failedTiles": len(i.failed_tiles), "rasters": i.rasters,
                            "polygons": i.polygons, "chunksRead": i.chunks_read,
                            "chunksResumed": i.chunks_resumed, "seconds": i.seconds} for i in self.images]}


def raster_name(job_id: str, url: str, index: int) -> str:
    """``<jobId>.<image stem>.classes.tif`` (the image's index where stems repeat)."""
    stem = re.sub(r"[^\w.-]+", "_", Path(url.rstrip("/").split("?")[0]).stem) or f"image{index}"
    return f"{job_id}.{stem}.classes.tif"


def _source(plan: ImagePlan) -> WindowSource:
    if synthetic.is_synthetic(plan.url):
        return synthetic.SyntheticSource(plan.url)
    info = plan.info
    return RasterSource(plan.url, (info.bands, info.height, info.width), np.dtype(info.dtype),
                        GdalOptions(plan.read_options))


def polygon_indices(options: SegmentationOptions, class_names: tuple[str, ...]) -> tuple[int, ...]:
    """The classes that get polygons (default: all but the first, the background)."""
    if options.polygon_classes is None:
        return tuple(range(1, len(class_names)))
    unknown = sorted(set(options.polygon_classes) - set(class_names))
    if unknown:
        raise ModelError(f"segmentation.polygonClasses: {', '.join(unknown)} not among the model's "
                         f"classes ({', '.join(class_names)})")
    return tuple(class_names.index(n) for n in options.polygon_classes)


def s3_client(role: str | None, endpoint: str | None) -> Any:
    """This process's S3 client (its own credentials, ``role``'s if given) at ``endpoint``
    where this process has no endpoint of its own (the client's, travelling in a task)."""
    from pipeline import aws

    if endpoint is None or aws.endpoint_url("s3"):
        return aws.client("s3", role)
    owner = aws.session(role, purpose="s3")
    made = owner.client("s3", endpoint_url=endpoint)
    aws.retry_expired_once(made, aws.credentials(owner))
    return made


def work_storage(location: str, role: str | None, endpoint: str | None) -> Any:
    """The :class:`~pipeline.parts.PartStore` storage of ``location`` on a worker."""
    storage = open_storage(location, role)
    if isinstance(storage, S3Storage):
        storage._client = s3_client(role, endpoint)
    return storage


def check_request(request: ImageRequest) -> tuple[ModelSpec, tuple[str, ...], tuple[int, ...]]:
    """The request's segmenter (resolved), its class names and the polygon classes; a one-line
    :class:`ModelError` for a model that cannot segment or an unknown polygon class."""
    spec = resolve_segmenter(model_spec(request))
    class_names = check_segmenter(spec)
    return spec, class_names, polygon_indices(request.segmentation or SegmentationOptions(), class_names)


def save_regions(regions: Regions, path: Path) -> None:
    """A chunk's regions as an ``.npz``, the polygons as their WKB bytes end to end and each
    one's length (no pickles; hex WKB in a unicode array was 8x the bytes and half the
    chunk's polygon time)."""
    wkb = shapely.to_wkb(regions.polygons)
    with open(path, "wb") as out:
        np.savez(out, class_index=regions.class_index, sums=regions.sums, counts=regions.counts,
                 seam=regions.seam, wkb=np.frombuffer(b"".join(wkb), np.uint8),
                 wkb_sizes=np.fromiter(map(len, wkb), np.int64, len(wkb)))


def load_regions(path: Path) -> Regions:
    """What :func:`save_regions` wrote."""
    with np.load(path, allow_pickle=False) as data:
        blob, ends = data["wkb"].tobytes(), np.cumsum(data["wkb_sizes"]).tolist()
        polygons = np.empty(len(ends), dtype=object)
        polygons[:] = shapely.from_wkb([blob[a:b] for a, b in zip([0, *ends][:-1], ends, strict=True)])
        return Regions(data["class_index"], polygons, data["sums"], data["counts"], data["seam"])


class FeatureParts:
    """An image's polygon features, written chunk by chunk as GeoParquet parts in ``directory``
    as each chunk's regions arrive: a chunk's interior regions are whole, so they become
    features at once; its seam regions wait for :meth:`finish`, which dissolves them. The
    client holds one chunk's features and the seam regions, not the image's polygons (those are
    kept too where ``keep``: a job that returns its features)."""

    def __init__(self, directory: Path, job: _Job, plan: ImagePlan, index: int, when: datetime,
                 keep: bool):
        self.directory, self.job, self.plan, self.index, self.when = directory, job, plan, index, when
        self.paths: list[Path] = []
        self.frames: list[gpd.GeoDataFrame] = []
        self.seams: list[Regions] = []
        self.count = 0
        self.keep = keep

    def add(self, regions: Regions, chunk: tuple[int, int]) -> None:
        """One chunk's regions (a resumed chunk's too)."""
        self.seams.append(regions.select(regions.seam))
        self._write(regions.select(~regions.seam), f"r{chunk[0]:05d}-c{chunk[1]:05d}")

    def finish(self) -> list[Path]:
        """The seam regions dissolved into whole ones and written; the parts in chunk order."""
        self._write(dissolve(Regions.concat(self.seams)), "seams")
        self.seams = []
        return sorted(self.paths)

    def _write(self, regions: Regions, key: str) -> None:
        if not len(regions):
            return
        job, plan = self.job, self.plan
        detections = to_detections(regions, job.class_names, plan.sensor_model, job.options.simplify,
                                   job.options.min_area)
        if not len(detections):
            return
        frame = to_features(detections, plan.sensor_model, image_url=plan.url, job_id=job.request.job_id,
                            feature_properties=job.request.merged_feature_properties,
                            extra_columns=plan.feature_columns, inference_time=self.when,
                            shape_geometries=True)
        path = self.directory / f"i{self.index:04d}-{key}.parquet"
        write_parquet(frame, path)
        self.paths.append(path)
        self.count += len(frame)
        if self.keep:
            self.frames.append(frame)


@dataclass
class _Job:
    """One run's settings, shared by its images."""

    request: ImageRequest
    client: Any
    spec: ModelSpec
    options: SegmentationOptions
    class_names: tuple[str, ...]
    polygon_classes: tuple[int, ...]
    outputs: list[Any]
    store: PartStore | None
    location: str | None
    role: str | None
    progress: Callable[[int], Any] | None
    #: where the images' feature parts go (this process's disk), whether the result keeps the
    #: features, and the job's inference time
    features_directory: Path
    collect_features: bool
    when: datetime


def run_segmentation(request: ImageRequest, client: Any, *, chunk_target: int = DEFAULT_CHUNK_TARGET,
                     progress: Callable[[int], Any] | None = None, bus: ev.EventBus | None = None,
                     sinks: list[Any] | None = None, resume: bool = False,
                     collect_features: bool = True) -> SegmentationResult:
    """Run a segmentation job (``request.segmentation``) on ``client`` and write its outputs:
    a COG per image and the polygons as features to each LOCAL/S3 output (``sinks``: the
    outputs' sinks, default one per output), then the summary.

    The chunks' parts (raster and regions) and the manifest of finished chunks live in the
    job's work location (``graphs.image_job.work_location``: beside the first LOCAL or S3
    output, or under ``MODEL_RUNNER_WORK_PREFIX``) as a :class:`~pipeline.parts.PartStore`:
    workers write them there and the COG task reads them from there, so workers share no
    disk; ``resume=True`` keeps the chunks a previous run of the same request finished.
    Status events go to ``bus`` (STARTED, each image's, the job's)."""
    from graphs.image_job import work_location
    from pipeline.parts import fingerprint
    from pipeline.segmentation import raster

    bus = bus or ev.EventBus()
    options = request.segmentation or SegmentationOptions()
    spec, class_names, polygon_classes = check_request(request)
    outputs = [o for o in request.all_outputs if o.type in ("LOCAL", "S3")]
    sinks = sinks if sinks is not None else [make_sink(o) for o in outputs]
    store = location = role = None
    if (options.raster and outputs) or resume:
        where, role = work_location(request)
        location = str(where)
        store = PartStore(where, request.job_id, fingerprint(request.to_wire(), chunk_target, "segmentation",
                                                             raster.PART_FORMAT),
                          resume=resume, role=role)
    bus.emit(ev.STARTED, request.job_id, message=f"{len(request.image_urls)} image(s)")
    with tempfile.TemporaryDirectory(prefix="segment-features-") as features_directory:
        job = _Job(request, client, spec, options, class_names, polygon_classes, outputs, store,
                   location, role, progress, Path(features_directory), collect_features, datetime.now(UTC))
        frames: list[gpd.GeoDataFrame] = []
        parts: list[Path] = []
        images: list[ImageSegmentation] = []
        georeferenced = True
        for index, url in enumerate(image_urls(request)):
            outcome = ImageSegmentation(url)
            images.append(outcome)
            try:
                plan = plan_where_readable(client, request, url, chunk_target)
                georeferenced = georeferenced and plan.sensor_model.georeferenced
                written = _segment_image(job, plan, index, outcome)
                if written is not None:
                    parts += written.finish()
                    frames += written.frames
                    outcome.polygons = written.count
            except (ImageError, ModelError, OSError) as exc:
                outcome.status, outcome.reason = "FAILED", str(exc).strip().splitlines()[0]
                outcome.permanent = is_permanent(exc)
            bus.emit(outcome.status, request.job_id, url, outcome.reason or "",
                     failedTiles=len(outcome.failed_tiles))
        empty = empty_features(georeferenced)
        features = (gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=frames[0].crs)
                    if frames else empty)
        result = SegmentationResult(request.job_id, class_names, features, images,
                                    feature_count=sum(i.polygons for i in images))
        if options.polygons and result.status != "FAILED":
            for sink in sinks:  # streamed from the parts: one part in memory at a time
                result.outputs += (sink.write_feature_parts(request.job_id, parts) if parts
                                   else sink.write_features(request.job_id, empty))
    for image in images:
        result.outputs += image.rasters
    summary = result.summary
    for sink in sinks:
        result.outputs.append(sink.write_summary(request.job_id, summary))
    if store is not None and (result.status == "SUCCESS" or not store.records):
        store.remove()  # kept otherwise, for a resume
    why = result.reason
    counted = f"{result.feature_count} polygons"
    bus.emit(result.status, request.job_id, message=why if result.status == "FAILED" and why else
             f"{counted}; {why}" if why else counted)
    return result


def _segment_image(job: _Job, plan: ImagePlan, index: int, outcome: ImageSegmentation) -> FeatureParts | None:
    """One image's chunks and COG; its polygon features as they are written (None: no polygons)."""
    from distributed import as_completed

    began = time.perf_counter()
    request, options, store = job.request, job.options, job.store
    grid = plan.grid
    adjustment = plan.range_adjustment
    stretch = (adjustment["low"], adjustment["high"]) if "low" in adjustment else None
    raster = options.raster and bool(job.outputs)
    chunk_job = ChunkJob(_source(plan), grid, job.spec, options, adjustment["type"], plan.info.bits, stretch,
                         job.polygon_classes, job.location if raster else None, job.role,
                         aws.endpoint_url("s3"), index, len(job.class_names), plan.roi)
    finished = store.finished(index) if store is not None else {}
    chunks = [(r, c) for r in range(grid.chunks_y) for c in range(grid.chunks_x)]
    mask = plan.chunk_mask  # chunks outside the regionOfInterest: nodata parts, no read
    counted = [chunk for chunk in chunks if mask is None or mask[chunk]]
    futures = [job.client.submit(segment_chunk, chunk_job, r, c, pure=False)
               for r, c in chunks if (r, c) not in finished]
    bar = None
    if job.progress:
        bar = job.progress(sum(len(covering_tiles(grid, chunk_bounds(grid, r, c), options.stitch))
                               for r, c in counted))
    parts: list[tuple[tuple[int, int, int, int], Path]] = []  # each fetched as its chunk finishes
    polygons = (FeatureParts(job.features_directory, job, plan, index, job.when, job.collect_features)
                if options.polygons else None)
    for (row, col), record in finished.items():  # resumed: their parts and regions as they were
        outcome.chunks_resumed += 1
        outcome.tiles += record["tiles"]
        if record.get("part") and store is not None:
            parts.append((chunk_bounds(grid, row, col), store.storage.local(record["part"])))
        if record.get("border") and polygons is not None and store is not None:
            polygons.add(load_regions(store.storage.local(record["border"])), (row, col))
        if bar is not None:
            bar.update(record["tiles"])
    for future in as_completed(futures):
        chunk: ChunkOutcome = future.result()
        future.release()
        outcome.tiles += chunk.tiles
        outcome.failed_tiles += chunk.failed_tiles
        outcome.chunks_read += chunk.read
        if chunk.part is not None and store is not None:  # fetched while the other chunks compute
            parts.append((chunk.bounds, store.storage.local(chunk.part)))
        if polygons is not None:
            polygons.add(chunk.regions, chunk.chunk)  # while the other chunks are computed
        if store is not None and not chunk.failed_tiles:  # a chunk with failed tiles is redone
            record = {"image": index, "chunk": list(chunk.chunk), "part": chunk.part,
                      "border": chunk.regions_file, "tiles": chunk.tiles}
            store.storage.append(chunk_name(index, chunk.chunk), json.dumps(record))
            store.records[(index, *chunk.chunk)] = record
        for stage, seconds in chunk.seconds.items():  # the chunk tasks' own time, by stage
            outcome.seconds[f"worker_{stage}"] = outcome.seconds.get(f"worker_{stage}", 0.0) + seconds
        if bar is not None:
            bar.update(chunk.tiles)
    if bar is not None:
        bar.close()
    outcome.seconds["chunks"] = time.perf_counter() - began
    if outcome.failed_tiles:
        outcome.status = "FAILED" if len(outcome.failed_tiles) >= outcome.tiles else "PARTIAL"
        outcome.reason = f"{len(outcome.failed_tiles)} of {outcome.tiles} tiles failed: " \
                         f"{outcome.failed_tiles[0]['reason']}"
    if raster and parts and outcome.status != "FAILED":
        name = raster_name(request.job_id, plan.url, index)
        count = 1 + (len(job.class_names) if options.score_bands else 0)
        dtype = np.dtype(class_dtype(len(job.class_names))).name
        outcome.rasters = assemble_cog(sorted(parts), plan.info, count, dtype, job.class_names, name,
                                       job.outputs)
    outcome.seconds["raster"] = time.perf_counter() - began - outcome.seconds["chunks"]
    return None if outcome.status == "FAILED" else polygons


def assemble_cog(parts: list[tuple[tuple[int, int, int, int], Path]], info: Any, count: int, dtype: str,
                 class_names: tuple[str, ...], name: str, outputs: list[Any]) -> list[str]:
    """In the client, as it writes the features: the parts (this process's copies, fetched
    from the work location as their chunks finished) laid out as one COG, copied to each
    output; returns where it went. Laying out copies the tiles that the chunk tasks encoded
    (a few ms at 8192²): on a worker it waited a round trip to the scheduler behind the last
    chunk."""
    with tempfile.TemporaryDirectory(prefix="segment-cog-") as work:
        cog = write_cog([(bounds, str(path)) for bounds, path in parts], info, count, dtype, class_names,
                        Path(work) / name)
        return _publish(Path(cog), name, outputs)


def _publish(cog: Path, name: str, outputs: list[Any]) -> list[str]:
    """Copy the COG to each output: LOCAL by a temporary name and a rename, S3 by an upload
    that S3 shows only once it completes."""
    from pipeline.sinks import staged_file

    written = []
    for output in outputs:
        if output.type == "LOCAL":
            final = Path(output.path) / name
            with staged_file(output.path, ".tif") as staged:
                shutil.copyfile(cog, staged)
                staged.replace(final)
            written.append(str(final))
        else:
            key = f"{output.prefix.strip('/')}/{name}" if output.prefix.strip("/") else name
            upload(s3_client(output.role, None), cog, output.bucket, key)
            written.append(f"s3://{output.bucket}/{key}")
    return written


def cli_run(request: ImageRequest, cluster: str, workers: int | None, chunk_target: int | None,
            progress: bool) -> int:
    """``model-runner run --segment`` (or a request with ``segmentation``): run, print where the
    outputs went, return the exit status."""
    import sys

    from graphs.cluster import ClusterError, connect
    from pipeline.cli import EXIT_FAILED, EXIT_OK, UsageError, _progress, job_pixels

    if request.segmentation is None:
        request = request.model_copy(update={"segmentation": SegmentationOptions()})
    try:  # a small job in this process, as the image CLI's (graphs.cluster.SMALL_JOB_PIXELS)
        pixels = job_pixels(request) if cluster == "local" and workers is None else None
        with connect(cluster, workers, job_pixels=pixels) as client:
            result = run_segmentation(request, client, progress=_progress(progress),
                                      chunk_target=chunk_target or DEFAULT_CHUNK_TARGET,
                                      collect_features=False)  # the features go to the files only
    except (ClusterError, ModelError) as exc:
        raise UsageError(str(exc)) from None
    for image in result.images:
        line = f"{image.url}: {image.status}, {image.tiles} tiles, {image.polygons} polygons"
        print(line + (f" ({image.reason})" if image.reason else ""), file=sys.stderr)
    for output in result.outputs:
        print(f"  {output}")
    return EXIT_OK if result.status == "SUCCESS" else EXIT_FAILED
