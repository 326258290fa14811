"""No secret is ever written: jobs on presigned and credentialed image URLs, run by the CLI and
by the queue worker (real processes, a real moto server), and every output searched for the
literal secrets: files, S3 objects, SNS messages (through an SQS subscription), Kinesis records,
dead-letter reasons and the logs.

The secrets: a presigned URL's key id, signature and security token (a local HTTP server that
serves the image and accepts any query, and moto's own presigned URLs from boto3), a URL's
password and ``access_token``, the process's ``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
and the SigV4 headers a model endpoint echoes in its error bodies.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import geopandas as gpd
import pytest

from pipeline.demo import write_scene
from tests.test_queue_worker import drain, kinesis_records

ROOT = Path(__file__).resolve().parents[1]

KEY_ID = "AKIAQSECRETKEYID7788"  # an access key id's form: AKIA + 16
SIGNATURE = "5ec12e7516a7u2e0f0c0ffee0ddba11"
TOKEN = "FwoGZXIvYXdzSecretSessionToken0123456789"
PASSWORD = "hunter2-url-password"
ACCESS_TOKEN = "pk.secret-access-token-3141592"
ENV_SECRET = "wJalrXUtnFEMIsecretAccessKeyFromEnv99"
ENV_TOKEN = "IQoJb3JpZ2luSessionTokenFromEnvironment42"


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return write_scene(tmp_path_factory.mktemp("secrets") / "scene.tif", size=512, count=12,
                       tile_size=128, overlap=16, seed=5)


@pytest.fixture
def image_server(scene: Any) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """Serves the scene (ranged GETs) at any path ending in ``scene.tif``, whatever the query;
    yields its base URL and every request (path with query, headers)."""
    data = Path(scene.path).read_bytes()
    seen: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            seen.append({"path": self.path, **dict(self.headers)})
            if not urlsplit(self.path).path.endswith("/scene.tif"):
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            first, last = 0, len(data) - 1
            if self.headers.get("Range"):
                low, high = self.headers["Range"].split("=")[1].split("-")
                first, last = int(low), min(int(high or last), len(data) - 1)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(last - first + 1))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(data[first : last + 1])

        do_HEAD = do_GET

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def echo_endpoint() -> Iterator[tuple[str, list[str]]]:
    """A SageMaker (runtime) endpoint that answers every request with an error whose message
    echoes the request's headers (SigV4 ``Authorization``, ``X-Amz-Security-Token``) on one
    line; yields its URL and the ``Authorization`` headers it received."""
    authorizations: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            authorizations.append(self.headers.get("Authorization", ""))
            echo = "echo " + ", ".join(f"{k}={v}" for k, v in self.headers.items())
            describe = "DescribeEndpoint" in self.headers.get("X-Amz-Target", "")
            body = json.dumps({"__type": "ValidationException" if describe else "ModelError",
                               "message": echo, "Message": echo}).encode()
            self.send_response(400 if describe else 500)
            self.send_header("Content-Type", "application/json")
            self.send_header("x-amzn-ErrorType", "ValidationException" if describe else "ModelError")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", authorizations
    finally:
        server.shutdown()
        server.server_close()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _leaks(secrets: list[str], places: dict[str, bytes | str]) -> list[tuple[str, str]]:
    """``(secret, where)`` for every secret found, as text or bytes, in any place."""
    found = []
    for where, content in places.items():
        data = content if isinstance(content, bytes) else content.encode()
        found += [(secret, where) for secret in secrets if secret.encode() in data]
    return found


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODEL_RUNNER_")}
    env.update(PYTHONPATH=str(ROOT), **extra)
    return env


def test_cli_writes_no_secret_of_presigned_and_credentialed_urls(
    scene: Any, image_server: tuple[str, list[dict[str, str]]], tmp_path: Path
) -> None:
    base, seen = image_server
    host = base.removeprefix("http://")
    presigned = (f"{base}/a/scene.tif?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={KEY_ID}"
                 "%2F20250101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20250101T000000Z"
                 f"&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token={TOKEN}"
                 f"&X-Amz-Signature={SIGNATURE}")
    credentialed = f"http://alice:{PASSWORD}@{host}/b/scene.tif?access_token={ACCESS_TOKEN}&v=1"
    out = tmp_path / "out"
    request = tmp_path / "request.json"
    request.write_text(json.dumps({
        "jobId": "presigned", "imageUrls": [presigned, credentialed],
        "outputs": [{"type": "LOCAL", "path": str(out)}],
        "imageProcessor": {"name": "bright-objects", "type": "BUILTIN"},
        "imageProcessorTileSize": 128, "imageProcessorTileOverlap": 16,
    }))
    env = _env(AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=ENV_SECRET, AWS_SESSION_TOKEN=ENV_TOKEN)
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(request), "--workers", "1", "--no-progress",
         "--quicklook", str(out / "quicklook.png")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr

    # the original URLs were read, secrets and all
    assert any(SIGNATURE in r["path"] for r in seen)
    basic = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    assert any(r.get("Authorization") == f"Basic {basic}" for r in seen)
    # ... and written in their public form only
    public = {
        f"{base}/a/scene.tif?X-Amz-Algorithm=***&X-Amz-Credential=***&X-Amz-Date=***"
        "&X-Amz-Expires=***&X-Amz-SignedHeaders=***&X-Amz-Security-Token=***&X-Amz-Signature=***",
        f"http://***@{host}/b/scene.tif?access_token=***&v=1",
    }
    features = gpd.read_parquet(out / "presigned.parquet")
    assert len(features) == 2 * len(scene.truth)
    assert set(features["image_url"]) == public
    assert set(gpd.read_file(out / "presigned.geojson")["image_url"]) == public
    summary = json.loads((out / "presigned.summary.json").read_text())
    assert {image["url"] for image in summary["images"]} == public
    assert (out / "quicklook.png").stat().st_size > 0 and (out / "presigned.summary.png").exists()

    secrets = [KEY_ID, SIGNATURE, TOKEN, PASSWORD, ACCESS_TOKEN, basic, ENV_SECRET, ENV_TOKEN]
    places: dict[str, bytes | str] = {"stdout": done.stdout, "stderr": done.stderr, **_files(out)}
    assert len(places) >= 7  # stdout, stderr, geojson, parquet, summary, chart, quick look
    assert _leaks(secrets, places) == []


@pytest.fixture
def aws_secrets(aws: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The moto settings with credentials worth hiding (moto accepts any)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", ENV_TOKEN)
    return aws


def test_worker_writes_no_secret_of_moto_presigned_urls(
    scene: Any, aws_secrets: str, echo_endpoint: tuple[str, list[str]]
) -> None:
    """``model-runner worker`` (a subprocess) runs three requests on moto presigned URLs: one
    that succeeds (S3 and Kinesis outputs), one whose SageMaker endpoint echoes the signed
    request headers in its errors, one whose object is missing."""
    import boto3

    endpoint, authorizations = echo_endpoint
    aws = boto3.session.Session()  # the default session may hold earlier tests' credentials
    sqs, sns, s3 = aws.client("sqs"), aws.client("sns"), aws.client("s3")
    tag = uuid.uuid4().hex[:8]
    bucket, stream = f"secrets-{tag}", f"features-{tag}"
    s3.create_bucket(Bucket=bucket)
    s3.upload_file(str(scene.path), bucket, "in/scene.tif")
    aws.client("kinesis").create_stream(StreamName=stream, ShardCount=1)

    def queue(name: str, **attributes: str) -> tuple[str, str]:
        url = sqs.create_queue(QueueName=f"{name}-{tag}", Attributes=attributes)["QueueUrl"]
        return url, sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])[
            "Attributes"]["QueueArn"]

    dlq, dlq_arn = queue("dlq")
    requests, _ = queue("requests", RedrivePolicy=json.dumps(
        {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "3"}))
    status, status_arn = queue("status")
    topic = sns.create_topic(Name=f"status-{tag}")["TopicArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=status_arn,
                  Attributes={"RawMessageDelivery": "true"})

    from botocore.config import Config

    signer = aws.client("s3", config=Config(signature_version="s3v4"))

    def presign(key: str) -> str:
        return str(signer.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                 ExpiresIn=900))

    image, missing = presign("in/scene.tif"), presign("in/missing.tif")
    query = parse_qs(urlsplit(image).query)
    assert query["X-Amz-Credential"][0].startswith(KEY_ID) and query["X-Amz-Security-Token"] == [ENV_TOKEN]
    signatures = [query["X-Amz-Signature"][0], parse_qs(urlsplit(missing).query)["X-Amz-Signature"][0]]
    common = {"imageProcessorTileSize": 128, "imageProcessorTileOverlap": 16,
              "outputs": [{"type": "S3", "bucket": bucket, "prefix": "out"},
                          {"type": "Kinesis", "stream": stream}]}
    messages = {
        "ok": {"imageUrls": [image], "imageProcessor": {"name": "bright-objects", "type": "BUILTIN"}},
        "echo": {"imageUrls": [image], "imageProcessor": {"name": "detector", "type": "SM_ENDPOINT"},
                 "imageProcessorParameters": {"maxRetries": 1, "retryBaseDelay": 0.01,
                                              "retryMaxDelay": 0.02}},
        "gone": {"imageUrls": [missing], "imageProcessor": {"name": "null", "type": "BUILTIN"}},
    }
    for job_id, fields in messages.items():
        sqs.send_message(QueueUrl=requests, MessageBody=json.dumps({"jobId": job_id, **common, **fields}))
    env = _env(MODEL_RUNNER_ALLOWED_SOURCES=aws_secrets, MODEL_RUNNER_ALLOWED_OUTPUTS="s3://* kinesis://*",
               AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME=endpoint, AWS_ENDPOINT_URL_SAGEMAKER=endpoint)
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "worker", "--queue-url", requests, "--status-topic-arn",
         topic, "--workers", "1", "--wait-seconds", "0", "--exit-when-idle", "--max-attempts", "1",
         "--progress-seconds", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "3 messages: 1 succeeded, 0 partial, 2 failed" in done.stdout

    # what was written, and that it is what it should be
    statuses = drain(sqs, status)
    final = {m["body"]["jobId"]: m for m in statuses if m["attributes"]["status"] in ("SUCCESS", "FAILED")}
    public = re.sub(r"(X-Amz-[A-Za-z-]+)=[^&]*", r"\1=***", image)
    assert final["ok"]["attributes"]["status"] == "SUCCESS"
    assert final["ok"]["attributes"]["image_id"] == f"ok:{public}"
    assert final["ok"]["body"]["imageUrl"] == public
    assert final["gone"]["attributes"]["status"] == "FAILED"
    assert "image not found" in final["gone"]["body"]["message"]
    assert final["echo"]["attributes"]["status"] == "FAILED"
    assert "tiles failed" in final["echo"]["body"]["message"] and "echo" in final["echo"]["body"]["message"]
    assert len(authorizations) >= 2 and all("Signature=" in a for a in authorizations)
    objects = {o["Key"]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
               for o in s3.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]}
    collection = json.loads(objects["out/ok.geojson"])
    assert len(collection["features"]) == len(scene.truth)
    assert set(gpd.read_parquet(io.BytesIO(objects["out/ok.parquet"]))["image_url"]) == {public}
    assert "echo" in json.dumps(json.loads(objects["out/echo.summary.json"])["images"][0]["failedTiles"])
    records = [r["Data"] for r in kinesis_records(stream)]
    assert sum(len(json.loads(r)["features"]) for r in records) == len(scene.truth)
    dead = drain(sqs, dlq)
    assert sorted(m["body"]["jobId"] for m in dead) == ["echo", "gone"]

    # ... and that no secret is in any of it
    sigv4 = [m.group(1) for a in authorizations for m in [re.search(r"Signature=([0-9a-f]+)", a)] if m]
    secrets = [KEY_ID, ENV_SECRET, ENV_TOKEN, *signatures, *sigv4]
    places: dict[str, bytes | str] = {
        "worker stdout": done.stdout, "worker stderr": done.stderr,
        **{f"s3://{bucket}/{key}": body for key, body in objects.items()},
        **{f"kinesis record {i}": data for i, data in enumerate(records)},
        **{f"status {i}": json.dumps(m) for i, m in enumerate(statuses)},
        # the dead-lettered body is the request itself, kept as sent for a redrive
        **{f"dead letter {i}": json.dumps(m["attributes"]) for i, m in enumerate(dead)},
    }
    assert _leaks(secrets, places) == []


# ---------------------------------------------------------------- the one written form of a URL
@pytest.mark.parametrize(
    ("url", "public"),
    [
        ("s3://bucket/a@b/scene.tif", "s3://bucket/a@b/scene.tif"),
        ("/data/scene.tif", "/data/scene.tif"),
        ("https://h/a.tif?X-Amz-Credential=AKIAQSECRETKEYID7788%2F2025&X-Amz-Signature=ab12&v=2#f",
         "https://h/a.tif?X-Amz-Credential=***&X-Amz-Signature=***&v=2#f"),
        ("https://storage.googleapis.com/b/a.tif?X-Goog-Algorithm=GOOG4&X-Goog-Signature=77&alt=media",
         "https://storage.googleapis.com/b/a.tif?X-Goog-Algorithm=***&X-Goog-Signature=***&alt=media"),
        ("https://acct.blob.core.windows.net/c/a.tif?sv=2022-11-02&sp=r&se=2030-01-01&sig=abc%3D&x=1",
         "https://acct.blob.core.windows.net/c/a.tif?sv=***&sp=***&se=***&sig=***&x=1"),
        ("https://h/a.tif?sp=1&st=2", "https://h/a.tif?sp=1&st=2"),  # no SAS without its sig
        ("https://alice:pw@h:8/a.tif?token=t&key=k&password=p&Policy=x&Key-Pair-Id=y",
         "https://***@h:8/a.tif?token=***&key=***&password=***&Policy=***&Key-Pair-Id=***"),
        ("https://ghp_tokenAsUser@h/a.tif", "https://***@h/a.tif"),
        ("NITF_IM:1:https://u:p@h/a.ntf?Signature=s", "NITF_IM:1:https://***@h/a.ntf?Signature=***"),
    ],
)
def test_public_url(url: str, public: str) -> None:
    from pipeline.redact import public_url, redact

    assert public_url(url) == public
    assert public_url(public) == public
    assert redact(f"cannot open image {url}: HTTP 403") == f"cannot open image {public}: HTTP 403"


@pytest.mark.parametrize("keyword", ["passwd", "password", "token", "secret", "api_key", "signature",
                                     "credentials", "authorization"])
@pytest.mark.parametrize("url", ["s3://bucket/in/a.tif", "/data/in/a.tif",
                                 "https://h/a.tif?X-Amz-Signature=abc"])
def test_a_keyword_ending_a_value_keeps_the_url_after_it(keyword: str, url: str) -> None:
    """``<jobId>:<imageUrl>`` (OSML's ``image_id``) with a jobId that ends in a keyword: the
    URL (its public form) is kept, not taken for the keyword's secret value."""
    from pipeline.notify import status_attributes
    from pipeline.redact import public_url, redact

    job_id = f"backup-{keyword}"
    assert redact(f"{job_id}:{url} failed") == f"{job_id}:{public_url(url)} failed"
    assert status_attributes("FAILED", job_id, public_url(url), 1.0)["image_id"] == (
        f"{job_id}:{public_url(url)}")
    # the keyword's own values still go
    assert redact(f"{keyword}: hunter2hunter2 and {keyword}=s3cr3tvalue").count("***") == 2
    assert redact("Authorization: Basic YWxpY2U6cHc= rest") == "Authorization: ***"
