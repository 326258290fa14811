"""The closed door (allow-list, GDAL drivers) and redaction of secrets."""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil

from pipeline.redact import MASK, RedactingFilter, redact, redact_obj, register_secret
from pipeline.request import ImageRequest
from pipeline.security import AccessDenied, AllowList, open_raster


@pytest.fixture
def allow(tmp_path: Path) -> AllowList:
    (tmp_path / "images").mkdir()
    (tmp_path / "out").mkdir()
    return AllowList.from_strings(
        [f"{tmp_path}/images", "s3://imagery/in", "https://tiles.example.com"],
        [f"{tmp_path}/out", "s3://results/jobs", "kinesis://features"],
    )


@pytest.mark.parametrize(
    "url",
    ["s3://imagery/in/a.tif", "s3://imagery/in/deep/b.ntf", "/vsis3/imagery/in/a.tif",
     "NITF_IM:1:s3://imagery/in/c.ntf",
     "https://tiles.example.com/x/a.tif?X-Amz-Signature=abc"],
)
def test_allowed_sources(allow: AllowList, url: str) -> None:
    assert allow.check_source(url).startswith(
        ("s3://imagery/in/", "https://tiles.example.com/", "NITF_IM:1:s3://imagery/in/")
    )


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("s3://imagery/input/a.tif", "not on the allow-list"),  # prefix match is per segment
        ("s3://other/in/a.tif", "not on the allow-list"),
        ("s3://imagery/in/../secret/a.tif", "'..'"),
        ("/vsicurl/http://169.254.169.254/latest/meta-data/", "virtual file systems"),
        ("/vsizip//vsis3/imagery/in/a.zip/a.tif", "virtual file systems"),
        ("s3://imagery/in/x/vsicurl/http://evil/", "virtual file systems"),
        ("file:///etc/passwd", "local path /etc/passwd is not on the allow-list"),
        ("/etc/passwd", "local path /etc/passwd"),
        ("http://169.254.169.254/latest/meta-data/", "not on the allow-list"),
        ("https://evil.example.org/a.tif", "not on the allow-list"),
        ("https://user:pw@tiles.example.com/a.tif", "credentials in the URL"),
        ("vrt:///data/a.tif?bands=1", "scheme 'vrt'"),
        ("GTIFF_DIR:1:/data/a.tif", "scheme 'GTIFF_DIR'"),
        ("NITF_IM:0:/vsicurl/http://evil/a.ntf", "virtual file systems"),
        ("<VRTDataset rasterXSize='1'/>", "inline XML"),
        ("a.tif", "neither an absolute path nor a URL"),
        ("s3://imagery/in/a.tif\n", "control characters"),
    ],
)
def test_refused_sources(allow: AllowList, url: str, reason: str) -> None:
    with pytest.raises(AccessDenied) as err:
        allow.check_source(url, "imageUrls[3]")
    message = str(err.value)
    assert message.startswith("imageUrls[3]: ") and reason in message and "\n" not in message


def test_symlink_out_of_a_root_is_refused(allow: AllowList, tmp_path: Path) -> None:
    outside = tmp_path / "secret.tif"
    outside.write_bytes(b"II*\x00")
    (tmp_path / "images" / "link.tif").symlink_to(outside)
    with pytest.raises(AccessDenied, match="secret.tif is not on the allow-list"):
        allow.check_source(str(tmp_path / "images" / "link.tif"))
    assert allow.check_source(str(tmp_path / "images" / "real.tif")) == str(tmp_path / "images/real.tif")


def test_wildcards_never_reach_metadata_addresses() -> None:
    wide = AllowList.from_strings(["https://*", "http://*"], [])
    assert wide.check_source("https://data.example.com/a.tif")
    for url in ("http://169.254.169.254/latest/", "http://[fd00:ec2::254]/latest/",
                "http://metadata.google.internal/computeMetadata/v1/"):
        with pytest.raises(AccessDenied):
            wide.check_source(url)


def test_worker_defaults_read_and_write_s3_only() -> None:
    default = AllowList.from_env({})
    assert default.check_source("s3://anything/a.tif") == "s3://anything/a.tif"
    assert default.check_output("kinesis://stream") == "kinesis://stream"
    for url in ("/tmp/a.tif", "https://example.com/a.tif", "file:///tmp/a.tif"):
        with pytest.raises(AccessDenied):
            default.check_source(url)
    with pytest.raises(AccessDenied, match="local path"):
        default.check_output("/tmp/out")
    configured = AllowList.from_env({"MODEL_RUNNER_ALLOWED_SOURCES": "s3://a, /data",
                                     "MODEL_RUNNER_ALLOWED_OUTPUTS": "s3://b/out"})
    assert configured.check_source("/data/x.tif") == "/data/x.tif"
    with pytest.raises(AccessDenied):
        configured.check_source("s3://b/x.tif")


