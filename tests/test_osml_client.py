"""OSML's own integration-test client, unchanged, against ``model-runner worker``.

``osml-model-runner-test`` 2.1.0 (with the boto3 1.28 it pins) runs in its own venv
(``.osmlclientenv``, ``make osml-client``) as a subprocess. Around it, everything OSML's test
environment has, on 127.0.0.1: a moto server process with the queues ``ImageRequestQueue`` and
``ImageStatusQueue`` (subscribed to the SNS topic ``ImageStatusTopic`` the worker publishes to;
one per request, named by OSML's ``SQS_IMAGE_STATUS_QUEUE``),
the results bucket ``mr-bucket-sink-<ACCOUNT>``, the stream ``mr-stream-sink-<ACCOUNT>`` and
the image bucket; ``model-runner serve-model --model centerpoint`` as the SageMaker endpoint
``centerpoint`` (``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME``) and as the HTTP model
(``HTTP_CENTER_POINT_MODEL_URL``); one ``model-runner worker`` process for every request.

The client's functions run as OSML's ``test_sm_centerpoint_model`` and
``test_http_centerpoint_model`` call them: ``run_model_on_image`` (queues OSML's standard
request: S3 + Kinesis outputs, tiles 512 overlap 128, GTIFF/NONE, NMS 0.75; waits for
``SUCCESS`` with ``float(processing_duration) > 0``) and ``validate_features_match`` against
OSML's published expected results (``tests/data/osml``), whose two halves,
``validate_s3_features_match`` and ``validate_kinesis_features_match``, are also run on their own
so that a failure names its sink. OSML's DynamoDB checks (``count_features``,
``count_region_request_items``) are skipped with their reason: the worker keeps no DynamoDB
tables.

OSML's ``small.tif`` is not published: :func:`write_small_tif` makes one with its grid (3376 ×
2576 px, EPSG:4326, the geotransform solved from the expected features); centerpoint reads only
a tile's size, so the pixels do not matter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from tests.conftest import ROOT

ACCOUNT, REGION = "123456789012", "us-east-1"  # moto's account
EXPECTED = ROOT / "tests" / "data" / "osml" / "centerpoint.small.tif.geojson"
CLIENT_PYTHON = ROOT / ".osmlclientenv" / "bin" / "python"
WIDTH, HEIGHT = 3376, 2576  # OSML's small.tif
IMAGE_BUCKET = f"osml-test-images-{ACCOUNT}"
RESULTS_BUCKET, STREAM = f"mr-bucket-sink-{ACCOUNT}", f"mr-stream-sink-{ACCOUNT}"

#: What runs in the client venv: OSML's functions, called as OSML's centerpoint tests call them,
#: then one JSON line of what each check answered. argv: endpoint, endpoint type, result file.
DRIVER = r"""
import json, logging, sys

import geojson
from aws.osml.utils import kinesis_client, run_model_on_image, s3_client, sqs_client
from aws.osml.utils.integ_utils import (
    validate_features_match, validate_kinesis_features_match, validate_s3_features_match)

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
endpoint, endpoint_type, result_file = sys.argv[1:4]
report = {}
try:
    image_id, job_id, request, shard_iter = run_model_on_image(
        sqs_client(), endpoint, endpoint_type, kinesis_client())
    report["run_model_on_image"] = True
    for output in request["outputs"]:
        with open(result_file) as f:
            expected = geojson.load(f)["features"]
        if output["type"] == "S3":
            report["validate_s3_features_match"] = validate_s3_features_match(
                output["bucket"], output["prefix"], expected, s3_client())
        else:
            report["validate_kinesis_features_match"] = validate_kinesis_features_match(
                job_id, output["stream"], shard_iter, expected, kinesis_client())
    if report["validate_s3_features_match"] and report["validate_kinesis_features_match"]:
        validate_features_match(request, job_id, shard_iter, s3_client(), kinesis_client(),
                                result_file)
        report["validate_features_match"] = True
