"""Failure is a clean state in the queue worker (real moto SQS/SNS/S3, a real LocalCluster).

A permanent failure (an image that cannot be opened, a region of interest that misses the
image, a refused URL, an invalid request) gives
exactly one FAILED status whose message is its one-line reason, and its message leaves the
queue after one receive: dead-lettered by the worker (with the reason) where the queue has a
DLQ, deleted where it has none. A transient one is run again, at most ``max_attempts`` times.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from graphs.queue_worker import QueueWorker, WorkerConfig
from pipeline.demo import write_scene
from pipeline.security import AllowList
from tests.test_queue_worker import counts, drain

#: a VRT (it could point anywhere) in a GeoTIFF's and a NITF's clothes
VRT = ('<VRTDataset rasterXSize="8" rasterYSize="8"><VRTRasterBand dataType="Byte" band="1">'
       "<SimpleSource><SourceFilename>/etc/hostname</SourceFilename><SourceBand>1</SourceBand>"
       "</SimpleSource></VRTRasterBand></VRTDataset>")


@pytest.fixture
def queues(aws: str) -> SimpleNamespace:
    """Requests with a DLQ whose maxReceiveCount (5) SQS never reaches here, requests without a
    DLQ, status through a raw SNS → SQS subscription, and a bucket of images."""
    import boto3

    sqs, sns, s3 = boto3.client("sqs"), boto3.client("sns"), boto3.client("s3")
    tag = uuid.uuid4().hex[:8]

    def queue(name: str, **attributes: str) -> tuple[str, str]:
        url = sqs.create_queue(QueueName=f"{name}-{tag}", Attributes=attributes)["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
        return url, arn["Attributes"]["QueueArn"]

    dlq, dlq_arn = queue("dlq")
    requests, _ = queue("requests", RedrivePolicy=json.dumps(
        {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "5"}))
    plain, _ = queue("plain")
    topic = sns.create_topic(Name=f"status-{tag}")["TopicArn"]
    status, status_arn = queue("status")
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=status_arn,
                  Attributes={"RawMessageDelivery": "true"})
    bucket = f"images-{tag}"
    s3.create_bucket(Bucket=bucket)
    return SimpleNamespace(sqs=sqs, s3=s3, requests=requests, dlq=dlq, plain=plain, topic=topic,
                           status=status, bucket=bucket)


def _run(queues: SimpleNamespace, queue_url: str, client: Any, tmp_path: Path, *,
         sources: tuple[str, ...] = ("s3://*",), **config: Any) -> Any:
    allow = AllowList.from_strings(sources, ["s3://*", str(tmp_path)])
    settings: dict[str, Any] = dict(queue_url=queue_url, status_topic_arn=queues.topic,
                                    exit_when_idle=True, wait_seconds=0, retry_delay=0)
    settings.update(config)
    return QueueWorker(WorkerConfig(**settings), client, allow=allow).run()


def _request(job_id: str, url: str, tmp_path: Path, **extra: Any) -> str:
    return json.dumps({"jobId": job_id, "imageUrls": [url],
                       "outputs": [{"type": "LOCAL", "path": str(tmp_path)}],
                       "imageProcessor": {"name": "null", "type": "BUILTIN"}, **extra})


def _statuses(queues: SimpleNamespace) -> dict[str, list[dict[str, Any]]]:
    """Each job's status messages (body and attributes), in order."""
    found: dict[str, list[dict[str, Any]]] = {}
    for m in drain(queues.sqs, queues.status):
        found.setdefault(m["body"]["jobId"], []).append({**m["body"], **m["attributes"]})
    return found