def _request(tmp_path: Path, **changes: object) -> ImageRequest:
    wire: dict[str, object] = {
        "jobId": "j",
        "imageUrls": [f"{tmp_path}/images/a.tif", "s3://imagery/in/b.tif"],
        "imageProcessor": {"name": "null", "type": "BUILTIN"},
        "outputs": [{"type": "LOCAL", "path": f"{tmp_path}/out"},
                    {"type": "S3", "bucket": "results", "prefix": "jobs/1"},
                    {"type": "Kinesis", "stream": "features"}],
    }
    wire.update(changes)
    return ImageRequest.parse(wire)


def test_check_request_names_the_field(allow: AllowList, tmp_path: Path) -> None:
    allow.check_request(_request(tmp_path))
    cases = {
        "imageUrls[1]": {"imageUrls": [f"{tmp_path}/images/a.tif", "/vsicurl/http://x/"]},
        "outputs[0]": {"outputs": [{"type": "LOCAL", "path": "/etc"}]},
        "outputs[1]": {"outputs": [{"type": "S3", "bucket": "results", "prefix": "jobs"},
                                   {"type": "S3", "bucket": "results", "prefix": "other"}]},
        "outputBucket": {"outputBucket": "attacker", "outputPrefix": "x"},
    }
    for field, change in cases.items():
        with pytest.raises(AccessDenied, match=rf"^{field.replace('[', '.').replace(']', '.')}"):
            allow.check_request(_request(tmp_path, **change))
    refused = allow.refused_sources(["s3://imagery/in/a.tif", "s3://nope/b.tif"])
    assert list(refused) == ["s3://nope/b.tif"]