except BaseException as exc:
    report["error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(report))
"""

#: OSML's checks that read its own DynamoDB tables, which the worker does not keep
SKIPPED = {
    "count_features": "reads OSML's ImageProcessingFeatures DynamoDB table; the worker keeps no "
                      "feature table (its features are in the S3 and Kinesis outputs, checked above)",
    "count_region_request_items": "reads OSML's RegionProcessingJobStatus DynamoDB table; the worker "
                                  "keeps no region table (a job's tiles and chunks are in its summary)",
}


def geotransform(features: list[dict[str, Any]]) -> tuple[tuple[float, ...], float]:
    """GDAL's geotransform ``(c, a, b, f, d, e)`` of the image OSML's features come from, solved
    by least squares from each feature's pixel centre (the middle of its ``imageGeometry``'s
    bounds) and its ``center_longitude``/``center_latitude``; and the largest residual (deg)."""
    pixels, world = [], []
    for feature in features:
        ring = np.asarray(feature["properties"]["imageGeometry"]["coordinates"][0], dtype=float)
        pixels.append((ring.min(axis=0) + ring.max(axis=0)) / 2)
        world.append([feature["properties"]["center_longitude"], feature["properties"]["center_latitude"]])
    design = np.column_stack([np.asarray(pixels), np.ones(len(pixels))])
    solution = np.linalg.lstsq(design, np.asarray(world), rcond=None)[0]
    residual = float(np.abs(design @ solution - np.asarray(world)).max())
    (a, d), (b, e), (c, f) = solution.tolist()
    return (c, a, b, f, d, e), residual


def write_small_tif(path: Path) -> Path:
    """An image with OSML ``small.tif``'s grid: size, CRS and geotransform (zeros, compressed)."""
    import rasterio
    from affine import Affine

    features = json.loads(EXPECTED.read_text())["features"]
    gt, _ = geotransform(features)
    profile = {"driver": "GTiff", "width": WIDTH, "height": HEIGHT, "count": 3, "dtype": "uint8",
               "crs": "EPSG:4326", "transform": Affine.from_gdal(*gt), "tiled": True,
               "blockxsize": 512, "blockysize": 512, "compress": "deflate"}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.zeros((3, HEIGHT, WIDTH), dtype=np.uint8))
    return path


def test_small_tif_geotransform_fits_osml_results_exactly(tmp_path) -> None:
    import rasterio

    features = json.loads(EXPECTED.read_text())["features"]
    gt, residual = geotransform(features)
    assert len(features) == 63 and residual < 1e-10  # an affine grid: the fit is exact
    assert gt[1] == pytest.approx(-gt[5], rel=1e-9) and abs(gt[2]) < 1e-12 and abs(gt[4]) < 1e-12
    # every imageGeometry vertex lands on its geometry vertex (rounded by OSML to 6 decimals)
    with rasterio.open(write_small_tif(tmp_path / "small.tif")) as src:
        assert (src.width, src.height, src.crs.to_epsg()) == (WIDTH, HEIGHT, 4326)
        for feature in features:
            ring = np.asarray(feature["properties"]["imageGeometry"]["coordinates"][0])
            lonlat = np.column_stack(src.transform * (ring[:, 0], ring[:, 1]))
            want = np.asarray(feature["geometry"]["coordinates"][0])[:, :2]
            assert np.abs(lonlat - want).max() <= 5.01e-7


def test_status_attributes_of_a_sub_second_job_pass_osml_client_check() -> None:
    from pipeline.notify import status_attributes

    # OSML's monitor_job_status asserts float(processing_duration) > 0 on SUCCESS
    attributes = status_attributes("SUCCESS", "j1", "s3://b/small.tif", 0.25)
    assert attributes == {"status": "SUCCESS", "image_status": "SUCCESS", "job_id": "j1",
                          "image_id": "j1:s3://b/small.tif", "processing_duration": "0.250"}
    assert float(status_attributes("SUCCESS", "j1", "s3://b/x", 1e-6)["processing_duration"]) > 0
    # a poison message: no job ran, no duration (as OSML leaves unset attributes out)
    assert status_attributes("FAILED", "", "", 0.0) == {"status": "FAILED", "image_status": "FAILED"}


def _aws_env(endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "MODEL_RUNNER_ALLOWED_"))}
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",  # noqa: S106 - moto
               AWS_SESSION_TOKEN="testing", AWS_DEFAULT_REGION=REGION, AWS_REGION=REGION,  # noqa: S106
               AWS_ENDPOINT_URL=endpoint)
    return env


def _wait_for(process: subprocess.Popen[str], marker: str, timeout: float) -> str:
    """The first stdout line of ``process`` containing ``marker``."""
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if marker in line:
            return line
        if not line and process.poll() is not None:
            break
    raise RuntimeError(f"no {marker!r} from {process.args!r}")


