"""The SQS queue worker against a real moto server: SQS + DLQ (redrive policy), SNS → SQS
status, S3 and Kinesis, and a real LocalCluster (in process, or in a ``model-runner worker``
subprocess for SIGTERM)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from graphs.queue_worker import QueueWorker, WorkerConfig, finished_summary
from pipeline.demo import match_truth, write_scene
from pipeline.models.builtin import bright_objects
from pipeline.request import ImageRequest

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- PYTHON models for the jobs
def slow_model(seconds: float = 0.5):
    """bright-objects, ``seconds`` per tile."""

    def model(tiles: np.ndarray, offsets: np.ndarray) -> list[Any]:
        time.sleep(seconds * len(tiles))
        return [bright_objects(tile) for tile in tiles]

    return model


def left_column_fails():
    """bright-objects, but every tile at x == 0 raises."""

    def model(tiles: np.ndarray, offsets: np.ndarray) -> list[Any]:
        if (offsets[:, 0] == 0).any():
            raise RuntimeError("tile at x=0 refused")
        return [bright_objects(tile) for tile in tiles]

    return model


# ---------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def allow_list(tmp_path_factory, monkeypatch) -> None:
    """The worker's door is closed by default: open it to this session's temporary folders
    (scenes in, LOCAL outputs) and to S3/Kinesis, for in-process and ``model-runner worker``
    subprocess workers alike."""
    root = str(tmp_path_factory.getbasetemp())
    monkeypatch.setenv("MODEL_RUNNER_ALLOWED_SOURCES", f"s3://* {root}")
    monkeypatch.setenv("MODEL_RUNNER_ALLOWED_OUTPUTS", f"s3://* kinesis://* {root}")


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return write_scene(tmp_path_factory.mktemp("scene") / "scene.tif", size=512, count=12,
                       tile_size=128, overlap=16, seed=5)


@pytest.fixture
def queues(aws):
    """A request queue with a DLQ (maxReceiveCount 2), a status topic read through a raw SQS
    subscription, a second subscription filtered to terminal statuses, a bucket, a stream."""
    import boto3

    sqs, sns = boto3.client("sqs"), boto3.client("sns")
    tag = uuid.uuid4().hex[:8]

    def queue(name: str, **attributes: str) -> tuple[str, str]:
        url = sqs.create_queue(QueueName=f"{name}-{tag}", Attributes=attributes)["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
        return url, arn["Attributes"]["QueueArn"]

    dlq, dlq_arn = queue("requests-dlq")
    requests, _ = queue("requests", VisibilityTimeout="30", RedrivePolicy=json.dumps(
        {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "2"}))
    topic = sns.create_topic(Name=f"status-{tag}")["TopicArn"]
    status, status_arn = queue("status")
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=status_arn,
                  Attributes={"RawMessageDelivery": "true"})
    final, final_arn = queue("final")
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=final_arn, Attributes={
        "RawMessageDelivery": "true",
        "FilterPolicy": json.dumps({"status": ["SUCCESS", "PARTIAL", "FAILED"]})})
    bucket = f"out-{tag}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    stream = f"features-{tag}"
    boto3.client("kinesis").create_stream(StreamName=stream, ShardCount=1)
    return SimpleNamespace(sqs=sqs, requests=requests, dlq=dlq, topic=topic, status=status,
                           final=final, bucket=bucket, stream=stream)


def request_body(scene, job_id: str, outputs: list[dict[str, Any]], **extra: Any) -> str:
    return json.dumps({
        "jobId": job_id,
        "imageUrls": [str(scene.path)],
        "outputs": outputs,
        "imageProcessor": {"name": "bright-objects", "type": "BUILTIN"},
        "imageProcessorTileSize": 128,
        "imageProcessorTileOverlap": 16,
        **extra,
    })


def drain(sqs, url: str) -> list[dict[str, Any]]:
    """Every message on ``url`` (deleted), as ``{"attributes": {...}, "body": ...}``."""
    found = []
    while True:
        answer = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0,
                                     MessageAttributeNames=["All"], AttributeNames=["All"])
        messages = answer.get("Messages", [])
        if not messages:
            return found
        for m in messages:
            attributes = {k: v["StringValue"] for k, v in m.get("MessageAttributes", {}).items()}
            try:
                body = json.loads(m["Body"])
            except ValueError:
                body = m["Body"]
            found.append({"attributes": attributes, "body": body, "sqs": m.get("Attributes", {})})
            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])


def counts(sqs, url: str) -> tuple[int, int]:
    """(visible, in flight) messages of a queue."""
    a = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    return int(a["ApproximateNumberOfMessages"]), int(a["ApproximateNumberOfMessagesNotVisible"])


def worker(queues, client, **config: Any) -> QueueWorker:
    settings: dict[str, Any] = dict(queue_url=queues.requests, status_topic_arn=queues.topic,
                                    exit_when_idle=True, wait_seconds=0, retry_delay=0)
    settings.update(config)
    return QueueWorker(WorkerConfig(**settings), client)


def kinesis_records(stream: str) -> list[dict[str, Any]]:
    import boto3

    kinesis = boto3.client("kinesis")
    records = []
    for shard in kinesis.list_shards(StreamName=stream)["Shards"]:
        iterator = kinesis.get_shard_iterator(StreamName=stream, ShardId=shard["ShardId"],
                                              ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        records.extend(kinesis.get_records(ShardIterator=iterator, Limit=1000)["Records"])
    return records


# ---------------------------------------------------------------- tests
def test_success_status_kinesis_and_redelivery(scene, queues, tmp_path, dask_client) -> None:
    body = request_body(scene, "job-ok", [
        {"type": "LOCAL", "path": str(tmp_path)},
        # RFC 7946 batches batchSize features a record (OSML's form, the worker's default, one)
        {"type": "kinesis", "stream": queues.stream, "batchSize": 5, "featureForm": "RFC7946"},
    ], someNewOsmlField={"x": 1})
    queues.sqs.send_message(QueueUrl=queues.requests, MessageBody=body)
    queues.sqs.send_message(QueueUrl=queues.requests, MessageBody=body)  # a duplicate delivery
    stats = worker(queues, dask_client, progress_seconds=0, chunk_target=224).run()

    assert (stats.received, stats.succeeded, stats.duplicates) == (2, 1, 1)
    assert stats.job_ids == ["job-ok"]  # the duplicate did not run
    assert counts(queues.sqs, queues.requests) == (0, 0)
    summary = json.loads((tmp_path / "job-ok.summary.json").read_text())
    assert summary["status"] == "SUCCESS" and summary["features"] == len(scene.truth)
    import geopandas as gpd

    features = gpd.read_file(tmp_path / "job-ok.geojson")
    boxes = np.array([json.loads(b) if isinstance(b, str) else b for b in features["imageBBox"]],
                     dtype=float)
    assert match_truth(boxes, scene.truth) == (len(scene.truth), 0, 0)

    # Kinesis: PartitionKey = jobId, each record a FeatureCollection of at most 5 features
    records = kinesis_records(queues.stream)
    collections = [json.loads(r["Data"]) for r in records]
    assert {r["PartitionKey"] for r in records} == {"job-ok"}
    assert all(c["type"] == "FeatureCollection" and 1 <= len(c["features"]) <= 5
               for c in collections)
    assert sum(len(c["features"]) for c in collections) == len(scene.truth)
    assert len(records) == -(-len(scene.truth) // 5)

    # status, read by attribute as OSML consumers do
    status = drain(queues.sqs, queues.status)
    sequence = [m["attributes"]["status"] for m in status]
    assert sequence[0] == "STARTED" and "IN_PROGRESS" in sequence
    assert sequence[-2:] == ["SUCCESS", "SUCCESS"]  # the run, then the acknowledged duplicate
    for m in status:
        attributes = m["attributes"]
        assert attributes["job_id"] == "job-ok"
        assert attributes["image_id"] == f"job-ok:{scene.path}"
        assert attributes["image_status"] == attributes["status"]
        assert float(attributes["processing_duration"]) > 0  # decimal seconds, as OSML's client reads it
        assert set(m["body"]) >= {"jobId", "imageUrl", "status", "processingDuration",
                                  "failedTiles", "message"}
    progress = [m["body"] for m in status if m["body"]["status"] == "IN_PROGRESS"]
    assert all(0 < p["progress"] < 1 for p in progress)
    assert status[-2]["body"]["failedTiles"] == 0
    assert "already complete" in status[-1]["body"]["message"]
    # a filter policy on the OSML attribute sees only the final statuses
    assert [m["attributes"]["status"] for m in drain(queues.sqs, queues.final)] == [
        "SUCCESS", "SUCCESS"]


def test_partial_job_is_deleted_and_reported(scene, queues, tmp_path, dask_client) -> None:
    body = request_body(scene, "job-partial", [{"type": "LOCAL", "path": str(tmp_path)}],
                        imageProcessor={"type": "PYTHON",
                                        "name": "tests.test_queue_worker:left_column_fails"})
    queues.sqs.send_message(QueueUrl=queues.requests, MessageBody=body)
    stats = worker(queues, dask_client).run()
    assert (stats.received, stats.partial) == (1, 1)
    assert counts(queues.sqs, queues.requests) == (0, 0)
    summary = json.loads((tmp_path / "job-partial.summary.json").read_text())
    failed = summary["images"][0]["failedTiles"]
    assert summary["status"] == "PARTIAL" and failed
    assert all(tile["window"][0] == 0 for tile in failed)
    final = drain(queues.sqs, queues.final)
    assert [m["attributes"]["status"] for m in final] == ["PARTIAL"]
    assert final[0]["body"]["failedTiles"] == len(failed)


def test_poison_messages_go_to_the_dlq_at_once(scene, queues, tmp_path, dask_client) -> None:
    out = [{"type": "LOCAL", "path": str(tmp_path)}]
    bodies = {
        "not json": "{this is not json",
        "missing imageProcessor": json.dumps({"jobId": "bad-1", "imageUrls": ["x.tif"],
                                              "outputs": out}),
        "unknown model type": request_body(scene, "bad-2", out,
                                           imageProcessor={"name": "m", "type": "NOPE"}),
        "unknown output type": request_body(scene, "bad-3", [{"type": "FTP", "path": "x"}]),
    }
    for body in bodies.values():
        queues.sqs.send_message(QueueUrl=queues.requests, MessageBody=body)
    stats = worker(queues, dask_client).run()
    assert (stats.received, stats.poison, stats.job_ids) == (4, 4, [])
    assert counts(queues.sqs, queues.requests) == (0, 0)
    dead = drain(queues.sqs, queues.dlq)
    assert sorted(m["body"] if isinstance(m["body"], str) else json.dumps(m["body"])
                  for m in dead) == sorted(
        b if b.startswith("{this") else json.dumps(json.loads(b)) for b in bodies.values())
    reasons = {m["attributes"]["failure_reason"] for m in dead}
    assert any("not valid JSON" in r for r in reasons)
    assert any("imageProcessor" in r and "missing" in r for r in reasons)
    assert any("NOPE" in r for r in reasons)
    assert any("FTP" in r for r in reasons)
    failed = drain(queues.sqs, queues.status)
    assert [m["attributes"]["status"] for m in failed] == ["FAILED"] * 4
    assert sorted(m["attributes"].get("job_id", "") for m in failed) == [
        "", "bad-1", "bad-2", "bad-3"]
    assert {m["attributes"].get("image_id") for m in failed} == {
        None, "bad-1:x.tif", f"bad-2:{scene.path}", f"bad-3:{scene.path}"}
    assert not list(tmp_path.iterdir())


def every_tile_fails():
    """A model whose every tile fails (a transient failure: retried)."""

    def model(tiles: np.ndarray, offsets: np.ndarray) -> list[Any]:
        raise RuntimeError("endpoint unavailable")

    return model


def test_failing_job_reaches_the_dlq_after_the_redrive_count(scene, queues, tmp_path,
                                                             dask_client) -> None:
    # every tile fails: transient, so run again up to maxReceiveCount (2), then FAILED once and
    # dead-lettered by the worker (a permanent failure: tests/test_worker_failures.py)
    body = request_body(scene, "job-failing", [{"type": "LOCAL", "path": str(tmp_path)}],
                        imageProcessor={"type": "PYTHON",
                                        "name": "tests.test_queue_worker:every_tile_fails"})
    queues.sqs.send_message(QueueUrl=queues.requests, MessageBody=body)
    stats = worker(queues, dask_client).run()
    assert (stats.received, stats.failed) == (2, 2)
    assert counts(queues.sqs, queues.requests) == (0, 0)
    dead = drain(queues.sqs, queues.dlq)
    assert [m["body"]["jobId"] for m in dead] == ["job-failing"]
    assert "endpoint unavailable" in dead[0]["attributes"]["failure_reason"]
    final = drain(queues.sqs, queues.final)
    assert [m["attributes"]["status"] for m in final] == ["FAILED"]
    assert "all 25 tiles failed" in final[0]["body"]["message"]  # 5 x 5 tiles, stride 112
    retried = [m["body"]["message"] for m in drain(queues.sqs, queues.status)
               if m["body"]["message"].startswith("attempt")]
    assert retried == [f"attempt 1 of 2 failed, retrying: {final[0]['body']['message']}"]


def test_redelivered_message_finished_on_s3_is_acknowledged(scene, queues, dask_client) -> None:
    import boto3

    s3 = boto3.client("s3")
    s3.put_object(Bucket=queues.bucket, Key="runs/job-done.summary.json",
                  Body=json.dumps({"jobId": "job-done", "status": "SUCCESS", "features": 7}))
    body = request_body(scene, "job-done", [], outputBucket=queues.bucket, outputPrefix="runs/")
    request, _ = ImageRequest.from_message(body)
    assert finished_summary(request) is not None
    queues.sqs.send_message(QueueUrl=queues.requests, MessageBody=body)
    stats = worker(queues, dask_client).run()
    assert (stats.received, stats.duplicates, stats.job_ids) == (1, 1, [])
    assert counts(queues.sqs, queues.requests) == (0, 0)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=queues.bucket)["Contents"]]
    assert keys == ["runs/job-done.summary.json"]  # nothing was run or rewritten
    final = drain(queues.sqs, queues.final)
    assert [(m["attributes"]["status"], m["body"]["features"]) for m in final] == [("SUCCESS", 7)]
    # a summary that is not SUCCESS does not count as done
    s3.put_object(Bucket=queues.bucket, Key="runs/job-done.summary.json",
                  Body=json.dumps({"jobId": "job-done", "status": "PARTIAL"}))
    assert finished_summary(request) is None


def test_cli_worker_s3_image_in_and_s3_out(scene, queues) -> None:
    # A subprocess: GDAL reads the header from moto, and rasterio holds the GIL in part of that
    # read, so the job must not run in the process that hosts the moto server.
    import boto3

    s3 = boto3.client("s3")
    s3.upload_file(str(scene.path), queues.bucket, "in/scene.tif")
    body = json.dumps({**json.loads(request_body(scene, "job-s3", [
        {"type": "S3", "bucket": queues.bucket, "prefix": "out"}])),
        "imageUrls": [f"s3://{queues.bucket}/in/scene.tif"]})
    queues.sqs.send_message(QueueUrl=queues.requests, MessageBody=body)
    process = subprocess.run(
        [sys.executable, "-m", "pipeline", "worker", "--queue-url", queues.requests,
         "--status-topic-arn", queues.topic, "--workers", "1", "--wait-seconds", "0",
         "--exit-when-idle", "--max-jobs", "5"],
        cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr
    assert "1 messages: 1 succeeded" in process.stdout
    assert counts(queues.sqs, queues.requests) == (0, 0)
    summary = json.loads(s3.get_object(Bucket=queues.bucket, Key="out/job-s3.summary.json")
                         ["Body"].read())
    assert summary["status"] == "SUCCESS" and summary["features"] == len(scene.truth)
    collection = json.loads(s3.get_object(Bucket=queues.bucket, Key="out/job-s3.geojson")
                            ["Body"].read())
    assert len(collection["features"]) == len(scene.truth)
    final = drain(queues.sqs, queues.final)
    assert [(m["attributes"]["status"], m["attributes"]["image_id"]) for m in final] == [
        ("SUCCESS", f"job-s3:s3://{queues.bucket}/in/scene.tif")]


def test_sigterm_mid_job_releases_the_message_and_exits_0(scene, queues, tmp_path) -> None:
    body = request_body(scene, "job-slow", [{"type": "LOCAL", "path": str(tmp_path)}],
                        imageProcessor={"type": "PYTHON",
                                        "name": "tests.test_queue_worker:slow_model"},
                        imageProcessorParameters={"seconds": 0.5})
    queues.sqs.send_message(QueueUrl=queues.requests, MessageBody=body)
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "worker", "--queue-url", queues.requests,
         "--status-topic-arn", queues.topic, "--workers", "1", "--wait-seconds", "1",
         "--visibility-timeout", "2", "--progress-seconds", "0"],
        cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        status: list[dict[str, Any]] = []
        deadline = time.monotonic() + 90
        while not any(m["attributes"]["status"] == "STARTED" for m in status):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the job never started"
            status += drain(queues.sqs, queues.status)
            time.sleep(0.3)
        time.sleep(3)  # longer than the 2 s visibility timeout: the heartbeat keeps it hidden
        assert counts(queues.sqs, queues.requests) == (0, 1)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "1 released" in out
    assert not (tmp_path / "job-slow.summary.json").exists()
    # the message is visible again at once, for another worker
    answer = queues.sqs.receive_message(QueueUrl=queues.requests, AttributeNames=["All"])
    (message,) = answer["Messages"]
    assert json.loads(message["Body"])["jobId"] == "job-slow"
    assert message["Attributes"]["ApproximateReceiveCount"] == "2"
    status += drain(queues.sqs, queues.status)
    assert not {"SUCCESS", "PARTIAL", "FAILED"} & {m["attributes"]["status"] for m in status}