# ---------------------------------------------------------------------- GDAL
class _Counter(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        type(self).hits.append(self.path)
        self.send_response(404)
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def counting_server() -> Iterator[tuple[str, list[str]]]:
    handler = type("Counter", (_Counter,), {"hits": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.hits
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def redirecting_server(counting_server: tuple[str, list[str]]) -> Iterator[tuple[str, list[str]]]:
    """An "allowed" host: ``/open?to=URL`` redirects (302) anywhere, ``/loop`` to itself,
    ``/here`` to ``/image.tif`` on the same host (404). Yields its URL and the paths it served."""
    from urllib.parse import parse_qs, urlsplit

    hits: list[str] = []

    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            hits.append(self.path)
            parts = urlsplit(self.path)
            target = {"/open": parse_qs(parts.query).get("to", [""])[0], "/loop": "/loop",
                      "/here": "/image.tif"}.get(parts.path)
            self.send_response(302 if target else 404)
            if target:
                self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


def test_redirects_are_checked_before_gdal_follows_them(
    redirecting_server: tuple[str, list[str]], counting_server: tuple[str, list[str]]
) -> None:
    """GDAL's curl follows redirects unchecked (no option stops it): every hop is checked first."""
    allowed, served = redirecting_server
    elsewhere, hits = counting_server
    allow = AllowList.from_strings([allowed], [])
    for target in (f"{elsewhere}/latest/meta-data/", "http://169.254.169.254/latest/meta-data/",
                   "file:///etc/passwd"):
        url = f"{allowed}/open?to={target}"
        assert allow.check_source(url) == url  # the URL itself is allowed...
        with pytest.raises(AccessDenied, match=r"^imageUrls\[0\]: redirected to .*, which is refused"):
            allow.check_redirects(url, "imageUrls[0]")  # ...where it leads is not
    assert hits == []
    assert allow.check_redirects(f"{allowed}/here") == f"{allowed}/here"  # same host: fine
    assert allow.check_redirects(f"NITF_IM:1:{allowed}/here") == f"NITF_IM:1:{allowed}/here"
    with pytest.raises(AccessDenied, match="more than 5 redirects"):
        allow.check_redirects(f"{allowed}/loop")
    assert served.count("/loop") == 6


def test_gdal_lists_no_directory_and_probes_no_sidecars(tmp_path: Path) -> None:
    """GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR (every read): describe() of an HTTP image fetches
    the image and nothing else (no folder listing, no sidecar probes)."""
    from rasterio.io import MemoryFile
    from rasterio.transform import from_origin

    from pipeline.reading import describe

    with MemoryFile() as memory:
        with memory.open(driver="GTiff", width=16, height=16, count=1, dtype="uint8", crs="EPSG:4326",
                         transform=from_origin(0, 1, 0.1, 0.1)) as dst:
            dst.write(np.ones((1, 16, 16), dtype=np.uint8))
        data = memory.read()
    hits: list[str] = []

    class Files(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            hits.append(self.path)
            if self.path != "/scenes/a.tif":
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            first, last = 0, len(data) - 1
            if self.headers.get("Range"):
                low, high = self.headers["Range"].split("=")[1].split("-")
                first, last = int(low), min(int(high), len(data) - 1)
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

    server = ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/scenes"
        assert describe(f"{base}/a.tif").width == 16
        # plain GDAL here also GETs /scenes/ and HEADs 10 sidecars (.aux.xml, .aux, .xml, .msk)
        assert set(hits) == {"/scenes/a.tif"}
    finally:
        server.shutdown()
        server.server_close()


def test_a_vrt_pointing_elsewhere_fetches_nothing(
    tmp_path: Path, counting_server: tuple[str, list[str]]
) -> None:
    url, hits = counting_server
    vrt = tmp_path / "innocent.tif"  # a VRT wearing a .tif name, inside an allowed root
    vrt.write_text(
        '<VRTDataset rasterXSize="8" rasterYSize="8"><VRTRasterBand dataType="Byte" band="1">'
        f"<SimpleSource><SourceFilename>/vsicurl/{url}/secret.tif</SourceFilename>"
        "<SourceBand>1</SourceBand></SimpleSource></VRTRasterBand></VRTDataset>"
    )
    with pytest.raises(rasterio.errors.RasterioIOError, match="not recognized"):
        open_raster(str(vrt))
    assert hits == []
    with rasterio.open(vrt) as src:  # the door that open_raster closes: plain GDAL fetches
        with pytest.raises(rasterio.errors.RasterioIOError):
            src.read()
    assert hits, "plain rasterio.open should have tried the URL inside the VRT"


@pytest.mark.parametrize("name", ["scene.ntf", "scene.tif", "scene.vrt", "scene.NTF"])
def test_a_job_never_opens_an_image_that_points_elsewhere(
    name: str, tmp_path: Path, counting_server: tuple[str, list[str]]
) -> None:
    """A VRT in disguise (NITF or GeoTIFF name) whose sources are a URL and a local file outside
    the roots: the header read that plans every image refuses it, one line, nothing fetched."""
    from pipeline.reading import ImageError, describe

    url, hits = counting_server
    secret = tmp_path / "outside" / "secret.tif"
    secret.parent.mkdir()
    with rasterio.open(secret, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint8") as dst:
        dst.write(np.full((1, 8, 8), 7, dtype=np.uint8))
    sources = "".join(
        f"<SimpleSource><SourceFilename>{source}</SourceFilename><SourceBand>1</SourceBand></SimpleSource>"
        for source in (f"/vsicurl/{url}/secret.tif", str(secret), f"NITF_IM:0:/vsicurl/{url}/x.ntf")
    )
    image = tmp_path / "images" / name
    image.parent.mkdir()
    image.write_text(f'<VRTDataset rasterXSize="8" rasterYSize="8"><VRTRasterBand dataType="Byte" '
                     f'band="1">{sources}</VRTRasterBand></VRTDataset>')
    with pytest.raises(ImageError, match=rf"^cannot open image {image}: .*not recognized") as err:
        describe(str(image))
    assert "\n" not in str(err.value)
    assert hits == []


def test_open_raster_reads_allowed_formats(tmp_path: Path) -> None:
    path = tmp_path / "a.tif"
    with rasterio.open(path, "w", driver="GTiff", width=3, height=2, count=1, dtype="uint8") as dst:
        dst.write(np.arange(6, dtype=np.uint8).reshape(1, 2, 3))
    with open_raster(str(path)) as src:
        assert src.driver == "GTiff" and src.read(1).tolist() == [[0, 1, 2], [3, 4, 5]]


# ---------------------------------------------------------------------- redaction
@pytest.mark.parametrize(
    ("text", "kept", "gone"),
    [
        ("GET https://b.s3.amazonaws.com/k.tif?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential="
         "ASIAXAMPLEKEY1234567%2F20250101&X-Amz-Signature=deadbeefcafe&X-Amz-Security-Token=FwoGZX",
         "https://b.s3.amazonaws.com/k.tif?X-Amz-Algorithm=", ["deadbeefcafe", "FwoGZX", "ASIAXAMPLE"]),
        ("https://h/x?AWSAccessKeyId=AKIAIOSFODNN7EXAMPLE&Signature=abc%3D&Expires=1", "https://h/x?",
         ["AKIAIOSFODNN7EXAMPLE", "abc%3D"]),
        ("key id AKIAIOSFODNN7EXAMPLE failed", "key id *** failed", ["AKIAIOSFODNN7EXAMPLE"]),
        ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "aws_secret_access_key = ",
         ["wJalrXUtnFEMI"]),
        ('{"SecretAccessKey": "wJalrXUtnFEMI", "SessionToken": "IQoJb3JpZ2lu"}', '"SecretAccessKey": ',
         ["wJalrXUtnFEMI", "IQoJb3JpZ2lu"]),
        ("Authorization: AWS4-HMAC-SHA256 Credential=AKIA/2025, Signature=ff00", "Authorization: ",
         ["Signature=ff00", "Credential=AKIA"]),
        ("Bearer eyJhbGciOiJIUzI1NiJ9.e30.abc", "Bearer ***", ["eyJhbGci"]),
        ("https://alice:hunter2pass@example.com/a.tif", "https://***@example.com/a.tif", ["hunter2pass"]),
        ("s3://bucket/plain/key.tif 1024x1024", "s3://bucket/plain/key.tif 1024x1024", []),
    ],
)
def test_redact(text: str, kept: str, gone: list[str]) -> None:
    out = redact(text)
    assert kept in out
    for secret in gone:
        assert secret not in out


def test_registered_and_environment_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    register_secret("a-runtime-token-123456")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "env-session-token-XYZ987")
    assert redact("tok a-runtime-token-123456 / env-session-token-XYZ987") == f"tok {MASK} / {MASK}"
    register_secret("short")  # too short to register: ordinary words stay
    assert redact("a short word") == "a short word"


def test_redact_obj_masks_secret_keys_and_strings() -> None:
    summary = {"images": [{"url": "https://h/a.tif?X-Amz-Signature=s3cr3t", "tiles": 4}],
               "credentials": {"AccessKeyId": "AKIAIOSFODNN7EXAMPLE"}, "sessionToken": "zzz"}
    clean = redact_obj(summary)
    assert clean["images"][0]["tiles"] == 4
    assert "s3cr3t" not in clean["images"][0]["url"]
    assert clean["credentials"] == MASK and clean["sessionToken"] == MASK


@contextmanager
def redacted_log(name: str) -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger whose records go, through :class:`RedactingFilter`, to the yielded stream."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)


def test_log_filter_redacts_messages_arguments_and_tracebacks() -> None:
    with redacted_log("test.redact") as (logger, stream):
        logger.warning("reading %s", "https://h/a.tif?X-Amz-Signature=topsecret1")
        try:
            raise RuntimeError("denied for AKIAIOSFODNN7EXAMPLE")
        except RuntimeError:
            logger.exception("failed with token=abcdef123456")
    text = stream.getvalue()
    assert "https://h/a.tif?X-Amz-Signature=***" in text and "RuntimeError" in text
    for secret in ("topsecret1", "AKIAIOSFODNN7EXAMPLE", "abcdef123456"):
        assert secret not in text


def test_cap_detections_keeps_the_best_and_counts_the_rest() -> None:
    from pipeline.detections import Detections
    from pipeline.security import cap_detections

    n = 25
    boxes = np.stack([np.arange(n), np.zeros(n), np.arange(n) + 1, np.ones(n)], axis=1)
    scores = np.linspace(0.01, 1.0, n)
    capped, dropped = cap_detections(Detections(boxes, scores, ["x"] * n), limit=10)
    assert dropped == 15 and len(capped) == 10
    assert capped.boxes[:, 0].tolist() == list(range(15, 25))  # the 10 best, in their order
    same, none = cap_detections(capped, limit=10)
    assert same is capped and none == 0


# ---------------------------------------------------------------------- the queue worker
def test_the_worker_refuses_requests_that_reach_outside(
    aws: str, tmp_path: Path, counting_server: tuple[str, list[str]],
    redirecting_server: tuple[str, list[str]], caplog: pytest.LogCaptureFixture
) -> None:
    """Refused requests are poison (dead-lettered with a FAILED status naming the field); the
    URLs they name are never fetched."""
    import json
    import uuid

    import boto3

    from graphs.queue_worker import QueueWorker, WorkerConfig

    url, hits = counting_server
    sqs, sns = boto3.client("sqs"), boto3.client("sns")
    tag = uuid.uuid4().hex[:8]
    dlq = sqs.create_queue(QueueName=f"dlq-{tag}")["QueueUrl"]

    def arn(queue_url: str) -> str:
        answer = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])
        return str(answer["Attributes"]["QueueArn"])

    dlq_arn = arn(dlq)
    queue = sqs.create_queue(QueueName=f"requests-{tag}", Attributes={"RedrivePolicy": json.dumps(
        {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "3"})})["QueueUrl"]
    status = sqs.create_queue(QueueName=f"status-{tag}")["QueueUrl"]
    status_arn = arn(status)
    topic = sns.create_topic(Name=f"status-{tag}")["TopicArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=status_arn,
                  Attributes={"RawMessageDelivery": "true"})
    (tmp_path / "images").mkdir()
    base = {"imageProcessor": {"name": "null", "type": "BUILTIN"},
            "outputs": [{"type": "S3", "bucket": "results", "prefix": "jobs"}]}
    hostile = {
        "ssrf-vsicurl": {"imageUrls": [f"/vsicurl/{url}/latest/meta-data/"]},
        "ssrf-http": {"imageUrls": [f"{url}/image.tif"]},
        "local-file": {"imageUrls": ["file:///etc/passwd"]},
        "output-elsewhere": {"imageUrls": ["s3://imagery/in/a.tif"],
                             "outputs": [{"type": "S3", "bucket": "attacker", "prefix": "x"}]},
        "local-output": {"imageUrls": ["s3://imagery/in/a.tif"],
                         "outputs": [{"type": "LOCAL", "path": "/etc/cron.d"}]},
        "open-redirect": {"imageUrls": ["s3://imagery/in/a.tif",
                                        f"{redirecting_server[0]}/open?to={url}/latest/meta-data/"]},
    }
    for job_id, fields in hostile.items():
        sqs.send_message(QueueUrl=queue, MessageBody=json.dumps({**base, "jobId": job_id, **fields}))
    allow = AllowList.from_strings(["s3://imagery/in", str(tmp_path / "images"), redirecting_server[0]],
                                   ["s3://results/jobs"])
    config = WorkerConfig(queue_url=queue, status_topic_arn=topic, exit_when_idle=True, wait_seconds=0)
    stats = QueueWorker(config, None, allow=allow).run()
    assert stats.poison == len(hostile) and stats.received == len(hostile)
    assert hits == []
    dead = sqs.receive_message(QueueUrl=dlq, MaxNumberOfMessages=10, WaitTimeSeconds=0).get("Messages", [])
    assert sorted(json.loads(m["Body"])["jobId"] for m in dead) == sorted(hostile)
    reasons = {}
    for _ in range(5):
        for m in sqs.receive_message(QueueUrl=status, MaxNumberOfMessages=10, WaitTimeSeconds=0,
                                     MessageAttributeNames=["All"]).get("Messages", []):
            body = json.loads(m["Body"])
            reasons[body.get("jobId")] = json.dumps(body)
    assert "imageUrls[0]: GDAL virtual file systems" in reasons["ssrf-vsicurl"]
    assert "is not on the allow-list of image sources" in reasons["ssrf-http"]
    assert "local path /etc/passwd" in reasons["local-file"]
    assert "outputs[0]: s3://attacker/x is not on the allow-list" in reasons["output-elsewhere"]
    assert "outputs[0]: local path /etc/cron.d" in reasons["local-output"]
    assert f"imageUrls[1]: redirected to {url}/latest/meta-data/, which is refused" in \
        reasons["open-redirect"]


def test_an_unconfigured_worker_is_closed(caplog: pytest.LogCaptureFixture) -> None:
    """No MODEL_RUNNER_ALLOWED_* variables: S3 in, S3/Kinesis out, nothing local or HTTP."""
    with caplog.at_level(logging.INFO, logger="pipeline.security"):
        closed = AllowList.for_worker({})
    assert "no allow-list configured" in caplog.text
    assert closed.check_source("s3://any-bucket/a.tif") == "s3://any-bucket/a.tif"
    assert closed.check_output("s3://any-bucket/out") and closed.check_output("kinesis://s")
    for url, reason in (("/data/a.tif", "local path /data/a.tif is not on the allow-list"),
                        ("file:///data/a.tif", "local path /data/a.tif is not on the allow-list"),
                        ("https://example.com/a.tif", "https://example.com/a.tif is not on"),
                        ("http://127.0.0.1:8080/a.tif", "http://127.0.0.1:8080/a.tif is not on"),
                        ("/vsicurl/https://example.com/a.tif", "virtual file systems"),
                        ("http://169.254.169.254/latest/", "not on the allow-list"),
                        ("https://u:p@example.com/a.tif", "credentials in the URL"),
                        ("vrt:///data/a.tif", "scheme 'vrt'")):
        with pytest.raises(AccessDenied, match=reason):
            closed.check_source(url)
    for url in ("/tmp/out", "file:///tmp/out"):
        with pytest.raises(AccessDenied, match="local path /tmp/out is not on the allow-list"):
            closed.check_output(url)
    # one variable set: the other keeps its closed default
    sources_only = AllowList.for_worker({"MODEL_RUNNER_ALLOWED_SOURCES": "s3://a /data"})
    assert sources_only.check_source("/data/a.tif") == "/data/a.tif"
    with pytest.raises(AccessDenied, match="local path"):
        sources_only.check_output("/data/out")
    assert sources_only.describe() == "image sources s3://a, /data; outputs s3://*, kinesis://*"


def test_the_cli_never_shows_presigned_secrets(
    tmp_path: Path, counting_server: tuple[str, list[str]]
) -> None:
    """A presigned image URL that fails: stdout, stderr and the summary file keep the URL but
    not its signature, credential or token."""
    import json
    import os
    import subprocess
    import sys

    url, hits = counting_server
    secrets = ("SIGdeadbeef0123456789", "AKIAIOSFODNN7EXAMPLE", "FwoGZXIvYXdzEJr-token-value")
    image = (f"{url}/scene.tif?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={secrets[1]}%2F2025"
             f"&X-Amz-Signature={secrets[0]}&X-Amz-Security-Token={secrets[2]}")
    request = tmp_path / "request.json"
    request.write_text(json.dumps({
        "jobId": "presigned", "imageUrls": [image],
        "imageProcessor": {"name": "null", "type": "BUILTIN"},
        "outputs": [{"type": "LOCAL", "path": str(tmp_path / "out")}],
    }))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", str(request), "--workers", "1",
                           "--no-progress"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert hits, "the image URL should have been tried"
    summary = (tmp_path / "out" / "presigned.summary.json").read_text()
    assert json.loads(summary)["images"][0]["status"] == "FAILED"
    for text in (done.stdout, done.stderr, summary):
        assert "scene.tif?X-Amz-Algorithm=" in text or text is done.stderr
        for secret in secrets:
            assert secret not in text


def test_the_example_worker_config_admits_the_example_request() -> None:
    """configs/worker: the example request passes the example allow-list; other places do not."""
    root = Path(__file__).resolve().parents[1] / "configs" / "worker"
    lines = (root / "worker.env").read_text().splitlines()
    env = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    allow = AllowList.for_worker(env)
    request, _ = ImageRequest.from_message((root / "osml-image-request.json").read_text())
    allow.check_request(request)
    with pytest.raises(AccessDenied, match="outputs.0.: s3://my-results-bucket/other"):
        allow.check_output("s3://my-results-bucket/other", "outputs[0]")
    with pytest.raises(AccessDenied, match="imageUrls.0.: s3://my-imagery-bucket/private/a.tif"):
        allow.check_source("s3://my-imagery-bucket/private/a.tif", "imageUrls[0]")


# ---------------------------------------------------------------------- status on SNS
def _status_queue(tag: str) -> tuple[str, str, str]:
    """A topic with a raw SNS → SQS subscription: ``(topic ARN, status queue URL, request queue URL)``."""
    import boto3

    sqs, sns = boto3.client("sqs"), boto3.client("sns")
    status = sqs.create_queue(QueueName=f"status-{tag}")["QueueUrl"]
    status_arn = sqs.get_queue_attributes(QueueUrl=status, AttributeNames=["QueueArn"])
    topic = sns.create_topic(Name=f"status-{tag}")["TopicArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=status_arn["Attributes"]["QueueArn"],
                  Attributes={"RawMessageDelivery": "true"})
    requests = sqs.create_queue(QueueName=f"requests-{tag}")["QueueUrl"]
    return topic, status, requests


def _delivered(queue_url: str) -> list[str]:
    """Every message delivered to ``queue_url``: its body and attributes as one JSON text."""
    import json

    import boto3

    sqs, found = boto3.client("sqs"), []
    while True:
        messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0,
                                       MessageAttributeNames=["All"]).get("Messages", [])
        if not messages:
            return found
        for m in messages:
            found.append(json.dumps({"body": m["Body"], "attributes": m.get("MessageAttributes", {})}))
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=m["ReceiptHandle"])