@pytest.fixture(scope="module")
def osml(moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """OSML's test environment around one worker process (see the module docstring)."""
    import boto3

    if not CLIENT_PYTHON.exists():
        pytest.skip("needs OSML's client venv .osmlclientenv (make osml-client)")
    env = _aws_env(moto_endpoint)
    session = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing",  # noqa: S106
                                    region_name=REGION)
    sqs, sns, s3, kinesis = (session.client(name, endpoint_url=moto_endpoint)
                             for name in ("sqs", "sns", "s3", "kinesis"))
    requests_url = sqs.create_queue(QueueName="ImageRequestQueue")["QueueUrl"]
    topic = sns.create_topic(Name="ImageStatusTopic")["TopicArn"]
    for bucket in (IMAGE_BUCKET, RESULTS_BUCKET):
        s3.create_bucket(Bucket=bucket)
    kinesis.create_stream(StreamName=STREAM, ShardCount=1)
    image = write_small_tif(tmp_path_factory.mktemp("osml") / "small.tif")
    s3.upload_file(str(image), IMAGE_BUCKET, "small.tif")

    model = subprocess.Popen(  # noqa: S603 - fixed argv
        [sys.executable, "-m", "pipeline", "-q", "serve-model", "--model", "centerpoint", "--port", "0"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    logs = tmp_path_factory.mktemp("worker") / "worker.log"
    worker = None
    try:
        model_url = _wait_for(model, " on ", 60).split(" on ")[1].split()[0]
        worker_env = {**env, "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME": model_url,
                      "AWS_ENDPOINT_URL_SAGEMAKER": model_url,  # DescribeEndpoint and ListTags
                      "MODEL_RUNNER_ALLOWED_SOURCES": f"s3://{IMAGE_BUCKET}",
                      "MODEL_RUNNER_ALLOWED_OUTPUTS": f"s3://{RESULTS_BUCKET} kinesis://{STREAM}"}
        with logs.open("w") as log:
            worker = subprocess.Popen(  # noqa: S603 - fixed argv
                [sys.executable, "-m", "pipeline", "worker", "--queue-url", requests_url,
                 "--status-topic-arn", topic, "--workers", "1", "--wait-seconds", "1"],
                cwd=ROOT, env=worker_env, stdout=log, stderr=subprocess.STDOUT, text=True)
        client_env = {**env, "ACCOUNT": ACCOUNT, "REGION": REGION, "TARGET_MODEL": "centerpoint",
                      "TARGET_IMAGE": f"s3://{IMAGE_BUCKET}/small.tif", "TEST_TIMEOUT_MINUTES": "2",
                      "HTTP_CENTER_POINT_MODEL_URL": f"{model_url}/invocations"}
        yield SimpleNamespace(env=client_env, sqs=sqs, sns=sns, topic=topic, logs=logs,
                              worker=worker, model_url=model_url)
    finally:
        for process in (worker, model):
            if process is not None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()


def run_osml_client(osml: SimpleNamespace, endpoint: str, endpoint_type: str) -> tuple[dict[str, Any], str]:
    """OSML's client for one request: what each check answered, and the client's log."""
    assert osml.worker.poll() is None, f"the worker exited: {osml.logs.read_text()[-2000:]}"
    # OSML's monitor reads one status message per 5 s poll and never deletes any: each request
    # gets an empty status queue subscribed to the topic, as a fresh OSML test environment has
    name = f"ImageStatusQueue-{endpoint_type}"
    url = osml.sqs.create_queue(QueueName=name)["QueueUrl"]
    arn = osml.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    osml.sns.subscribe(TopicArn=osml.topic, Protocol="sqs", Endpoint=arn)  # SNS envelopes, as OSML's
    process = subprocess.run(  # noqa: S603 - fixed argv
        [str(CLIENT_PYTHON), "-c", DRIVER, endpoint, endpoint_type, str(EXPECTED)],
        cwd=ROOT, env={**osml.env, "SQS_IMAGE_STATUS_QUEUE": name}, capture_output=True, text=True,
        timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    (osml.logs.parent / f"client-{endpoint_type}.log").write_text(process.stderr)  # kept for a look
    report = json.loads(process.stdout.strip().splitlines()[-1])
    return report, process.stderr


def check(osml: SimpleNamespace, report: dict[str, Any], log: str) -> None:
    lines = log.splitlines()
    failed = sorted({line.split("Failed feature equality checks: ", 1)[1]
                     for line in lines if "Failed feature equality checks: " in line})
    # the client logs the first pair that differs: expected, "does not match actual", actual
    pair = next((lines[i - 1:i + 2] for i, line in enumerate(lines)
                 if line.endswith("does not match actual")), [])
    worker_log = osml.logs.read_text()[-2000:] if "run_model_on_image" not in report else ""
    assert report == {"run_model_on_image": True, "validate_s3_features_match": True,
                      "validate_kinesis_features_match": True, "validate_features_match": True}, (
        f"OSML's checks: {report}; failed feature checks: {failed}; first pair: {pair}; "
        f"logs in {osml.logs.parent}; worker: {worker_log}")
    assert "SUCCESS message found!" in log and "2 output sinks validated, tests succeeded!" in log


def test_osml_sm_centerpoint_client(osml: SimpleNamespace) -> None:
    check(osml, *run_osml_client(osml, "centerpoint", "SM_ENDPOINT"))


def test_osml_http_centerpoint_client(osml: SimpleNamespace) -> None:
    check(osml, *run_osml_client(osml, osml.env["HTTP_CENTER_POINT_MODEL_URL"], "HTTP_ENDPOINT"))


@pytest.mark.parametrize("name", sorted(SKIPPED))
def test_osml_dynamodb_checks(name: str) -> None:
    pytest.skip(f"OSML's {name}: {SKIPPED[name]}")
