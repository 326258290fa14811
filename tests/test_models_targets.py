"""Every endpoint adapter against real servers on 127.0.0.1 (no Dask here; see test_models_jobs)."""

from __future__ import annotations

import json

import boto3
import numpy as np
import pytest

from pipeline.detections import Detections
from pipeline.models import ModelError, ModelSpec, check_model, clear_cache, load_model
from pipeline.models.builtin import bright_objects
from pipeline.models.endpoint import resolve_model
from pipeline.models.results import MalformedResponse
from pipeline.models.retry import METRICS, AIMDLimiter
from tests.model_servers import serving

FAST = {"retryBaseDelay": 0.01, "retryMaxDelay": 0.05}


@pytest.fixture
def sm(aws: str, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """A serve-model server standing in for SageMaker (runtime and DescribeEndpoint)."""
    with serving("bright-objects", instances=3) as server:
        monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", server.url)
        monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER", server.url)
        yield server
    clear_cache()


def tiles(n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    batch = np.full((n, 64, 64, 3), 10, dtype=np.uint8)
    for i in range(n):
        batch[i, 5 + i : 11 + i, 20:26 + i] = 240
    return batch, np.zeros((n, 2), dtype=np.int64)


def expected(batch: np.ndarray) -> list[Detections]:
    return [bright_objects(t) for t in batch]


def run(spec: ModelSpec, batch: np.ndarray) -> list[Detections | BaseException]:
    check_model(spec)
    return load_model(resolve_model(spec)).predict(batch, np.zeros((len(batch), 2), dtype=np.int64))


def same(results: list, truth: list[Detections]) -> None:
    assert len(results) == len(truth)
    for got, want in zip(results, truth, strict=True):
        assert isinstance(got, Detections), got
        np.testing.assert_array_equal(got.boxes, want.boxes)
        assert got.classes.tolist() == want.classes.tolist()


@pytest.mark.parametrize("fmt,comp", [("GTIFF", "NONE"), ("NITF", "NONE"), ("PNG", "NONE"), ("GTIFF", "LZW")])
def test_sagemaker_realtime_gives_the_in_process_detections(sm, fmt: str, comp: str) -> None:
    batch, _ = tiles()
    same(run(ModelSpec("SM_ENDPOINT", "detector", dict(FAST), fmt, comp), batch), expected(batch))
    assert sm.stats.tiles == len(batch)


def test_sagemaker_cap_from_describe_endpoint_and_pass_through(sm) -> None:
    spec = resolve_model(ModelSpec("SM_ENDPOINT", "detector", {"CustomAttributes": "a=1"}))
    assert spec.options["maxConcurrency"] == 3 * 2  # instances x per-instance concurrency
    assert spec.options["endpointUrl"] == sm.url
    assert "credentials" not in spec.options and "credentials" not in repr(spec)
    spec = resolve_model(ModelSpec("SM_ENDPOINT", "detector", {"maxConcurrency": 5}))
    assert spec.options["maxConcurrency"] == 5
    with pytest.raises(ModelError, match=r"imageProcessorParameters.Colour is not supported by SM_ENDPOINT"):
        check_model(ModelSpec("SM_ENDPOINT", "detector", {"Colour": "red"}))


def test_sagemaker_cap_defaults_to_8_when_the_endpoint_cannot_be_described(aws, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER", "http://127.0.0.1:9")  # nothing listens
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", "http://127.0.0.1:9")
    assert resolve_model(ModelSpec("SM_ENDPOINT", "nowhere")).options["maxConcurrency"] == 8


def test_assumed_role_is_assumed_through_sts(sm) -> None:
    spec = resolve_model(ModelSpec("SM_ENDPOINT", "detector", dict(FAST),
                                   assumed_role="arn:aws:iam::123456789012:role/model"))
    # the spec carries the role, never its credentials: this process assumes it itself
    from pipeline.models.endpoint import aws_session

    frozen = aws_session(spec).get_credentials().get_frozen_credentials()
    assert frozen.access_key.startswith("ASIA") and frozen.access_key != "testing"
    assert "credentials" not in spec.options
    assert not {frozen.access_key, frozen.secret_key, frozen.token} & {str(v) for v in spec.options.values()}
    batch, _ = tiles(2)
    same(load_model(spec).predict(batch, np.zeros((2, 2))), expected(batch))


def test_http_endpoint_sends_parameters_as_headers(aws) -> None:
    batch, _ = tiles(3)
    with serving("bright-objects") as server:
        url = server.url + "/invocations"
        same(run(ModelSpec("HTTP_ENDPOINT", url, {"X-Trace": "t1", **FAST}, "JPEG", "JPEG"), batch[:0]), [])
        same(run(ModelSpec("HTTP_ENDPOINT", url, {"X-Trace": "t1", **FAST}, "PNG"), batch), expected(batch))
    with pytest.raises(ModelError, match="must be an http"):
        check_model(ModelSpec("HTTP_ENDPOINT", "detector"))
    clear_cache()


def test_tfserving_batches_tiles_per_request(aws) -> None:
    batch, _ = tiles(7)
    with serving("bright-objects") as server:
        spec = ModelSpec("TFSERVING_ENDPOINT", server.url + "/v1/models/detector",
                         {"batchSize": 3, "classNames": {"1": "bright-object"}, **FAST})
        same(run(spec, batch), expected(batch))
        assert server.stats.requests == 3 and server.stats.tiles == 7  # 3 + 3 + 1
    clear_cache()


def test_retries_recover_random_errors_and_throttles(sm) -> None:
    sm.behaviour.error_rate, sm.behaviour.throttle_rate = 0.35, 0.35
    METRICS.reset()
    batch, _ = tiles(12)
    same(run(ModelSpec("SM_ENDPOINT", "detector", {"maxRetries": 12, **FAST}), batch), expected(batch))
    counts = METRICS.snapshot()["SM_ENDPOINT:invoke"]["counts"]
    assert counts["retries"] == counts["errors"] > 0 and counts["throttles"] > 0
    assert counts["invocations"] == 12 + counts["retries"]
    assert sm.stats.statuses["429"] == counts["throttles"]


def test_sagemaker_slot_is_taken_at_send_and_throttles_shrink_its_window(sm) -> None:
    # the slot is taken once botocore has signed the request; every one is given back, and a
    # throttled call still halves the AIMD window
    sm.behaviour.throttle_rate = 1.0
    spec = resolve_model(ModelSpec("SM_ENDPOINT", "detector", {"maxRetries": 0, "maxConcurrency": 4, **FAST}))
    adapter = load_model(spec)
    batch, _ = tiles(3)
    results = adapter.predict(batch, np.zeros((3, 2), dtype=np.int64))
    assert all(isinstance(r, ModelError) and "ThrottlingException" in str(r) for r in results)
    assert adapter.slots.local.limit < 4 and adapter.slots.local.in_flight == 0
    sm.behaviour.throttle_rate = 0.0
    results = adapter.predict(batch, np.zeros((3, 2), dtype=np.int64))
    same(results, expected(batch))
    assert adapter.slots.local.in_flight == 0 and adapter.slots.local.peak <= 4


def test_persistent_and_malformed_failures_fail_exactly_those_tiles(sm) -> None:
    sm.behaviour.fail_marker, sm.behaviour.malformed_marker = 77, 78
    batch, _ = tiles(5)
    batch[1, 0, 0], batch[3, 0, 0] = 77, 78
    results = run(ModelSpec("SM_ENDPOINT", "detector", {"maxRetries": 2, **FAST}), batch)
    assert isinstance(results[1], ModelError) and "InternalFailure" in str(results[1])
    assert isinstance(results[3], MalformedResponse)
    good = [0, 2, 4]
    same([results[i] for i in good], [expected(batch)[i] for i in good])
    assert sm.stats.statuses["500"] == 3  # one try and two retries, the malformed tile is not retried


def test_concurrency_cap_is_never_exceeded(aws) -> None:
    batch, _ = tiles(24)
    with serving("bright-objects", latency=0.05) as server:
        spec = ModelSpec("HTTP_ENDPOINT", server.url + "/invocations", {"maxConcurrency": 3})
        same(run(spec, batch), expected(batch))
        assert server.stats.peak_in_flight == 3
    clear_cache()


def test_image_processor_max_concurrency_wins_and_caps_the_adapter(sm) -> None:
    from graphs.image_job import model_spec
    from pipeline.request import ImageRequest

    request = ImageRequest.parse({
        "jobId": "j", "imageUrls": ["x.tif"],
        "imageProcessor": {"name": "detector", "type": "SM_ENDPOINT", "maxConcurrency": 2},
        "imageProcessorParameters": {"maxConcurrency": 5, "perInstanceConcurrency": 4, **FAST},
    })
    spec = resolve_model(model_spec(request))
    assert spec.options["maxConcurrency"] == 2  # not 5 (parameters), not 3 instances x 4 (describe)
    assert resolve_model(model_spec(request.model_copy(update={
        "image_processor": request.image_processor.model_copy(update={"max_concurrency": None})
    }))).options["maxConcurrency"] == 5
    sm.behaviour.latency = 0.05
    batch, _ = tiles(12)
    adapter = load_model(spec)
    same(adapter.predict(batch, np.zeros((12, 2), dtype=np.int64)), expected(batch))
    assert sm.stats.peak_in_flight == 2


@pytest.mark.parametrize("value,message", [
    (0, "greater than 0"), (-3, "greater than 0"), ("4", "valid integer"), (2.5, "valid integer"),
    (True, "valid integer"),
])
def test_image_processor_max_concurrency_is_validated(value: object, message: str) -> None:
    from pipeline.request import ImageRequest, RequestError

    data = {"jobId": "j", "imageUrls": ["x.tif"],
            "imageProcessor": {"name": "detector", "maxConcurrency": value}}
    for parse in (ImageRequest.parse, ImageRequest.from_message):
        with pytest.raises(RequestError, match=f"imageProcessor.maxConcurrency: .*{message}") as info:
            parse(data)  # type: ignore[operator]
        assert "\n" not in str(info.value)


def test_aimd_halves_on_throttling_and_recovers() -> None:
    limiter = AIMDLimiter(8)
    limiter.acquire()
    limiter.release(throttled=True)
    limiter.acquire()
    limiter.release(throttled=True)
    assert limiter.limit == 2
    for _ in range(40):
        limiter.acquire()
        limiter.release()
    assert limiter.limit == 8


def test_sagemaker_async_through_s3(sm, aws) -> None:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="async-in")
    s3.create_bucket(Bucket="async-out")
    sm.behaviour.async_output = "s3://async-out/results"
    sm.behaviour.async_fail_marker = 77
    batch, _ = tiles(4)
    batch[2, 0, 0] = 77
    params = {"s3InputLocation": "s3://async-in/tiles", "pollInterval": 0.05, "pollTimeout": 20, **FAST}
    results = run(ModelSpec("SM_ASYNC_ENDPOINT", "detector", params), batch)
    assert type(results[2]).__name__ == "AsyncInferenceError"
    same([results[i] for i in (0, 1, 3)], [expected(batch)[i] for i in (0, 1, 3)])
    # immediate cleanup: nothing left in either bucket
    assert s3.list_objects_v2(Bucket="async-in").get("KeyCount") == 0
    assert s3.list_objects_v2(Bucket="async-out").get("KeyCount") == 0


def test_sagemaker_async_timeout_and_delayed_cleanup(sm, aws) -> None:
    from pipeline.models.sm_async import cleanup_pending

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="slow-in")
    s3.create_bucket(Bucket="slow-out")
    sm.behaviour.async_output = "s3://slow-out/r"
    sm.behaviour.latency = 1.5
    batch, _ = tiles(2)
    params = {"s3InputLocation": "s3://slow-in/t", "pollInterval": 0.05, "pollTimeout": 0.5,
              "cleanupPolicy": "delayed", **FAST}
    results = run(ModelSpec("SM_ASYNC_ENDPOINT", "detector", params), batch)
    assert all(type(r).__name__ == "AsyncTimeoutError" for r in results)
    assert s3.list_objects_v2(Bucket="slow-in")["KeyCount"] == 2
    assert cleanup_pending() >= 2
    assert s3.list_objects_v2(Bucket="slow-in")["KeyCount"] == 0
    with pytest.raises(ModelError, match="cleanupPolicy"):
        check_model(ModelSpec("SM_ASYNC_ENDPOINT", "detector", {**params, "cleanupPolicy": "never"}))
    with pytest.raises(ModelError, match="s3InputLocation"):
        check_model(ModelSpec("SM_ASYNC_ENDPOINT", "detector", {}))


def test_serve_model_container_contract(sm) -> None:
    import requests

    from pipeline.models.encoding import encode_tile

    assert requests.get(sm.url + "/ping", timeout=5).json()["status"] == "healthy"
    batch, _ = tiles(1)
    answer = requests.post(sm.url + "/invocations", data=encode_tile(batch[0]), timeout=5).json()
    assert answer["type"] == "FeatureCollection"
    assert [f["properties"]["imageBBox"] for f in answer["features"]] == expected(batch)[0].boxes.tolist()
    assert json.loads(requests.get(sm.url + "/stats", timeout=5).text)["requests"] >= 1


def test_serve_model_reads_chunked_bodies_and_keeps_the_connection(sm, monkeypatch) -> None:
    # OSML's HTTP detector streams each tile as a file: Transfer-Encoding chunked, no Content-Length.
    import requests

    from pipeline.models.encoding import encode_tile

    batch, _ = tiles(2)
    with requests.Session() as session:
        for tile in batch:
            data = encode_tile(tile)
            chunks = (data[i : i + 1000] for i in range(0, len(data), 1000))
            response = session.post(sm.url + "/invocations", data=chunks, timeout=5)
            assert response.request.headers["Transfer-Encoding"] == "chunked"
            assert response.status_code == 200
            boxes = [f["properties"]["imageBBox"] for f in response.json()["features"]]
            assert boxes == bright_objects(tile).boxes.tolist()
        before = sm.stats.requests
        monkeypatch.setattr("pipeline.models.server.MAX_REQUEST_BYTES", 4096)
        too_big = (b"x" * 4096 for _ in range(3))
        assert session.post(sm.url + "/invocations", data=too_big, timeout=5).status_code == 413
        assert sm.stats.requests == before  # refused before it reached the model


def test_serve_model_command_answers_ping_and_invocations() -> None:
    import subprocess
    import sys

    import requests

    from pipeline.models.encoding import encode_tile

    command = [sys.executable, "-m", "pipeline", "-q", "serve-model", "--model", "centerpoint", "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        url = line.split(" on ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        assert requests.get(url + "/ping", timeout=5).json()["model"] == "centerpoint"
        answer = requests.post(url + "/invocations", data=encode_tile(np.zeros((100, 50, 1), np.uint8)),
                               timeout=5).json()
        assert answer["features"][0]["properties"]["imageBBox"] == [20.0, 40.0, 30.0, 60.0]
    finally:
        process.terminate()
        process.wait(10)