PRESIGNED_SECRETS = ("SIGcafe0123456789abcdef", "ASIAQEXAMPLE7TOKEN99", "IQoJb3JpZ2luX2VjELr-token")


def _presigned(base: str) -> str:
    signature, key, token = PRESIGNED_SECRETS
    return (f"{base}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={key}%2F20250101%2Fus-east-1"
            f"&X-Amz-Signature={signature}&X-Amz-Security-Token={token}")


def test_status_messages_on_sns_are_redacted(aws: str) -> None:
    """StatusPublisher through a real SNS → SQS subscription: URL kept, its secrets not."""
    import json
    import uuid

    from pipeline.notify import StatusPublisher

    register_secret("runtime-secret-0123456789")
    topic, status, _ = _status_queue(uuid.uuid4().hex[:8])
    url = _presigned("https://imagery.example.com/scenes/a.tif")
    publisher = StatusPublisher(topic)
    publisher.publish("FAILED", "job-1", url,
                      f"cannot open image {url}: denied with password=hunter2hunter2 and "
                      f"runtime-secret-0123456789", duration=2.5, failed_tiles=3,
                      detail={"sessionToken": "zzz-raw-session-token"})
    (text,) = _delivered(status)
    message = json.loads(text)
    body, attributes = json.loads(message["body"]), message["attributes"]
    assert body["status"] == "FAILED" and body["failedTiles"] == 3
    assert body["imageUrl"].startswith("https://imagery.example.com/scenes/a.tif?X-Amz-Algorithm=")
    assert attributes["image_id"]["StringValue"].startswith("job-1:https://imagery.example.com/")
    assert "cannot open image https://imagery.example.com/scenes/a.tif" in body["message"]
    assert body["detail"]["sessionToken"] == MASK
    for secret in (*PRESIGNED_SECRETS, "hunter2hunter2", "runtime-secret-0123456789",
                   "zzz-raw-session-token"):
        assert secret not in text


