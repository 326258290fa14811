"""Resume anywhere: a job's manifest and parts live beside its S3 outputs (or under
``MODEL_RUNNER_WORK_PREFIX`` for a Kinesis-only job), so a redelivered message resumes in another
``model-runner worker`` process with another temporary directory, and a finished Kinesis-only
job is acknowledged without publishing again. Against a real moto server, real worker processes
and a real HTTP model server that counts the tiles it is sent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import geopandas as gpd
import pytest

from graphs.image_job import done_marker, plan_image, run_job, work_location
from graphs.queue_worker import finished_summary
from pipeline.demo import write_scene
from pipeline.request import ImageRequest
from pipeline.security import AccessDenied, AllowList
from tests.model_servers import serving
from tests.test_queue_worker import (  # noqa: F401 - fixtures
    allow_list,
    counts,
    kinesis_records,
    queues,
    request_body,
    worker,
)

ROOT = Path(__file__).resolve().parents[1]
TILE, OVERLAP, CHUNK = 128, 16, 224
FAST = {"retryBaseDelay": 0.01, "retryMaxDelay": 0.05}


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """1024² px, 81 tiles in 16 chunks of at most 3 × 3 tiles."""
    return write_scene(tmp_path_factory.mktemp("scene") / "scene.tif", size=1024, count=40,
                       tile_size=TILE, overlap=OVERLAP, seed=11, chunk_target=CHUNK)


def _wire(scene: Any, job_id: str, outputs: list[dict[str, Any]], model_url: str) -> dict[str, Any]:
    return {
        "jobId": job_id,
        "imageUrls": [str(scene.path)],
        "outputs": outputs,
        "imageProcessor": {"name": f"{model_url}/invocations", "type": "HTTP_ENDPOINT"},
        "imageProcessorParameters": FAST,
        "imageProcessorTileSize": TILE,
        "imageProcessorTileOverlap": OVERLAP,
    }


def _start_worker(queue_set: Any, tmp: Path) -> subprocess.Popen[str]:
    """A ``model-runner worker`` process (its own session, so that a kill takes its Dask
    workers too) with its own TMPDIR."""
    tmp.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "worker", "--queue-url", queue_set.requests,
         "--workers", "1", "--wait-seconds", "1", "--visibility-timeout", "3",
         "--exit-when-idle", "--max-jobs", "1", "--chunk-target", str(CHUNK)],
        cwd=ROOT, env=dict(os.environ, TMPDIR=str(tmp)), start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _records(s3: Any, bucket: str, prefix: str) -> list[dict[str, Any]]:
    """The chunk records of the manifest at ``s3://bucket/prefix``."""
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}manifest/").get("Contents", [])
    return [json.loads(s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()) for o in listed]


