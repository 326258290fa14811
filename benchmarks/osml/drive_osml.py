"""Drive OSML Model Runner 2.3.0's own service loop for one image, inside OSML's venv.

Run by ``benchmarks/bench_osml.py`` with ``benchmarks/.osmlenv/bin/python``; it imports nothing
from this project. Against an AWS stand-in (a moto server at ``--endpoint``) it creates the
resources OSML 2.3.0 expects (read from its ``app_config.ServiceConfig`` and ``database``
modules): DynamoDB tables ``JOB_TABLE`` (hash ``image_id``), ``REGION_REQUEST_TABLE`` (hash
``image_id``, range ``region_id``), ``FEATURE_TABLE`` (hash ``hash_key``, range ``range_key``),
``ENDPOINT_TABLE`` (hash ``endpoint``); SQS queues ``IMAGE_QUEUE`` and ``REGION_QUEUE``; SNS topics
``IMAGE_STATUS_TOPIC`` and ``REGION_STATUS_TOPIC``; an S3 bucket for the ``S3`` output sink.
It then runs ``ModelRunner().run()`` on the main thread, as OSML's container does, while a
controller thread puts one ImageRequest per run on the image queue, waits until the job row has
an ``end_time`` and finally stops the loop.

The job wall time is OSML's own: ``end_time - start_time`` of its job row (milliseconds; it
spans loading the image, all regions and tiles, aggregation, NMS and the S3 write). CPU seconds
are this process's (all OSML threads) and, by ``/proc``, those of the ``--watch`` processes
(the moto server, the model server) over the same job. One change from the service defaults:
the region queue's long poll is cut from 10 s to 1 s, which only shortens idle waits between
jobs (the job clock starts when OSML picks the request up). Results go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Any

PREFIX = "bench-osml"


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def configure(endpoint: str, workers: int) -> dict[str, str]:
    """Environment for OSML's ServiceConfig (read at import time) and boto3."""
    region = "us-east-1"
    env = {
        "AWS_DEFAULT_REGION": region, "AWS_REGION": region, "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
        "JOB_TABLE": f"{PREFIX}-jobs", "REGION_REQUEST_TABLE": f"{PREFIX}-regions",
        "ENDPOINT_TABLE": f"{PREFIX}-endpoints", "FEATURE_TABLE": f"{PREFIX}-features",
        "WORKERS": str(workers), "WORKERS_PER_CPU": "1",
    }
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        os.environ.pop(name, None)
    os.environ.update(env)
    return env


def create_resources(env: dict[str, str]) -> dict[str, str]:
    """Tables, queues, topics and the output bucket; returns the queue URLs and topic ARNs."""
    import boto3

    ddb = boto3.client("dynamodb")
    schemas = {
        env["JOB_TABLE"]: [("image_id", "HASH")],
        env["REGION_REQUEST_TABLE"]: [("image_id", "HASH"), ("region_id", "RANGE")],
        env["FEATURE_TABLE"]: [("hash_key", "HASH"), ("range_key", "RANGE")],
        env["ENDPOINT_TABLE"]: [("endpoint", "HASH")],
    }
    for table, keys in schemas.items():
        ddb.create_table(TableName=table, BillingMode="PAY_PER_REQUEST",
                         KeySchema=[{"AttributeName": k, "KeyType": t} for k, t in keys],
                         AttributeDefinitions=[{"AttributeName": k, "AttributeType": "S"} for k, _ in keys])
    sqs = boto3.client("sqs")
    sns = boto3.client("sns")
    boto3.client("s3").create_bucket(Bucket=f"{PREFIX}-output")
    return {
        "IMAGE_QUEUE": sqs.create_queue(QueueName=f"{PREFIX}-images")["QueueUrl"],
        "REGION_QUEUE": sqs.create_queue(QueueName=f"{PREFIX}-regions")["QueueUrl"],
        "IMAGE_STATUS_TOPIC": sns.create_topic(Name=f"{PREFIX}-image-status")["TopicArn"],
        "REGION_STATUS_TOPIC": sns.create_topic(Name=f"{PREFIX}-region-status")["TopicArn"],
    }