def test_worker_failure_status_and_dead_letter_reasons_are_redacted(
    aws: str, tmp_path: Path, counting_server: tuple[str, list[str]], dask_client: object,
    caplog: pytest.LogCaptureFixture
) -> None:
    """A presigned image URL that fails (404) and a refused one: neither the FAILED statuses on
    SNS, the dead-letter reason nor the worker's log carry the signature, key id or token."""
    import json
    import uuid

    import boto3

    from graphs.queue_worker import QueueWorker, WorkerConfig

    url, hits = counting_server
    tag = uuid.uuid4().hex[:8]
    topic, status, requests = _status_queue(tag)
    sqs = boto3.client("sqs")
    body = {"imageProcessor": {"name": "null", "type": "BUILTIN"},
            "outputs": [{"type": "LOCAL", "path": str(tmp_path)}]}
    sqs.send_message(QueueUrl=requests, MessageBody=json.dumps(
        {**body, "jobId": "presigned", "imageUrls": [_presigned(f"{url}/scene.tif")]}))
    sqs.send_message(QueueUrl=requests, MessageBody=json.dumps(
        {**body, "jobId": "refused", "imageUrls": [_presigned("https://elsewhere.example.org/a.tif")]}))
    allow = AllowList.from_strings([url], [str(tmp_path)])
    config = WorkerConfig(queue_url=requests, status_topic_arn=topic, max_jobs=2, wait_seconds=0,
                          retry_delay=30)
    flt = RedactingFilter()  # what `model-runner worker` installs on its log handlers
    caplog.handler.addFilter(flt)
    try:
        with caplog.at_level(logging.INFO):
            stats = QueueWorker(config, dask_client, allow=allow).run()
    finally:
        caplog.handler.removeFilter(flt)
    assert (stats.received, stats.failed, stats.poison) == (2, 1, 1)
    assert any(h.startswith("/scene.tif?X-Amz-Algorithm=") for h in hits)  # the URL was read
    delivered = _delivered(status)
    statuses = [json.loads(json.loads(t)["body"]) for t in delivered]
    failed = {s["jobId"]: s for s in statuses if s["status"] == "FAILED"}
    assert set(failed) == {"presigned", "refused"}
    assert failed["presigned"]["imageUrl"] == (f"{url}/scene.tif?X-Amz-Algorithm=***&X-Amz-Credential=***"
                                               "&X-Amz-Signature=***&X-Amz-Security-Token=***")
    assert failed["refused"]["message"].startswith(
        "refused: imageUrls[0]: https://elsewhere.example.org/a.tif is not on the allow-list")
    for secret in PRESIGNED_SECRETS:
        assert not [t for t in delivered if secret in t]
        assert secret not in caplog.text