def test_permanent_failures_get_one_failed_status_and_leave_after_one_receive(
    queues: SimpleNamespace, tmp_path: Path, dask_client: Any
) -> None:
    bucket = queues.bucket
    queues.s3.put_object(Bucket=bucket, Key="in/disguised.tif", Body=VRT.encode())
    queues.s3.put_object(Bucket=bucket, Key="in/disguised.ntf", Body=VRT.encode())
    queues.s3.put_object(Bucket=bucket, Key="in/garbage.tif", Body=b"II*\x00" + bytes(range(256)) * 4)
    small = write_scene(tmp_path / "small.tif", size=128, count=1, tile_size=64, overlap=8)
    queues.s3.upload_file(str(small.path), bucket, "in/small.tif")
    bodies = {
        "vrt-tif": _request("vrt-tif", f"s3://{bucket}/in/disguised.tif", tmp_path),
        "vrt-ntf": _request("vrt-ntf", f"s3://{bucket}/in/disguised.ntf", tmp_path),
        "garbage": _request("garbage", f"s3://{bucket}/in/garbage.tif", tmp_path),
        "missing": _request("missing", f"s3://{bucket}/in/missing.tif", tmp_path),
        "refused": _request("refused", "https://elsewhere.example.org/a.tif", tmp_path),
        "invalid": _request("invalid", f"s3://{bucket}/in/garbage.tif", tmp_path,
                            imageProcessorTileOverlap=4096),
        "roi-miss": _request("roi-miss", f"s3://{bucket}/in/small.tif", tmp_path,
                             regionOfInterest="POLYGON ((100 10, 101 10, 101 11, 100 11, 100 10))"),
    }
    for body in bodies.values():
        queues.sqs.send_message(QueueUrl=queues.requests, MessageBody=body)
    stats = _run(queues, queues.requests, dask_client, tmp_path)

    assert stats.received == len(bodies)  # one receive each: nothing was retried
    assert (stats.failed, stats.poison) == (5, 2)
    assert counts(queues.sqs, queues.requests) == (0, 0)
    expected = {
        "vrt-tif": f"cannot open image s3://{bucket}/in/disguised.tif: ",
        "vrt-ntf": f"cannot open image s3://{bucket}/in/disguised.ntf: ",
        "garbage": f"cannot open image s3://{bucket}/in/garbage.tif: ",
        "missing": f"image not found: s3://{bucket}/in/missing.tif",
        "refused": "refused: imageUrls[0]: https://elsewhere.example.org/a.tif is not on the allow-list",
        "invalid": "imageProcessorTileOverlap",
        "roi-miss": f"regionOfInterest does not intersect image s3://{bucket}/in/small.tif",
    }
    statuses = _statuses(queues)
    dead = {m["body"]["jobId"]: m for m in drain(queues.sqs, queues.dlq)}
    assert set(dead) == set(bodies)
    for job_id, reason in expected.items():
        failed = [s for s in statuses[job_id] if s["status"] == "FAILED"]
        assert len(failed) == 1, statuses[job_id]
        message = failed[0]["message"]
        assert reason in message and "\n" not in message and message != "0 features", message
        assert dead[job_id]["attributes"]["failure_reason"] == message
        assert json.dumps(dead[job_id]["body"]) == json.dumps(json.loads(bodies[job_id]))
    # the VRTs: GDAL's own cause, and the summary carries the same reason per image and job
    assert "not recognized as being in a supported file format" in statuses["vrt-tif"][-1]["message"]
    summary = json.loads((tmp_path / "vrt-ntf.summary.json").read_text())
    assert summary["status"] == "FAILED" and summary["reason"] == statuses["vrt-ntf"][-1]["message"]
    assert summary["images"][0]["reason"] == summary["reason"]


def test_without_a_dlq_a_permanent_failure_is_deleted(queues: SimpleNamespace, tmp_path: Path,
                                                      dask_client: Any) -> None:
    queues.s3.put_object(Bucket=queues.bucket, Key="in/disguised.tif", Body=VRT.encode())
    queues.sqs.send_message(QueueUrl=queues.plain, MessageBody=_request(
        "vrt", f"s3://{queues.bucket}/in/disguised.tif", tmp_path))
    stats = _run(queues, queues.plain, dask_client, tmp_path)
    assert (stats.received, stats.failed) == (1, 1)
    assert counts(queues.sqs, queues.plain) == (0, 0)
    assert [s["status"] for s in _statuses(queues)["vrt"]] == ["STARTED", "FAILED"]


def test_a_transient_failure_runs_max_attempts_times(queues: SimpleNamespace, tmp_path: Path,
                                                     dask_client: Any) -> None:
    """Every tile fails at the model (transient): two runs (max_attempts 2), the first one's
    status an IN_PROGRESS "attempt 1 of 2 failed", then one FAILED; the queue is empty."""
    scene = write_scene(tmp_path / "scene.tif", size=256, count=3, tile_size=128, overlap=16)
    queues.sqs.send_message(QueueUrl=queues.plain, MessageBody=_request(
        "flaky", str(scene.path), tmp_path, imageProcessorTileSize=128, imageProcessorTileOverlap=16,
        imageProcessor={"type": "PYTHON", "name": "tests.test_queue_worker:every_tile_fails"}))
    stats = _run(queues, queues.plain, dask_client, tmp_path, sources=(str(tmp_path),),
                 max_attempts=2)
    assert (stats.received, stats.failed) == (2, 2)
    assert counts(queues.sqs, queues.plain) == (0, 0)
    statuses = _statuses(queues)["flaky"]
    terminal = [(s["status"], s["message"]) for s in statuses if s["status"] in ("FAILED", "SUCCESS")]
    reason = f"{scene.path}: all 9 tiles failed: RuntimeError: endpoint unavailable"  # 3 x 3 tiles
    assert terminal == [("FAILED", reason)]
    assert [s["message"] for s in statuses if s["message"].startswith("attempt")] == [
        f"attempt 1 of 2 failed, retrying: {reason}"]