def run_jobs(args: argparse.Namespace) -> dict[str, Any]:
    env = configure(args.endpoint, args.workers)
    os.environ.update(create_resources(env))

    from aws.osml.model_runner import ModelRunner  # after the environment: ServiceConfig reads it on import

    runner = ModelRunner()
    runner.region_request_queue.wait_seconds = 1
    outcome: dict[str, Any] = {"runs": [], "workers": args.workers}

    def control() -> None:
        try:
            for k in range(args.runs + 1):  # run 0 warms imports, connections and GDAL: not counted
                result = one_job(args, env, f"osml-side-{k}", runner)
                print(f"osml run {k}: {json.dumps(result)}", file=sys.stderr, flush=True)
                if k:
                    outcome["runs"].append(result)
        except Exception as exc:  # noqa: BLE001 - reported to the caller in one line
            outcome["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            runner.stop()

    controller = threading.Thread(target=control, name="bench-controller", daemon=True)
    controller.start()
    runner.run()  # OSML's service loop; it needs the main thread (asyncio loop of its metrics)
    controller.join(timeout=5)
    if controller.is_alive():
        outcome["error"] = "OSML's service loop stopped before the jobs finished (see its log)"
    return outcome


def one_job(args: argparse.Namespace, env: dict[str, str], job_id: str, runner: Any) -> dict[str, Any]:
    """Submit one ImageRequest, wait for OSML's job row to end; its times, CPU, tiles and features."""
    import boto3
    from botocore.exceptions import ClientError

    sqs = boto3.client("sqs")
    jobs = boto3.resource("dynamodb").Table(env["JOB_TABLE"])
    regions = boto3.resource("dynamodb").Table(env["REGION_REQUEST_TABLE"])
    s3 = boto3.client("s3")
    request = {
        "jobId": job_id, "imageUrls": [args.image],
        "outputs": [{"type": "S3", "bucket": f"{PREFIX}-output", "prefix": "out"}],
        "imageProcessor": {"name": args.model_url, "type": "HTTP_ENDPOINT"},
        "imageProcessorTileSize": args.tile_size, "imageProcessorTileOverlap": args.overlap,
        "imageProcessorTileFormat": args.tile_format, "imageProcessorTileCompression": "NONE",
    }
    image_id = f"{job_id}:{args.image}"
    watched0 = [proc_cpu(pid) for pid in args.watch]
    times0 = os.times()
    sent = time.perf_counter()
    sqs.send_message(QueueUrl=os.environ["IMAGE_QUEUE"], MessageBody=json.dumps(request))
    item: dict[str, Any] = {}
    while not item.get("end_time"):
        if not runner.running:
            raise RuntimeError(f"OSML's service loop stopped during job {job_id}")
        if time.perf_counter() - sent > args.timeout:
            raise TimeoutError(f"OSML job {job_id} did not finish in {args.timeout:.0f} s")
        time.sleep(0.1)
        item = jobs.get_item(Key={"image_id": image_id}).get("Item", {})
    observed = time.perf_counter() - sent
    times1 = os.times()
    watched = [proc_cpu(pid) - c for pid, c in zip(args.watch, watched0, strict=True)]
    rows = regions.query(KeyConditionExpression="image_id = :i",
                         ExpressionAttributeValues={":i": image_id})["Items"]
    try:
        body = s3.get_object(Bucket=f"{PREFIX}-output", Key=f"out/{job_id}.geojson")["Body"].read()
    except ClientError:
        raise RuntimeError(f"OSML job {job_id} ended without output (regions ok "
                           f"{item.get('region_success')}, failed {item.get('region_error')})") from None
    return {
        "job": job_id, "wall": (int(item["end_time"]) - int(item["start_time"])) / 1000.0,
        "observed": observed,
        "cpu": (times1.user - times0.user) + (times1.system - times0.system),
        "watched_cpu": watched,
        "regions": int(item.get("region_count") or 0),
        "region_success": int(item.get("region_success") or 0),
        "tiles": sum(int(r.get("total_tiles") or 0) for r in rows),
        "failed_tiles": sum(int(r.get("failed_tile_count") or 0) for r in rows),
        "features": len(json.loads(body)["features"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True, help="the moto server, http://127.0.0.1:PORT")
    parser.add_argument("--image", required=True, help="local path of the image")
    parser.add_argument("--model-url", required=True, help="HTTP_ENDPOINT URL of the model")
    parser.add_argument("--out", required=True, help="where to write the JSON results")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=4, help="OSML's WORKERS (tile worker threads)")
    parser.add_argument("--tile-size", default="1024")
    parser.add_argument("--overlap", default="50")
    parser.add_argument("--tile-format", default="GTIFF")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for one job")
    parser.add_argument("--watch", type=int, nargs="*", default=[], help="pids whose CPU time to report")
    args = parser.parse_args()
    out = run_jobs(args)
    with open(args.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