# ---------------------------------------------------------------------- assumed roles
def test_assumed_role_credentials_never_show(aws: str) -> None:
    """Temporary credentials from (moto) STS are masked in logs, summaries and exceptions."""
    import json

    from pipeline import aws as aws_module
    from pipeline.reading import read_options

    credentials = aws_module.assume_role("arn:aws:iam::123456789012:role/image-reader", purpose="t")
    secrets = [credentials["AccessKeyId"], credentials["SecretAccessKey"], credentials["SessionToken"]]
    assert all(len(s) >= 16 for s in secrets)
    text = f"read with {secrets[0]} / {secrets[1]} / {secrets[2]} failed"
    assert redact(text) == f"read with {MASK} / {MASK} / {MASK} failed"
    summary = {"images": [{"reason": f"denied: key {secrets[0]} token {secrets[2]}"}],
               "read": {"note": secrets[1]}}
    assert not any(s in json.dumps(redact_obj(summary)) for s in secrets)
    with redacted_log("test.assumed") as (logger, stream):
        try:
            raise PermissionError(f"AccessDenied for {secrets[0]}:{secrets[1]}")
        except PermissionError:
            logger.exception("reading with session token %s", secrets[2])
    assert "PermissionError" in stream.getvalue()
    assert not any(s in stream.getvalue() for s in secrets)
    # the per-image read options of an imageReadRole name the role, never its credentials
    options = read_options("s3://bucket/a.tif", role="arn:aws:iam::123456789012:role/image-reader")
    assert options[aws_module.SIGNER_OPTION] == "arn:aws:iam::123456789012:role/image-reader"
    assert not set(aws_module.SECRET_KEYS) & set(options) and MASK not in redact(str(dict(options)))


