"""The job loop behind :func:`graphs.image_job.run_job`, one method per phase.

:meth:`JobLoop.run`: :meth:`~JobLoop.plan` the images (in parallel on the cluster when there
are several), and as each plan arrives :meth:`~JobLoop.resume` what the manifest already has
and :meth:`~JobLoop.submit` its chunks; :meth:`~JobLoop.compute` the chunks, each result
reduced as it arrives (:meth:`~JobLoop.settle`, back-pressure for a pinned model);
:meth:`~JobLoop.finish_images` (status, border pass); :meth:`~JobLoop.write` the outputs;
:meth:`~JobLoop.summarise`; :meth:`~JobLoop.clean_up`. The reduction itself (chunk results →
merged, geolocated features) is :func:`graphs.image_job.settle_chunk` and
:func:`graphs.image_job.border_pass`, shared with ``lazy_features``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from itertools import chain
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd

from graphs.image_job import (
    ImageOutcome,
    ImagePlan,
    JobResult,
    ProgressFactory,
    _future_error,
    border_pass,
    chunk_inputs,
    chunk_results,
    detect_read,
    done_marker,
    finish_image,
    ground_in_mixed_jobs,
    image_urls,
    job_reason,
    job_status,
    model_spec,
    plan_image,
    plan_where_readable,
    read_chunk,
    sample_pixels,
    settle_chunk,
    total_threads,
    work_location,
    worker_seconds,
)
from graphs.model_targets import finish_model, prepare_model
from pipeline import events as ev
from pipeline import synthetic
from pipeline.detections import Detections
from pipeline.failures import is_permanent, one_line
from pipeline.geolocate import empty_features
from pipeline.infer import ChunkResult
from pipeline.models import ModelSpec, check_model
from pipeline.parts import PartStore, fingerprint
from pipeline.reading import ImageError, read_options
from pipeline.redact import public_url
from pipeline.request import ImageRequest
from pipeline.roi import tiles_in
from pipeline.sinks import Sink, make_sink

log = logging.getLogger(__name__)

#: a chunk in flight: (image index, its outcome, chunk (row, col))
Chunk = tuple[int, ImageOutcome, tuple[int, int]]


@dataclass(frozen=True)
class PlanFailed:
    """Why an image could not be planned (a worker's exception may not survive the trip)."""

    reason: str
    permanent: bool

    @classmethod
    def of(cls, exc: BaseException) -> PlanFailed:
        reason = str(exc) if isinstance(exc, ImageError) else f"cannot plan image: {one_line(exc)}"
        return cls(reason, is_permanent(exc))


#: what a plan task computed of its image's one chunk: its result, or why the task failed
Computed = ChunkResult | str | None


def timed_plan(request: ImageRequest, url: str, chunk_target: int, read_with: dict[str, str] | None,
               metadata: Any = None, spec: ModelSpec | None = None
               ) -> tuple[ImagePlan | PlanFailed, float, Computed]:
    """:func:`~graphs.image_job.plan_image` (or why it failed) and the seconds it took: a task
    on a worker (``metadata``: the image's STAC metadata, which only the client's expansion has).

    Given the model ``spec``, an image of one chunk (a small image; in its regionOfInterest) is
    also read and detected in by this task (:func:`~graphs.image_job.read_chunk`), as its chunk
    task would: one task and one round trip per small image instead of two, and no graph to
    build for it. The third value is that chunk's result, or the one line why computing it
    raised (None: not computed)."""
    began = time.perf_counter()
    try:  # the pixels are sampled below, where the chunk is not read here
        plan: ImagePlan | PlanFailed = plan_image(request, url, chunk_target, read_with, metadata,
                                                  sample=False)
        seconds = time.perf_counter() - began
        if not (spec is not None and isinstance(plan, ImagePlan) and one_chunk(plan)):
            if isinstance(plan, ImagePlan):
                sample_pixels(plan)
            return plan, time.perf_counter() - began, None
    except Exception as exc:  # noqa: BLE001 - the image fails, not the job
        return PlanFailed.of(exc), time.perf_counter() - began, None
    computed: Computed
    try:
        source, model = chunk_inputs(plan, spec)
        read = read_chunk(source, plan.grid, 0, 0)
        if isinstance(read, str):  # as a plan's sample read would have failed, it fails the plan
            try:
                sample_pixels(plan)
            except Exception as exc:  # noqa: BLE001 - the image fails, not the job
                return PlanFailed.of(exc), seconds, None
        computed = detect_read(read, model, 0, 0)
    except Exception as exc:  # noqa: BLE001 - the chunk fails as its own task would
        computed = one_line(exc)
    return plan, seconds, computed


#: one image's arguments of :func:`timed_plan` in a :func:`timed_plans` task: url, read options,
#: STAC metadata and model spec
PlanArgs = tuple[str, dict[str, str] | None, Any, ModelSpec | None]
#: images planned (and, small, computed) by one task at most: a task and its result cost the
#: scheduler and this process ~1-2 ms each, as much as 5-10 % of a small image's reads
MAX_PLAN_BATCH = 8


def timed_plans(request: ImageRequest, images: list[PlanArgs], chunk_target: int
                ) -> list[tuple[ImagePlan | PlanFailed, float, Computed]]:
    """:func:`timed_plan` of each of ``images`` in turn: one task for a few images."""
    return [timed_plan(request, url, chunk_target, options, metadata, spec)
            for url, options, metadata, spec in images]


def plan_batch_size(images: int, threads: int) -> int:
    """Images per plan task: at most :data:`MAX_PLAN_BATCH`, and at least four tasks per
    thread of the cluster (so that every thread has work until the end)."""
    return max(1, min(MAX_PLAN_BATCH, images // (4 * max(threads, 1))))


def one_chunk(plan: ImagePlan) -> bool:
    """Whether ``plan``'s image is one chunk, to compute (in its regionOfInterest)."""
    grid = plan.grid
    return grid.chunks_x * grid.chunks_y == 1 and (plan.chunk_mask is None or bool(plan.chunk_mask[0, 0]))


def plans_on_cluster(urls: list[str]) -> bool:
    """Whether a job's images are planned on the cluster: when more than one image has a
    header to read (a plan reads it and may sample pixels; a round trip to a worker costs more
    than planning one image here)."""
    return sum(not synthetic.is_synthetic(url) for url in urls) > 1


class JobLoop:
    """One run of :func:`graphs.image_job.run_job` (its arguments, documented there)."""

    def __init__(self, request: ImageRequest, client: Any, *, window: Callable[[Any], int],
                 progress: ProgressFactory | None = None, bus: ev.EventBus | None = None,
                 sinks: list[Sink] | None = None, chunk_target: int, resume: bool = False,
                 work_dir: str | Path | None = None, collect_features: bool = True,
                 keep_parts: bool = False) -> None:
        self.request, self.client, self.progress = request, client, progress
        self.bus = bus or ev.EventBus()
        self.chunk_target, self.collect_features, self.keep_parts = chunk_target, collect_features, keep_parts
        self.started = datetime.now(UTC)
        self.began = time.perf_counter()
        spec = model_spec(request)
        check_model(spec)
        self.spec = prepare_model(client, spec)  # endpoint settings, resources (fail fast), metrics
        self.sinks = sinks if sinks is not None else [make_sink(o) for o in request.all_outputs]
        location, role = (work_dir, None) if work_dir else work_location(request)
        self.store = PartStore(location, request.job_id, fingerprint(request.to_wire(), chunk_target),
                               resume=resume, role=role)
        marker = done_marker(request)
        if marker is not None:
            self.sinks = [*self.sinks, make_sink(marker)]
        # A chunk task reads its own pixels, so the cluster holds a chunk per busy thread:
        # chunks are submitted as soon as their image is planned. A pinned model's chunks are
        # read by any worker and wait for a pinned one: a window of chunks in flight
        # (``window(client)`` of them) bounds the waiting pixels.
        self.windowed = bool(self.spec.options.get("resources"))
        self.window = window
        self.outcomes: list[ImageOutcome] = []
        self.futures: dict[Any, Chunk] = {}
        self.queued: deque[tuple[int, ImageOutcome, tuple[int, int], Any]] = deque()
        #: chunks that their plan task computed, to settle first (see :func:`timed_plan`)
        self.ready: list[tuple[int, ImageOutcome, tuple[int, int], ChunkResult | str]] = []
        self.arrivals: Any = None
        self.resumed_tiles = self.resumed_chunks = 0
        self.timed: list[ChunkResult] = []  # this run's chunk results, for their worker seconds
        self.timeline: list[tuple[float, int]] = []

    def run(self) -> JobResult:
        request = self.request
        self.bus.emit(ev.STARTED, request.job_id, message=f"{len(request.image_urls)} image(s)")
        self.plan()
        self.compute()
        parts = self.finish_images()
        status = job_status(self.outcomes)
        features, written, write_began = self.write(status, parts)
        summary = self.summarise(status, written, write_began)
        for sink in self.sinks:
            written.append(sink.write_summary(request.job_id, summary))
        self.clean_up(status)
        why = summary["reason"]
        counted = f"{summary['features']} features"
        self.bus.emit(status, request.job_id, message=why if status == ev.FAILED and why else
                      f"{counted}; {why}" if why else counted)
        permanent = status == ev.FAILED and all(o.permanent for o in self.outcomes)
        return JobResult(features, summary, written, permanent=permanent)

    # ------------------------------------------------------------------ plan
    def plan(self) -> None:
        """Plan every image and queue its chunks as soon as its plan is ready: on the cluster,
        all at once, gathered as they complete (see :func:`plans_on_cluster`), else one by one
        here (:func:`~graphs.image_job.plan_where_readable`). A URL with a secret in it is
        always planned here: it never goes into a task."""
        from distributed import as_completed

        from pipeline.stac import image_metadata

        request, client = self.request, self.client
        urls = image_urls(request)
        self.outcomes = [ImageOutcome(url) for url in urls]
        remote: dict[Any, list[int]] = {}  # plan future → its images' indices
        if plans_on_cluster(urls):
            shared = client.scatter(request, hash=False)  # once, and never in a task spec
            planned: list[tuple[int, PlanArgs]] = []
            for index, url in enumerate(urls):
                if public_url(url) != url:
                    continue
                try:
                    options = (None if synthetic.is_synthetic(url)
                               else read_options(url, request.image_read_role))
                except ImageError as exc:
                    self._plan_failed(self.outcomes[index], PlanFailed.of(exc))
                    continue
                # a small image is computed by its plan task, unless resumed or pinned
                spec = None if self.windowed or self.store.finished(index) else self.spec
                planned.append((index, (url, options, image_metadata(request.job_id, url), spec)))
            size = plan_batch_size(len(planned), total_threads(client))
            for start in range(0, len(planned), size):
                batch = planned[start:start + size]
                key = f"plan-{batch[0][0]}-{request.job_id}-{time.time_ns()}"
                future = client.submit(timed_plans, shared, [args for _, args in batch], self.chunk_target,
                                       pure=False, key=key)
                remote[future] = [index for index, _ in batch]
        on_cluster = {index for indices in remote.values() for index in indices}
        for index, outcome in enumerate(self.outcomes):
            if outcome.status == ev.FAILED or index in on_cluster:
                continue
            began = time.perf_counter()
            try:
                plan = plan_where_readable(client, request, outcome.url, self.chunk_target)
            except Exception as exc:  # noqa: BLE001 - one bad image must not stop the others
                outcome.timer.add("plan", time.perf_counter() - began)
                self._plan_failed(outcome, PlanFailed.of(exc))
                continue
            self._planned(index, plan, time.perf_counter() - began)
        for future, values in as_completed(list(remote), with_results=True, raise_errors=False):
            indices = remote.pop(future)
            future.release()
            if not (isinstance(values, list) and len(values) == len(indices)):
                # the task itself failed (a lost worker): each of its images with its reason
                values = [f"cannot plan image: {_future_error(values)}"] * len(indices)
            for index, value in zip(indices, values, strict=True):
                if isinstance(value, str):
                    self._plan_failed(self.outcomes[index], PlanFailed(value, False))
                elif isinstance(value[0], ImagePlan):
                    self._planned(index, *value)
                else:
                    self.outcomes[index].timer.add("plan", value[1])
                    self._plan_failed(self.outcomes[index], value[0])
        ground_in_mixed_jobs(self.outcomes)

    def _plan_failed(self, outcome: ImageOutcome, failed: PlanFailed) -> None:
        outcome.status, outcome.reason, outcome.permanent = ev.FAILED, failed.reason, failed.permanent
        self.bus.emit(ev.FAILED, self.request.job_id, outcome.url, failed.reason)

    def _planned(self, index: int, plan: ImagePlan, seconds: float, computed: Computed = None) -> None:
        """Image ``index`` is planned (in ``seconds``): resume it, queue its chunks to compute
        (or, ``computed`` by its plan task, to settle)."""
        outcome = self.outcomes[index]
        outcome.timer.add("plan", seconds)
        if computed is not None:
            outcome.plan = plan
            outcome.tiles = tiles_in(plan.chunk_mask, plan.grid)
            self.resume(index, outcome)  # nothing: a resumed image is not computed by its plan
            self.ready.append((index, outcome, (0, 0), computed))
            return
        with outcome.timer.stage("plan"):
            try:
                results = chunk_results(plan, self.request, self.spec, self.client)
            except Exception as exc:  # noqa: BLE001 - one bad image must not stop the others
                self._plan_failed(outcome, PlanFailed.of(exc))
                return
            outcome.plan = plan
            outcome.tiles = tiles_in(plan.chunk_mask, plan.grid)
            finished = self.resume(index, outcome)
            delayed = results.to_delayed(optimize_graph=not self.windowed)
            mask = plan.chunk_mask  # chunks outside the regionOfInterest are skipped
            todo = [(chunk, item) for chunk, item in np.ndenumerate(delayed)
                    if chunk not in finished and (mask is None or mask[chunk])]
        self.queued.extend((index, outcome, chunk, item) for chunk, item in todo)
        if not self.windowed:
            self.submit(len(self.queued))

    def resume(self, index: int, outcome: ImageOutcome) -> set[tuple[int, int]]:
        """Tally the chunks of image ``index`` that the manifest lists as done; their chunks."""
        finished = self.store.finished(index)
        for record in finished.values():
            outcome.add_finished(record, self.store.border(record))
            self.resumed_tiles += record["tiles"]
        self.resumed_chunks += len(finished)
        return set(finished)

    # ------------------------------------------------------------------ compute
    def submit(self, count: int) -> list[Any]:
        """Hand the next ``count`` queued chunks to the cluster."""
        batch = [self.queued.popleft() for _ in range(min(count, len(self.queued)))]
        submitted = self.client.compute([item for *_, item in batch]) if batch else []
        for (image, outcome, chunk, _), future in zip(batch, submitted, strict=True):
            self.futures[future] = (image, outcome, chunk)
        return submitted

    def compute(self) -> None:
        """Settle every chunk result as it arrives, a queued chunk taking each one's place."""
        from distributed import as_completed

        total_tiles = sum(o.tiles for o in self.outcomes)
        bar = self.progress(total_tiles) if self.progress else None
        done_tiles = self.resumed_tiles
        found = sum(o.before_merge for o in self.outcomes)
        if bar is not None and self.resumed_tiles:
            bar.update(self.resumed_tiles)
        self.timeline = [(round(time.perf_counter() - self.began, 3), done_tiles)]
        self.submit(self.window(self.client) if self.windowed else 0)
        self.arrivals = as_completed(list(self.futures), with_results=True, raise_errors=False)
        ready = ((None, value) for value in self.ready)
        for future, value in chain(ready, self.arrivals):
            result = self.settle(future, value) if future is not None else self._settle(*value)
            done_tiles += result.tiles
            found += len(result.detections)
            self.timeline.append((round(time.perf_counter() - self.began, 3), done_tiles))
            if bar is not None:
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(detections=found, refresh=False)
                bar.update(result.tiles)
        if bar is not None:
            bar.close()

    def settle(self, future: Any, value: Any) -> ChunkResult:
        """One chunk's result (or failure): reduced (:func:`~graphs.image_job.settle_chunk`)
        and written to the part store; the next queued chunk is submitted in its place."""
        index, outcome, chunk = self.futures.pop(future)
        future.release()
        if self.queued:  # the next chunk takes the place of this one
            self.arrivals.update(self.submit(1))
        # the chunk's result, even if the worker that held it has died since (the future
        # then reads "lost" or "pending" while the scheduler recomputes a key we have)
        return self._settle(index, outcome, chunk, value[0, 0] if isinstance(value, np.ndarray)
                            else _future_error(value))

    def _settle(self, index: int, outcome: ImageOutcome, chunk: tuple[int, int],
                value: ChunkResult | str) -> ChunkResult:
        """Chunk ``chunk`` of image ``index`` computed (or the one line why it failed):
        reduced and written to the part store."""
        plan = outcome.plan
        assert plan is not None
        if isinstance(value, ChunkResult):
            result = value
            self.timed.append(replace(result, detections=Detections()))  # its seconds only
        else:
            log.warning("chunk %s of %s failed: %s", chunk, outcome.url, value)
            result = ChunkResult.failed(chunk, plan.grid.chunk_tiles(*chunk), value)
        features, waiting, classes = settle_chunk(outcome, result, self.request)
        with outcome.timer.stage("write"):
            self.store.write_chunk(
                index, result.chunk, features, waiting,
                {"url": public_url(plan.url), "tiles": result.tiles,
                 "rawDetections": result.raw_detections, "classes": classes,
                 "droppedDetections": result.dropped_detections,
                 "detections": len(result.detections), "modelSeconds": round(result.model_seconds, 4)},
                complete=not result.failed_tiles,
            )
        return result

    # ------------------------------------------------------------------ finish
    def finish_images(self) -> list[Path]:
        """Each planned image's status and border pass (written as one more part); the
        parts of the images that did not fail, in request order."""
        parts: list[Path] = []
        for index, outcome in enumerate(self.outcomes):
            if outcome.plan is None:
                continue
            finish_image(outcome)
            if outcome.status != ev.FAILED:
                features = border_pass(outcome, self.request)
                with outcome.timer.stage("write"):
                    self.store.write_border(index, features)
                parts.extend(self.store.parts(index))
            outcome.border.clear()
            self.bus.emit(outcome.status, self.request.job_id, outcome.url, outcome.reason or "",
                          failedTiles=len(outcome.failed_tiles))
        return parts

    def write(self, status: str, parts: list[Path]) -> tuple[gpd.GeoDataFrame, list[str], float]:
        """Write the features to every sink (unless the job failed); the features for the
        result (empty unless ``collect_features``), the outputs and when writing began."""
        job_id = self.request.job_id
        georeferenced = any(o.plan.sensor_model.georeferenced for o in self.outcomes if o.plan)
        written: list[str] = []
        write_began = time.perf_counter()
        if status != ev.FAILED:
            for sink in self.sinks:
                if parts:
                    written.extend(sink.write_feature_parts(job_id, parts))
                else:
                    written.extend(sink.write_features(job_id, empty_features(georeferenced)))
        features = empty_features(georeferenced)
        if self.collect_features and parts and status != ev.FAILED:
            frames = [gpd.read_parquet(p) for p in parts]
            features = gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=frames[0].crs)
        return features, written, write_began

    def summarise(self, status: str, written: list[str], write_began: float) -> dict[str, Any]:
        """The job's summary (``<jobId>.summary.json``)."""
        request, outcomes = self.request, self.outcomes
        stage_seconds: dict[str, float] = {}
        for outcome in outcomes:
            for name, value in outcome.timer.as_dict().items():
                stage_seconds[name] = round(stage_seconds.get(name, 0.0) + value, 4)
        n_features = sum(o.after_merge for o in outcomes if o.status != ev.FAILED)
        return {
            "jobId": request.job_id,
            "jobName": request.job_name,
            "status": status,
            "reason": job_reason(outcomes),
            "model": {"type": self.spec.type, "name": self.spec.name},
            "tileSize": request.tile_size,
            "tileOverlap": request.tile_overlap,
            "features": n_features if status != ev.FAILED else 0,
            "classes": dict(sum((o.classes for o in outcomes if o.status != ev.FAILED),
                                Counter()).most_common()),
            "images": [o.summary() for o in outcomes],
            "chunks": {"computed": len(self.timeline) - 1, "resumed": self.resumed_chunks},
            "startTime": self.started.isoformat(),
            "endTime": datetime.now(UTC).isoformat(),
            "seconds": {
                "total": round(time.perf_counter() - self.began, 4),
                "write": round(time.perf_counter() - write_began, 4),
                "stages": stage_seconds,
                "workers": worker_seconds(self.timed),
            },
            "modelMetrics": finish_model(self.client),
            "outputs": list(written),
            "timeline": {"seconds": [t for t, _ in self.timeline], "tiles": [n for _, n in self.timeline]},
        }

    def clean_up(self, status: str) -> None:
        """Remove the parts after a successful job (unless ``keep_parts``); keep them for a
        resume otherwise."""
        if (status == ev.SUCCESS and not self.keep_parts) or not self.store.records:
            self.store.remove()

