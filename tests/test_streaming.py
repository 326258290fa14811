"""Streaming outputs: the Kinesis and S3 sinks write a job's features from its GeoParquet parts
batch by batch, so their memory does not grow with the job (``tracemalloc``, against a real moto
server); and a ``model-runner worker`` job of 1,000,000 features stays under 2 GB of peak RSS,
worker process and Dask workers together, with every output complete (``slow``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely

from pipeline.detections import Detections
from pipeline.sinks import PART_BATCH_ROWS, KinesisSink, S3Sink, Sink, write_parquet

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers
def _part(path: Path, start: int, n: int) -> Path:
    """A GeoParquet part of ``n`` features shaped like a job's (nested properties too)."""
    i = np.arange(start, start + n)
    x, y = (i % 1000) * 1e-4, (i // 1000) * 1e-4
    frame = gpd.GeoDataFrame({
        "id": [f"feature-{k}" for k in i],
        "imageBBox": [[float(a), float(b), float(a) + 2, float(b) + 2]
                      for a, b in zip(i % 1000, i // 1000, strict=True)],
        "featureClasses": [[{"iri": "object", "score": 0.5}]] * n,
        "inferenceMetadata": [{"jobId": "streaming", "inferenceDT": "2026-01-01T00:00:00+00:00"}] * n,
    }, geometry=shapely.box(x, y, x + 5e-5, y + 5e-5), crs="EPSG:4326")
    write_parquet(frame, path)
    return path


def _peak(write: Callable[[], Any]) -> int:
    """Peak bytes that Python allocated (tracemalloc) while ``write`` ran."""
    tracemalloc.start()
    try:
        write()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _stream_features(stream: str) -> tuple[int, int, int]:
    """(records, features, bytes) on every shard of ``stream``."""
    kinesis = boto3.client("kinesis")
    records = features = size = 0
    for shard in kinesis.list_shards(StreamName=stream)["Shards"]:
        iterator = kinesis.get_shard_iterator(StreamName=stream, ShardId=shard["ShardId"],
                                              ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        while iterator:
            answer = kinesis.get_records(ShardIterator=iterator, Limit=50)
            for record in answer["Records"]:
                records += 1
                size += len(record["Data"])
                features += len(json.loads(record["Data"])["features"])
            if not answer["Records"]:
                break
            iterator = answer.get("NextShardIterator")
    return records, features, size


def _geojson_features(bucket: str, key: str) -> int:
    """Features of a GeoJSON object, counted while it streams (one feature per line)."""
    body = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"]
    lines = body.iter_lines(chunk_size=1 << 20)
    return sum(1 for line in lines if line.lstrip(b",").startswith(b'{"type":"Feature"'))


def _parquet_rows(bucket: str, key: str, tmp: Path) -> int:
    path = tmp / f"{uuid.uuid4().hex}.parquet"
    boto3.client("s3").download_file(bucket, key, str(path))
    return int(pq.ParquetFile(path).metadata.num_rows)


# ---------------------------------------------------------------- sinks: memory bounded by batch
@pytest.fixture
def bucket_and_stream(aws: str) -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    boto3.client("s3").create_bucket(Bucket=f"stream-{tag}")
    boto3.client("kinesis").create_stream(StreamName=f"stream-{tag}", ShardCount=1)
    return f"stream-{tag}", f"stream-{tag}"


def test_kinesis_sink_memory_does_not_grow_with_the_features(bucket_and_stream, tmp_path) -> None:
    _, stream = bucket_and_stream
    small, big = 2 * PART_BATCH_ROWS, 8 * PART_BATCH_ROWS  # one part each: read in batches
    peaks, published = {}, {}
    for n in (small, big):
        part = _part(tmp_path / f"{n}.parquet", 0, n)
        sink = KinesisSink(stream, batch_size=200)
        sink.MAX_CALL_BYTES = 1_000_000  # calls smaller than the job in both runs (AWS: 5 MB)
        assert sink.client is not None  # made (service model loaded) before the measurement
        before = _stream_features(stream)
        peaks[n] = _peak(lambda sink=sink, part=part: sink.write_feature_parts(f"job-{n}", [part]))
        after = _stream_features(stream)
        published[n] = tuple(a - b for a, b in zip(after, before, strict=True))
    for n in (small, big):  # every feature, in FeatureCollections of at most 200
        records, features, _ = published[n]
        assert (records, features) == (-(-n // 200), n)
    # 4× the features, the same memory (a batch, and a PutRecords call of at most 5 MB)
    assert peaks[big] < 1.5 * peaks[small], peaks


def test_s3_sink_memory_does_not_grow_with_the_features(bucket_and_stream, tmp_path) -> None:
    bucket, _ = bucket_and_stream
    small, big = 2 * PART_BATCH_ROWS, 8 * PART_BATCH_ROWS
    peaks = {}
    for n in (small, big):
        parts = [_part(tmp_path / f"{n}-{k}.parquet", k * n // 2, n // 2) for k in range(2)]
        sink = S3Sink(bucket, "runs", ("geojson", "parquet"))
        assert sink._s3() is not None  # made before the measurement
        peaks[n] = _peak(lambda sink=sink, parts=parts: sink.write_feature_parts(f"job-{n}", parts))
        assert _geojson_features(bucket, f"runs/job-{n}.geojson") == n
        assert _parquet_rows(bucket, f"runs/job-{n}.parquet", tmp_path) == n
    assert peaks[big] < 1.5 * peaks[small], peaks
    # the same parts through the default path, which loads them all first
    whole = _peak(lambda: Sink.write_feature_parts(sink, "whole", parts))
    assert peaks[big] < 0.5 * whole, (peaks, whole)


# ---------------------------------------------------------------- a worker job of 1M features
PITCH, SIDE = 4, 4000  #: a 2 × 2 px box every 4 px: (4000 / 4)² = 1,000,000 features


def grid_boxes():
    """A PYTHON model: the 2 × 2 px boxes of a global 4 px grid that lie in each tile."""

    def model(tiles: np.ndarray, offsets: np.ndarray) -> list[Detections]:
        found = []
        for tile, (ox, oy) in zip(tiles, offsets, strict=True):
            height, width = tile.shape[:2]
            xs = np.arange(-(-(int(ox) - 1) // PITCH) * PITCH + 1, int(ox) + width - 1, PITCH) - int(ox)
            ys = np.arange(-(-(int(oy) - 1) // PITCH) * PITCH + 1, int(oy) + height - 1, PITCH) - int(oy)
            gx, gy = (g.ravel().astype(np.float64) for g in np.meshgrid(xs, ys))
            boxes = np.stack([gx, gy, gx + 2, gy + 2], axis=1)
            found.append(Detections(boxes, np.full(len(boxes), 0.9),
                                    np.full(len(boxes), "grid", dtype=object)))
        return found

    return model


class PeakRss:
    """The peak RSS (``VmHWM``) of a process and its descendants, sampled until stopped."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.1):
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            for process in processes:
                try:
                    status = Path(f"/proc/{process.pid}/status").read_text()
                except OSError:
                    continue
                for line in status.splitlines():
                    if line.startswith("VmHWM:"):
                        peak = int(line.split()[1]) * 1024
                        self.peaks[process.pid] = max(self.peaks.get(process.pid, 0), peak)

    def stop(self) -> dict[int, int]:
        self._stop.set()
        self._thread.join()
        return self.peaks


@pytest.mark.slow
def test_a_worker_job_of_a_million_features_streams(aws, tmp_path, monkeypatch) -> None:
    import rasterio
    from rasterio.transform import from_origin

    image = tmp_path / "blank.tif"
    with rasterio.open(image, "w", driver="GTiff", width=SIDE, height=SIDE, count=1, dtype="uint8",
                       crs="EPSG:4326", transform=from_origin(10, 50, 1e-5, 1e-5), tiled=True,
                       compress="deflate") as dst:
        dst.write(np.zeros((1, SIDE, SIDE), dtype=np.uint8))
    tag = uuid.uuid4().hex[:8]
    sqs, bucket, stream = boto3.client("sqs"), f"million-{tag}", f"million-{tag}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    boto3.client("kinesis").create_stream(StreamName=stream, ShardCount=1)
    queue = sqs.create_queue(QueueName=f"million-{tag}")["QueueUrl"]
    sqs.send_message(QueueUrl=queue, MessageBody=json.dumps({
        "jobId": "million",
        "imageUrls": [str(image)],
        "outputs": [{"type": "S3", "bucket": bucket, "prefix": "out"},
                    {"type": "KINESIS", "stream": stream, "batchSize": 1000, "featureForm": "RFC7946"}],
        "imageProcessor": {"name": "tests.test_streaming:grid_boxes", "type": "PYTHON"},
        "imageProcessorTileSize": 384,  # at most 96² boxes a tile (a tile keeps 10,000)
        "imageProcessorTileOverlap": 32,
        "tilingStrategy": "FIXED_STRIDE",  # tiles that reach every edge (the truth is exact)
    }))
    monkeypatch.setenv("MODEL_RUNNER_ALLOWED_SOURCES", str(tmp_path))
    monkeypatch.setenv("MODEL_RUNNER_ALLOWED_OUTPUTS", "s3://* kinesis://*")
    began = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "worker", "--queue-url", queue, "--workers", "1",
         "--wait-seconds", "1", "--exit-when-idle", "--max-jobs", "1", "--chunk-target", "1024"],
        cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rss = PeakRss(process.pid)
    try:
        out, err = process.communicate(timeout=900)
    finally:
        if process.poll() is None:
            process.kill()
        peaks = rss.stop()
    seconds = time.monotonic() - began
    total = sum(peaks.values())
    print(f"1M features: {seconds:.0f} s; peak RSS {total / 2**20:.0f} MiB over {len(peaks)} processes "
          f"({', '.join(f'{v / 2**20:.0f}' for v in peaks.values())} MiB)")
    assert process.returncode == 0 and "1 succeeded" in out, err[-3000:]
    n = (SIDE // PITCH) ** 2
    summary = json.loads(boto3.client("s3").get_object(Bucket=bucket, Key="out/million.summary.json")
                         ["Body"].read())
    assert summary["features"] == n, summary["images"][0]["detections"]
    assert _parquet_rows(bucket, "out/million.parquet", tmp_path) == n
    assert _geojson_features(bucket, "out/million.geojson") == n
    assert _stream_features(stream)[1] == n
    assert len(peaks) >= 2  # the worker process and its Dask worker(s)
    assert total < 2 * 2**30, peaks