def test_an_sts_failure_is_one_line(aws: str) -> None:
    from pipeline.aws import AwsError, assume_role

    with pytest.raises(AwsError, match=r"^cannot assume role not-an-arn: ") as err:
        assume_role("not-an-arn")
    assert "\n" not in str(err.value)


def test_every_pixel_read_opens_image_drivers_only(tmp_path, monkeypatch) -> None:
    # a VRT (it could point anywhere) is refused by the window read, the DRA sample and the
    # quick look alike, not only by the header read; allowed when the drivers list VRT
    from pipeline.quicklook import read_overview
    from pipeline.range_stats import sample_pixels
    from pipeline.reading import ImageError, describe, read_window

    tif = tmp_path / "real.tif"
    with rasterio.open(tif, "w", driver="GTiff", width=64, height=64, count=1, dtype="uint16") as dst:
        dst.write(np.arange(64 * 64, dtype=np.uint16).reshape(1, 64, 64))
    vrt = tmp_path / "mosaic.vrt"
    rasterio.shutil.copy(tif, vrt, driver="VRT")
    monkeypatch.setenv("MODEL_RUNNER_IMAGE_DRIVERS", "GTiff,VRT")
    info = describe(str(vrt))
    monkeypatch.delenv("MODEL_RUNNER_IMAGE_DRIVERS")
    for read in (lambda: read_window(str(vrt), (0, 0, 8, 8)), lambda: sample_pixels(str(vrt), info),
                 lambda: read_overview(str(vrt))):
        with pytest.raises(ImageError, match="mosaic.vrt"):
            read()
    monkeypatch.setenv("MODEL_RUNNER_IMAGE_DRIVERS", "GTiff,VRT")
    assert read_window(str(vrt), (0, 0, 2, 1)).tolist() == [[[0, 1]]]