def _feature_rows(collection: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Features without the job's own metadata, in a canonical order."""
    rows = []
    for feature in collection["features"]:
        properties = {k: v for k, v in feature["properties"].items() if k != "inferenceMetadata"}
        rows.append((feature["id"], json.dumps(feature["geometry"], sort_keys=True),
                     json.dumps(properties, sort_keys=True)))
    return sorted(rows)


def test_a_killed_worker_is_resumed_by_another_process(scene, queues, tmp_path, dask_client) -> None:  # noqa: F811
    s3 = boto3.client("s3")
    with serving("bright-objects", latency=0.15, slots=1) as server:
        wire = _wire(scene, "job-resume", [{"type": "S3", "bucket": queues.bucket, "prefix": "out"}],
                     server.url)
        request = ImageRequest.parse(wire)
        total = plan_image(request, str(scene.path), CHUNK).grid.n_tiles
        parts = "out/job-resume.parts/"
        assert work_location(request) == (f"s3://{queues.bucket}/{parts}", None)
        queues.sqs.send_message(QueueUrl=queues.requests, MessageBody=json.dumps(wire))

        first = _start_worker(queues, tmp_path / "tmp-1")
        try:  # kill it (SIGKILL, with its Dask workers) once half the chunks are in S3
            deadline = time.monotonic() + 120
            while len(_records(s3, queues.bucket, parts)) < 8:
                assert first.poll() is None, first.communicate()
                assert time.monotonic() < deadline, "the job made no progress"
                time.sleep(0.1)
            os.killpg(first.pid, signal.SIGKILL)
        finally:
            first.wait(timeout=30)
        deadline = time.monotonic() + 30  # requests the killed workers sent are answered
        while server.stats.in_flight and time.monotonic() < deadline:
            time.sleep(0.1)
        finished = _records(s3, queues.bucket, parts)
        finished_tiles = sum(r["tiles"] for r in finished)
        first_calls = server.stats.tiles
        assert 0.4 * total <= finished_tiles < total and first_calls < total

        deadline = time.monotonic() + 30  # the heartbeat stopped: the message comes back
        while counts(queues.sqs, queues.requests) != (1, 0):
            assert time.monotonic() < deadline, "the message never became visible again"
            time.sleep(0.3)
        second = _start_worker(queues, tmp_path / "tmp-2")
        out, err = second.communicate(timeout=180)
        assert second.returncode == 0, err
        assert "1 succeeded" in out, err[-3000:]
        second_calls = server.stats.tiles - first_calls

    # the second process redid only the chunks the manifest did not list
    assert second_calls == total - finished_tiles <= 0.6 * total
    summary = json.loads(s3.get_object(Bucket=queues.bucket, Key="out/job-resume.summary.json")
                         ["Body"].read())
    assert summary["status"] == "SUCCESS"
    assert summary["chunks"]["resumed"] == len(finished) >= 8
    assert counts(queues.sqs, queues.requests) == (0, 0)
    assert "Contents" not in s3.list_objects_v2(Bucket=queues.bucket, Prefix=parts)  # cleaned up

    # the same outputs as an undisturbed run of the same request (by a worker too: same form)
    with serving("bright-objects") as calm_server:
        calm = _wire(scene, "job-calm", [{"type": "S3", "bucket": queues.bucket, "prefix": "calm"}],
                     calm_server.url)
        queues.sqs.send_message(QueueUrl=queues.requests, MessageBody=json.dumps(calm))
        assert worker(queues, dask_client, chunk_target=CHUNK).run().succeeded == 1
    outputs = {}
    for name in ("out/job-resume", "calm/job-calm"):
        outputs[name] = json.loads(s3.get_object(Bucket=queues.bucket, Key=f"{name}.geojson")["Body"].read())
        (tmp_path / "p.parquet").write_bytes(
            s3.get_object(Bucket=queues.bucket, Key=f"{name}.parquet")["Body"].read())
        assert sorted(gpd.read_parquet(tmp_path / "p.parquet")["id"]) == sorted(
            f["id"] for f in outputs[name]["features"])
    assert len(outputs["out/job-resume"]["features"]) == summary["features"] > 0
    assert _feature_rows(outputs["out/job-resume"]) == _feature_rows(outputs["calm/job-calm"])


def test_a_finished_kinesis_only_job_is_not_published_again(
        scene, queues, dask_client, monkeypatch) -> None:  # noqa: F811
    s3 = boto3.client("s3")
    monkeypatch.setenv("MODEL_RUNNER_WORK_PREFIX", f"s3://{queues.bucket}/work/")
    body = request_body(scene, "job-kinesis", [{"type": "kinesis", "stream": queues.stream,
                                                "batchSize": 5}])
    request, _ = ImageRequest.from_message(body)
    assert work_location(request) == (f"s3://{queues.bucket}/work/job-kinesis.parts/", None)
    assert finished_summary(request) is None
    queues.sqs.send_message(QueueUrl=queues.requests, MessageBody=body)
    stats = worker(queues, dask_client, chunk_target=CHUNK).run()
    assert (stats.received, stats.succeeded) == (1, 1)
    published = kinesis_records(queues.stream)
    features = sum(len(json.loads(r["Data"])["features"]) for r in published)
    assert features == len(scene.truth)
    marker = json.loads(s3.get_object(Bucket=queues.bucket, Key="work/job-kinesis.summary.json")
                        ["Body"].read())
    assert marker["status"] == "SUCCESS" and marker["features"] == features
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=queues.bucket, Prefix="work/")["Contents"]]
    assert keys == ["work/job-kinesis.summary.json"]  # the parts are gone, the marker stays

    queues.sqs.send_message(QueueUrl=queues.requests, MessageBody=body)  # redelivered
    stats = worker(queues, dask_client, chunk_target=CHUNK).run()
    assert (stats.received, stats.duplicates, stats.job_ids) == (1, 1, [])
    assert len(kinesis_records(queues.stream)) == len(published)  # nothing published again
    assert counts(queues.sqs, queues.requests) == (0, 0)


