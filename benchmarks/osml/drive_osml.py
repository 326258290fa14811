"""OSML Model Runner 2.3.0's container loop for ``--jobs`` image requests, and the AWS
resources it expects.

Two uses, both by ``benchmarks/bench_osml.py``:

- imported into this project's venv: :func:`service_env` and :func:`create_resources` set up a
  moto server as OSML 2.3.0 expects it (read from its ``app_config.ServiceConfig`` and
  ``database`` modules): DynamoDB tables ``JOB_TABLE`` (hash ``image_id``),
  ``REGION_REQUEST_TABLE`` (hash ``image_id``, range ``region_id``), ``FEATURE_TABLE`` (hash
  ``hash_key``, range ``range_key``), ``ENDPOINT_TABLE`` (hash ``endpoint``); SQS queues
  ``IMAGE_QUEUE`` and ``REGION_QUEUE``; SNS topics ``IMAGE_STATUS_TOPIC`` and
  ``REGION_STATUS_TOPIC``; the output bucket :data:`BUCKET`. Both sides of the benchmark get the
  same layout (ours reads ``IMAGE_QUEUE`` and publishes to ``IMAGE_STATUS_TOPIC``).
- run as a script with ``benchmarks/.osmlenv/bin/python`` (it imports nothing from this
  project; the environment comes from :func:`service_env`): ``ModelRunner().run()`` on the main
  thread, as OSML's container does, over the requests already on the image queue; it stops the
  loop once ``--jobs`` jobs have ended (counted in-process, by wrapping the handler's
  ``end_image_request`` and ``fail_image_request``: no polling of the stand-ins) and exits 0 if
  all of them ended. One change from the service defaults: the region queue's long poll is cut
  from 10 s to 1 s, which only shortens idle waits.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from typing import Any

PREFIX = "bench-osml"
#: the output bucket of both sides (``S3`` outputs with the prefix ``out``)
BUCKET = f"{PREFIX}-output"
REGION = "us-east-1"


def service_env(endpoint: str, workers: int) -> dict[str, str]:
    """AWS settings for a moto server at ``endpoint`` and the names OSML's ServiceConfig reads
    at import time (``WORKERS``: its tile threads); the queue URLs and topic ARNs come from
    :func:`create_resources`."""
    return {
        "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION, "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
        "JOB_TABLE": f"{PREFIX}-jobs", "REGION_REQUEST_TABLE": f"{PREFIX}-regions",
        "ENDPOINT_TABLE": f"{PREFIX}-endpoints", "FEATURE_TABLE": f"{PREFIX}-features",
        "WORKERS": str(workers), "WORKERS_PER_CPU": "1",
    }


def aws_client(name: str, env: dict[str, str]) -> Any:
    """A boto3 client of ``name`` against the endpoint of ``env`` (not os.environ)."""
    import boto3

    return boto3.client(name, endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                        aws_session_token=env["AWS_SESSION_TOKEN"])


def create_resources(env: dict[str, str]) -> dict[str, str]:
    """Tables, queues, topics and the output bucket; returns the queue URLs and topic ARNs."""
    ddb = aws_client("dynamodb", env)
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
    sqs, sns = aws_client("sqs", env), aws_client("sns", env)
    aws_client("s3", env).create_bucket(Bucket=BUCKET)
    return {
        "IMAGE_QUEUE": sqs.create_queue(QueueName=f"{PREFIX}-images")["QueueUrl"],
        "REGION_QUEUE": sqs.create_queue(QueueName=f"{PREFIX}-regions")["QueueUrl"],
        "IMAGE_STATUS_TOPIC": sns.create_topic(Name=f"{PREFIX}-image-status")["TopicArn"],
        "REGION_STATUS_TOPIC": sns.create_topic(Name=f"{PREFIX}-region-status")["TopicArn"],
    }


def run_jobs(jobs: int, timeout: float) -> int:
    """Run OSML's loop until ``jobs`` jobs ended (0) or ``timeout`` seconds passed (1)."""
    from aws.osml.model_runner import ModelRunner  # ServiceConfig reads the environment on import

    runner = ModelRunner()
    runner.region_request_queue.wait_seconds = 1
    handler = runner.image_request_handler
    ended: list[str] = []

    def counted(method: Any) -> Any:
        def wrapper(job_item: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return method(job_item, *args, **kwargs)
            finally:
                ended.append(str(job_item.image_id))
                if len(ended) >= jobs:
                    runner.stop()  # the loop ends after this message

        return wrapper

    handler.end_image_request = counted(handler.end_image_request)
    handler.fail_image_request = counted(handler.fail_image_request)
    watchdog = threading.Timer(timeout, runner.stop)
    watchdog.daemon = True
    watchdog.start()
    runner.run()  # OSML's service loop; it needs the main thread (asyncio loop of its metrics)
    watchdog.cancel()
    if len(ended) < jobs:
        print(f"drive_osml: {len(ended)} of {jobs} jobs ended in {timeout:.0f} s", file=sys.stderr)
        return 1
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1, help="jobs to run before the loop stops")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before giving up")
    args = parser.parse_args()
    missing = [n for n in ("JOB_TABLE", "IMAGE_QUEUE", "AWS_ENDPOINT_URL") if n not in os.environ]
    if missing:
        raise SystemExit(f"drive_osml: set {', '.join(missing)} (bench_osml.py does)")
    sys.exit(run_jobs(args.jobs, args.timeout))


if __name__ == "__main__":
    main()
