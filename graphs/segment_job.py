"""The segmentation job: per chunk, read the chunk and its halo, segment, stitch, write the
chunk's part of the class raster and vectorise its regions; then one COG per image and the
class polygons, dissolved across chunk seams, as the job's features.

Each chunk task reads its own window (its pixels plus the halo its covering tiles reach into)
as the detection job's tasks do: chunks exchange nothing but the pixels they both read, and a
task holds one chunk at a time. What comes back to the client is small: the part's path and
the chunk's regions (polygons with probability sums).
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio.errors

from graphs.image_job import (
    ImagePlan,
    WindowSource,
    image_urls,
    model_spec,
    plan_where_readable,
)
from pipeline import synthetic
from pipeline.aws import GdalOptions
from pipeline.geolocate import empty_features, to_features
from pipeline.io import ImageError, RasterSource, gdal_error_line
from pipeline.models import ModelError, ModelSpec
from pipeline.request import ImageRequest, SegmentationOptions
from pipeline.segmentation.models import check_segmenter, resolve_segmenter
from pipeline.segmentation.polygons import Regions, chunk_regions, dissolve, to_detections
from pipeline.segmentation.raster import band_data, write_cog, write_part
from pipeline.segmentation.stitch import covering_tiles, read_window, stitch_chunk
from pipeline.sinks import make_sink, upload
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
    part_dir: str | None


@dataclass
class ChunkOutcome:
    chunk: tuple[int, int]
    bounds: tuple[int, int, int, int]
    part: str | None = None
    regions: Regions = field(default_factory=Regions.empty)
    tiles: int = 0
    failed_tiles: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def segment_chunk(job: ChunkJob, row: int, col: int) -> ChunkOutcome:
    """One chunk: read, segment, stitch, write its part, vectorise its regions."""
    grid = job.grid
    bounds = grid.chunk_bounds(row, col)
    mode = job.options.stitch
    window = read_window(covering_tiles(grid, bounds, mode), bounds)
    outcome = ChunkOutcome((row, col), bounds)
    began = time.perf_counter()
    try:
        pixels = job.source.read(window)
    except rasterio.errors.RasterioIOError as exc:
        reason = f"cannot read pixels {window} of {job.source.url}: {gdal_error_line(exc)}"
        windows = covering_tiles(grid, bounds, mode)
        outcome.tiles = len(windows)
        outcome.failed_tiles = [{"window": [int(v) for v in w], "reason": reason} for w in windows]
        return outcome
    read = time.perf_counter()
    adjustment = job.range_adjustment
    if job.stretch is not None:  # the image's DRA, once per chunk
        pixels = np.moveaxis(to_uint8(np.moveaxis(pixels, 0, -1), "DRA", job.bits, job.stretch), -1, 0)
        adjustment = "NONE"
    stitched = stitch_chunk(pixels, window[:2], bounds, grid, job.spec, mode, adjustment, job.bits)
    del pixels
    model = time.perf_counter()
    outcome.tiles, outcome.failed_tiles = stitched.tiles, stitched.failed_tiles
    if job.part_dir is not None:
        bands = band_data(stitched.classes, stitched.scores, job.options.score_bands,
                          len(stitched.class_names))
        outcome.part = write_part(job.part_dir, (row, col), bands)
    written = time.perf_counter()
    if job.options.polygons:
        outcome.regions = chunk_regions(stitched.classes, stitched.scores, bounds,
                                        (grid.width, grid.height), list(job.polygon_classes))
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
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class SegmentationResult:
    """What a segmentation job produced."""

    job_id: str
    class_names: tuple[str, ...]
    features: gpd.GeoDataFrame
    images: list[ImageSegmentation]
    outputs: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        statuses = {i.status for i in self.images}
        return "SUCCESS" if statuses == {"SUCCESS"} else "FAILED" if statuses == {"FAILED"} else "PARTIAL"

    @property
    def summary(self) -> dict[str, Any]:
        return {"jobId": self.job_id, "status": self.status, "classNames": list(self.class_names),
                "features": len(self.features), "outputs": self.outputs,
                "images": [{"url": i.url, "status": i.status, "reason": i.reason, "tiles": i.tiles,
                            "failedTiles": len(i.failed_tiles), "rasters": i.rasters,
                            "polygons": i.polygons, "seconds": i.seconds} for i in self.images]}


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


def run_segmentation(request: ImageRequest, client: Any, *, chunk_target: int = DEFAULT_CHUNK_TARGET,
                     progress: Callable[[int], Any] | None = None) -> SegmentationResult:
    """Run a segmentation job (``request.segmentation``) on ``client`` and write its outputs:
    a COG per image and the polygons as features to each LOCAL/S3 output."""
    options = request.segmentation or SegmentationOptions()
    spec = resolve_segmenter(model_spec(request))
    class_names = check_segmenter(spec)
    polygon_classes = polygon_indices(options, class_names)
    outputs = [o for o in request.all_outputs if o.type in ("LOCAL", "S3")]
    frames: list[gpd.GeoDataFrame] = []
    images: list[ImageSegmentation] = []
    work = Path(tempfile.mkdtemp(prefix=f"segment-{request.job_id}-"))
    try:
        for index, url in enumerate(image_urls(request)):
            outcome = ImageSegmentation(url)
            images.append(outcome)
            try:
                plan = plan_where_readable(client, request, url, chunk_target)
            except ImageError as exc:
                outcome.status, outcome.reason = "FAILED", str(exc)
                continue
            frames.append(_segment_image(client, request, plan, spec, options, class_names,
                                         polygon_classes, outputs, work, index, outcome, progress))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    features = (gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=frames[0].crs)
                if frames else empty_features())
    result = SegmentationResult(request.job_id, class_names, features, images)
    if options.polygons:
        for output in outputs:
            result.outputs += make_sink(output).write_features(request.job_id, features)
    for image in images:
        result.outputs += image.rasters
    return result


def _segment_image(client: Any, request: ImageRequest, plan: ImagePlan, spec: ModelSpec,
                   options: SegmentationOptions, class_names: tuple[str, ...],
                   polygon_classes: tuple[int, ...], outputs: list[Any], work: Path, index: int,
                   outcome: ImageSegmentation, progress: Callable[[int], Any] | None) -> gpd.GeoDataFrame:
    from distributed import as_completed

    began = time.perf_counter()
    grid = plan.grid
    adjustment = plan.range_adjustment
    stretch = (adjustment["low"], adjustment["high"]) if "low" in adjustment else None
    part_dir = work / f"parts-{index}" if options.raster and outputs else None
    if part_dir is not None:
        part_dir.mkdir(parents=True)
    job = ChunkJob(_source(plan), grid, spec, options, adjustment["type"], plan.info.bits, stretch,
                   polygon_classes, str(part_dir) if part_dir else None)
    chunks = [(r, c) for r in range(grid.chunks_y) for c in range(grid.chunks_x)]
    futures = [client.submit(segment_chunk, job, r, c, pure=False) for r, c in chunks]
    bar = None
    if progress:
        bar = progress(sum(len(covering_tiles(grid, grid.chunk_bounds(r, c), options.stitch))
                           for r, c in chunks))
    parts: list[tuple[tuple[int, int, int, int], str]] = []
    regions: list[Regions] = []
    for future in as_completed(futures):
        chunk: ChunkOutcome = future.result()
        future.release()
        outcome.tiles += chunk.tiles
        outcome.failed_tiles += chunk.failed_tiles
        if chunk.part is not None:
            parts.append((chunk.bounds, chunk.part))
        regions.append(chunk.regions)
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
    if part_dir is not None and parts:
        name = raster_name(request.job_id, plan.url, index)
        count = 1 + (len(class_names) if options.score_bands else 0)
        dtype = "uint8" if len(class_names) <= 256 else "uint16"
        cog = client.submit(write_cog, parts, plan.info, count, dtype, class_names,
                            str(work / name), pure=False).result()
        outcome.rasters = _publish(Path(cog), name, outputs)
    outcome.seconds["raster"] = time.perf_counter() - began - outcome.seconds["chunks"]
    if not options.polygons:
        return empty_features(plan.sensor_model.georeferenced)
    detections = to_detections(dissolve(Regions.concat(regions)), class_names, plan.sensor_model,
                               options.simplify, options.min_area)
    outcome.polygons = len(detections)
    return to_features(detections, plan.sensor_model, image_url=plan.url, job_id=request.job_id,
                       feature_properties=request.merged_feature_properties,
                       extra_columns=plan.feature_columns)


def _publish(cog: Path, name: str, outputs: list[Any]) -> list[str]:
    """Copy the COG to each output: LOCAL by a temporary name and a rename, S3 by an upload
    that S3 shows only once it completes."""
    from pipeline import aws
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
            upload(aws.client("s3", output.role), cog, output.bucket, key)
            written.append(f"s3://{output.bucket}/{key}")
    return written


def cli_run(request: ImageRequest, cluster: str, workers: int | None, chunk_target: int | None,
            progress: bool) -> int:
    """``model-runner run --segment`` (or a request with ``segmentation``): run, print where the
    outputs went, return the exit status."""
    import sys

    from graphs.cluster import ClusterError, connect
    from pipeline.cli import EXIT_FAILED, EXIT_OK, UsageError, _progress

    if request.segmentation is None:
        request = request.model_copy(update={"segmentation": SegmentationOptions()})
    try:
        with connect(cluster, workers) as client:
            result = run_segmentation(request, client, progress=_progress(progress),
                                      chunk_target=chunk_target or DEFAULT_CHUNK_TARGET)
    except (ClusterError, ModelError) as exc:
        raise UsageError(str(exc)) from None
    for image in result.images:
        line = f"{image.url}: {image.status}, {image.tiles} tiles, {image.polygons} polygons"
        print(line + (f" ({image.reason})" if image.reason else ""), file=sys.stderr)
    for output in result.outputs:
        print(f"  {output}")
    return EXIT_OK if result.status == "SUCCESS" else EXIT_FAILED