def test_a_kinesis_only_job_resumes_from_the_work_prefix(
        scene, queues, dask_client, monkeypatch, tmp_path) -> None:  # noqa: F811
    """A crash part-way, then a resume with another temporary directory: only the chunks that
    the manifest in S3 does not list go to the model again."""
    monkeypatch.setenv("MODEL_RUNNER_WORK_PREFIX", f"s3://{queues.bucket}/work")
    outputs = [{"type": "KINESIS", "stream": queues.stream, "batchSize": 50}]

    class Crash(Exception):
        pass

    class Bar:
        def __init__(self, total: int) -> None:
            self.done = 0

        def update(self, tiles: int) -> None:
            self.done += 1
            if self.done > 6:
                raise Crash

        def close(self) -> None:
            pass

    with serving("bright-objects") as server:
        request = ImageRequest.parse(_wire(scene, "job-k-resume", outputs, server.url))
        monkeypatch.setenv("TMPDIR", str(tmp_path / "one"))
        (tmp_path / "one").mkdir()
        with pytest.raises(Crash):
            run_job(request, dask_client, chunk_target=CHUNK, progress=Bar, resume=True)
        assert kinesis_records(queues.stream) == []
        before = server.stats.tiles
        monkeypatch.setenv("TMPDIR", str(tmp_path / "two"))
        (tmp_path / "two").mkdir()
        import tempfile

        monkeypatch.setattr(tempfile, "tempdir", None)  # TMPDIR is read again
        result = run_job(request, dask_client, chunk_target=CHUNK, resume=True, collect_features=False)
        redone = server.stats.tiles - before
    assert result.status == "SUCCESS" and result.summary["chunks"]["resumed"] >= 6
    assert redone < plan_image(request, str(scene.path), CHUNK).grid.n_tiles
    assert len(result.features) == 0  # collect_features=False: the features are in the outputs
    published = kinesis_records(queues.stream)
    assert sum(len(json.loads(r["Data"])["features"]) for r in published) == len(scene.truth)
    assert done_marker(request) is not None


def test_work_prefix_must_be_an_allowed_s3_prefix() -> None:
    allow = AllowList.from_strings(outputs=["s3://results/runs", "kinesis://*"])
    assert allow.check_work_prefix({}) is None
    env = {"MODEL_RUNNER_WORK_PREFIX": "s3://results/runs/work/"}
    assert allow.check_work_prefix(env) == "s3://results/runs/work"
    for value, reason in (("s3://elsewhere/work", "not on the allow-list"),
                          ("/tmp/work", "not an s3://"), ("kinesis://stream", "not an s3://")):
        with pytest.raises(AccessDenied, match=reason) as err:
            AllowList.from_strings(outputs=["s3://results/runs", "kinesis://*", "/tmp"]).check_work_prefix(
                {"MODEL_RUNNER_WORK_PREFIX": value})
        assert "MODEL_RUNNER_WORK_PREFIX" in str(err.value) and "\n" not in str(err.value)


def test_the_example_worker_config_allows_its_work_prefix() -> None:
    lines = (ROOT / "configs" / "worker" / "worker.env").read_text().splitlines()
    env = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    assert AllowList.for_worker(env).check_work_prefix(env) == env["MODEL_RUNNER_WORK_PREFIX"]
