"""``SM_ASYNC_ENDPOINT``: SageMaker asynchronous inference, as OSML's async extension does it.

Each tile is uploaded under ``imageProcessorParameters.s3InputLocation`` (``s3://bucket/prefix``),
submitted with ``invoke_endpoint_async``, and its output location (and failure location) is
polled with exponential backoff (``pollInterval``, default 0.5 s, doubling up to 5 s) until
``pollTimeout`` (default 300 s). Submission and polling run in separate thread pools, so slow
inference never holds up submission. Objects are then deleted per ``cleanupPolicy``:
``immediate`` (default), ``delayed`` (at the end of the job, :func:`cleanup_pending`) or
``disabled``. Failures are classified: :class:`AsyncSubmissionError`, :class:`AsyncTimeoutError`,
:class:`AsyncInferenceError` and :class:`AsyncS3Error` (the class names appear in the summary's
failed-tile reasons and as ``SM_ASYNC_ENDPOINT:errors`` metrics).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any
from urllib.parse import urlparse

import numpy as np

from pipeline.detections import Detections
from pipeline.models.base import ModelAdapter, ModelError, ModelSpec
from pipeline.models.endpoint import (
    EndpointAdapter,
    _outcome,
    boto_client,
    classify_boto_error,
    concurrency_parameter,
    with_options,
)
from pipeline.models.retry import METRICS, call_with_retries
from pipeline.models.sagemaker import endpoint_capacity, invoke_parameters, runtime_options, validate_endpoint

log = logging.getLogger(__name__)

PASS_THROUGH = (
    "ContentType", "Accept", "CustomAttributes", "InferenceId", "RequestTTLSeconds",
    "InvocationTimeoutSeconds",
)
CLEANUP_POLICIES = ("immediate", "delayed", "disabled")
_EXTENSIONS = {"NITF": "ntf", "GTIFF": "tif", "PNG": "png", "JPEG": "jpg"}


class AsyncSubmissionError(ModelError):
    kind = "submission"


class AsyncTimeoutError(ModelError):
    kind = "timeout"


class AsyncInferenceError(ModelError):
    kind = "inference"


class AsyncS3Error(ModelError):
    kind = "s3"


def _s3(url: str, what: str) -> tuple[str, str]:
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ModelError(f"{what} must be an s3://bucket/prefix URL, got {url!r}")
    return parsed.netloc, parsed.path.strip("/")


_adapters: weakref.WeakSet[AsyncEndpoint] = weakref.WeakSet()


class AsyncEndpoint(EndpointAdapter):
    operation = "SM_ASYNC_ENDPOINT:invoke"

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        self.extra = invoke_parameters(spec, PASS_THROUGH, self.content_type)
        self.bucket, self.prefix = _s3(str(spec.parameters.get("s3InputLocation", "")),
                                       "imageProcessorParameters.s3InputLocation")
        self.poll_timeout = float(spec.parameters.get("pollTimeout", 300))
        self.poll_interval = float(spec.parameters.get("pollInterval", 0.5))
        self.cleanup = str(spec.parameters.get("cleanupPolicy", "immediate")).lower()
        self.runtime = boto_client("sagemaker-runtime", spec, self.policy, self.cap)
        self.s3 = boto_client("s3", spec, self.policy, 4 * self.cap, spec.options.get("s3Url"))
        self._poll_pool = ThreadPoolExecutor(4 * self.cap, thread_name_prefix="sm-async-poll")
        self.pending: list[str] = []
        self._pending_lock = threading.Lock()
        _adapters.add(self)

    # ------------------------------------------------------------------ steps
    def _fail(self, error: ModelError) -> ModelError:
        METRICS.count("SM_ASYNC_ENDPOINT:errors", getattr(error, "kind", "other"))
        return error

    def _submit(self, tile: np.ndarray) -> tuple[str, list[str]]:
        """Upload and invoke; returns (output location, failure location)."""
        key = f"{self.prefix}/{uuid.uuid4().hex}.{_EXTENSIONS[self.tile_format]}".lstrip("/")
        try:
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=self.encode(tile))
        except Exception as exc:  # noqa: BLE001 - classified
            raise self._fail(AsyncS3Error(f"cannot upload tile to s3://{self.bucket}/{key}: "
                                          f"{classify_boto_error(exc, 'S3')}")) from None
        location = f"s3://{self.bucket}/{key}"

        def invoke() -> dict[str, Any]:
            try:
                return dict(self.runtime.invoke_endpoint_async(
                    EndpointName=self.spec.name, InputLocation=location, **self.extra))
            except Exception as exc:  # noqa: BLE001 - classified: retried or one line
                raise classify_boto_error(exc, f"SageMaker async endpoint {self.spec.name}") from None

        try:
            answer = call_with_retries(invoke, self.policy, self.slots, self.operation)
        except ModelError as exc:
            self._remove([location])
            raise self._fail(AsyncSubmissionError(str(exc))) from None
        output = answer.get("OutputLocation")
        if not output:
            raise self._fail(AsyncSubmissionError(f"{self.spec.name}: no OutputLocation in the answer"))
        return output, [location, answer.get("FailureLocation") or ""]

    def _read(self, url: str) -> bytes | None:
        """The object's bytes, or None while it does not exist."""
        from botocore.exceptions import ClientError

        bucket, key = _s3(url, "async output location")
        try:
            return bytes(self.s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise self._fail(AsyncS3Error(f"cannot read {url}: {classify_boto_error(exc, 'S3')}")) from None
        except Exception as exc:  # noqa: BLE001 - connection faults: one line
            raise self._fail(AsyncS3Error(f"cannot read {url}: {classify_boto_error(exc, 'S3')}")) from None

    def _poll(self, tile: np.ndarray, submitted: tuple[str, list[str]]) -> Detections:
        output, others = submitted
        failure = others[1]
        deadline = time.monotonic() + self.poll_timeout
        interval = self.poll_interval
        began = time.perf_counter()
        try:
            while True:
                body = self._read(output)
                if body is not None:
                    METRICS.latency("SM_ASYNC_ENDPOINT:result", time.perf_counter() - began)
                    return self.parse(body, tile)
                if failure:
                    message = self._read(failure)
                    if message is not None:
                        text = (message.decode("utf-8", "replace").strip().splitlines() or [""])[0]
                        raise self._fail(AsyncInferenceError(f"{self.spec.name}: inference failed ({text})"))
                if time.monotonic() + interval > deadline:
                    raise self._fail(AsyncTimeoutError(
                        f"{self.spec.name}: no result after {self.poll_timeout:g} s at {output}"))
                time.sleep(interval)
                interval = min(interval * 2, 5.0)
        finally:
            self._done([others[0], output, failure])

    # ------------------------------------------------------------------ cleanup
    def _remove(self, urls: list[str]) -> None:
        for url in urls:
            if not url:
                continue
            bucket, key = _s3(url, "object")
            try:
                self.s3.delete_object(Bucket=bucket, Key=key)
            except Exception as exc:  # noqa: BLE001 - cleanup must not fail a tile
                log.warning("cannot delete %s: %s", url, str(exc).splitlines()[0] if str(exc) else exc)

    def _done(self, urls: list[str]) -> None:
        if self.cleanup == "immediate":
            self._remove(urls)
        elif self.cleanup == "delayed":
            with self._pending_lock:
                self.pending.extend(u for u in urls if u)

    def cleanup_pending(self) -> int:
        with self._pending_lock:
            urls, self.pending = self.pending, []
        self._remove(urls)
        return len(urls)

    # ------------------------------------------------------------------ batch
    def predict(self, tiles: np.ndarray, offsets: np.ndarray) -> list[Detections | BaseException]:
        self.slots.bind()
        outcomes: list[Future[Detections]] = []
        for tile in tiles:
            outcome: Future[Detections] = Future()
            submission = self._pool.submit(self._submit, tile)
            submission.add_done_callback(partial(self._then_poll, tile, outcome))
            outcomes.append(outcome)
        return [_outcome(f) for f in outcomes]

    def _then_poll(self, tile: np.ndarray, outcome: Future[Detections], submission: Future[Any]) -> None:
        error = submission.exception()
        if error is not None:
            outcome.set_exception(error)
            return
        poll = self._poll_pool.submit(self._poll, tile, submission.result())
        poll.add_done_callback(partial(_copy, outcome))

    def close(self) -> None:
        super().close()
        self._poll_pool.shutdown(wait=False, cancel_futures=True)


def _copy(target: Future[Any], source: Future[Any]) -> None:
    error = source.exception()
    if error is not None:
        target.set_exception(error)
    else:
        target.set_result(source.result())


def cleanup_pending() -> int:
    """Delete the objects that ``delayed`` adapters of this process kept; returns how many."""
    return sum(adapter.cleanup_pending() for adapter in list(_adapters))


def validate(spec: ModelSpec) -> None:
    validate_endpoint(spec, PASS_THROUGH)
    _s3(str(spec.parameters.get("s3InputLocation", "")), "imageProcessorParameters.s3InputLocation")
    policy = str(spec.parameters.get("cleanupPolicy", "immediate")).lower()
    if policy not in CLEANUP_POLICIES:
        choices = ", ".join(CLEANUP_POLICIES)
        raise ModelError(f"imageProcessorParameters.cleanupPolicy must be one of {choices}, got {policy!r}")
    for key in ("pollTimeout", "pollInterval"):
        try:
            float(spec.parameters.get(key, 1))
        except (TypeError, ValueError):
            raise ModelError(f"imageProcessorParameters.{key} must be a number") from None


def resolve(spec: ModelSpec) -> ModelSpec:
    options = runtime_options(spec)
    options["s3Url"] = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    spec = with_options(spec, **options)
    cap = concurrency_parameter(spec) or endpoint_capacity(spec, choose=False).requests
    return with_options(spec, maxConcurrency=cap)


def create(spec: ModelSpec) -> ModelAdapter:
    return AsyncEndpoint(spec)
