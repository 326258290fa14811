"""Shared machinery of the endpoint targets (SageMaker, HTTP, TF Serving).

An :class:`EndpointAdapter` encodes each tile (``imageProcessorTileFormat``/``Compression``),
sends it in a concurrency slot (:mod:`pipeline.models.retry`), retries transient faults and
parses the OSML GeoJSON answer. A tile that still fails comes back as its exception, so the job
lists it and goes on.

Settings that depend on the client's environment (endpoint URLs, region, the concurrency cap)
are resolved once in the client by :func:`resolve_model` into ``ModelSpec.options``, which
travels to the workers with the spec. Credentials never do: each worker signs with its own, or
assumes ``assumedRole`` itself (:func:`aws_session`).
"""

from __future__ import annotations

import importlib
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from pipeline.detections import Detections
from pipeline.models.base import ModelAdapter, ModelError, ModelSpec
from pipeline.models.encoding import CONTENT_TYPES, check_format, encode_tile
from pipeline.models.results import MalformedResponse, parse_feature_collection
from pipeline.models.retry import (
    DEFAULT_CONCURRENCY,
    METRICS,
    RetryPolicy,
    Slots,
    ThrottledError,
    TimeoutFault,
    TransientError,
    call_with_retries,
)

log = logging.getLogger(__name__)


def resolve_model(spec: ModelSpec) -> ModelSpec:
    """``spec`` with its client-side settings resolved (the adapter module's ``resolve``)."""
    from pipeline.models import adapter_factory

    module = importlib.import_module(adapter_factory(spec.type).__module__)
    resolve = getattr(module, "resolve", None)
    return resolve(spec) if resolve is not None else spec


def with_options(spec: ModelSpec, **options: Any) -> ModelSpec:
    """A copy of ``spec`` with more resolved options."""
    from dataclasses import replace

    return replace(spec, options={**spec.options, **options})


def concurrency_parameter(spec: ModelSpec) -> int | None:
    """``maxConcurrency`` from the spec (options or ``imageProcessorParameters``), if given."""
    value = spec.options.get("maxConcurrency", spec.parameters.get("maxConcurrency"))
    if value is None:
        return None
    try:
        cap = int(value)
    except (TypeError, ValueError):
        cap = 0
    if cap < 1:
        raise ModelError(f"maxConcurrency must be a positive integer, got {value!r}")
    return cap


def aws_options(spec: ModelSpec, service_env: str) -> dict[str, Any]:
    """Endpoint URLs and region from the client's settings (nothing secret: they travel in
    tasks). An ``assumedRole`` is assumed here once (if this process has credentials), so that a
    role that cannot be assumed fails in one line before any task runs; each worker assumes it
    again itself (:func:`aws_session`)."""
    from pipeline import aws

    options: dict[str, Any] = {
        "endpointUrl": os.environ.get(service_env) or os.environ.get("AWS_ENDPOINT_URL"),
        "region": aws.region(),
        "stsUrl": aws.endpoint_url("sts"),
    }
    if spec.assumed_role and aws.has_credentials():  # else only the workers can assume it
        try:
            aws_session(with_options(spec, **options))
        except aws.AwsError as exc:
            message = str(exc).replace(f"cannot assume role {spec.assumed_role}: ", "")
            raise ModelError(
                f"cannot assume imageProcessor.assumedRole {spec.assumed_role}: {message}"
            ) from None
    return options


def aws_session(spec: ModelSpec) -> Any:
    """This process's boto3 session for ``spec``: its own credentials, or ``assumedRole``'s
    renewed before they expire (:func:`pipeline.aws.session`)."""
    from pipeline import aws

    return aws.session(spec.assumed_role, purpose="model", region_name=spec.options.get("region"),
                       sts_url=spec.options.get("stsUrl"))


def boto_client(service: str, spec: ModelSpec, policy: RetryPolicy, pool: int,
                endpoint_url: str | None = None) -> Any:
    """A boto3 client with this process's credentials (:func:`aws_session`) and botocore's own
    retries off (we retry), except that a call AWS refuses as expired is signed again with
    renewed credentials and sent once more."""
    from botocore.config import Config

    from pipeline import aws

    session = aws_session(spec)
    config = Config(
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=min(10.0, policy.timeout),
        read_timeout=policy.timeout,
        max_pool_connections=max(10, pool),
    )
    url = endpoint_url if endpoint_url is not None else spec.options.get("endpointUrl")
    client = session.client(service, endpoint_url=url or None, config=config)
    aws.retry_expired_once(client, aws.credentials(session))
    return client


def classify_boto_error(exc: Exception, what: str) -> ModelError:
    """A botocore exception as Throttled/Timeout/Transient (retried) or ModelError (not)."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    if isinstance(exc, ReadTimeoutError | ConnectTimeoutError):
        return TimeoutFault(f"{what}: timed out")
    if isinstance(exc, EndpointConnectionError | ConnectionClosedError):
        return TransientError(f"{what}: connection failed ({_first_line(exc)})")
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        detail = (str(error.get("Message") or "").strip().splitlines() or [""])[0]
        message = f"{what}: {code or status}" + (f" ({detail})" if detail else "")
        if status == 429 or "Throttl" in code or code == "TooManyRequestsException":
            return ThrottledError(message)
        if status >= 500 or code in ("ServiceUnavailable", "InternalFailure", "ModelNotReadyException",
                                     "InternalDependencyException", "ModelError"):
            return TransientError(message)
        return ModelError(message)
    return TransientError(f"{what}: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _outcome(future: Future[Any]) -> Any:
    exc = future.exception()
    return exc if exc is not None else future.result()


class EndpointAdapter(ModelAdapter):
    """One request per tile, up to the concurrency cap, with retries; see module docstring."""

    operation = "ENDPOINT:invoke"
    slot_at_send = False  #: True: :meth:`invoke` takes its concurrency slot itself

    def __init__(self, spec: ModelSpec):
        check_format(spec.tile_format, spec.tile_compression)
        self.spec = spec
        self.tile_format = spec.tile_format.upper()
        self.tile_compression = spec.tile_compression.upper()
        self.content_type = CONTENT_TYPES[self.tile_format]
        self.policy = RetryPolicy.from_parameters(spec.parameters)
        self.cap = concurrency_parameter(spec) or DEFAULT_CONCURRENCY
        self.slots = Slots(f"{spec.type}:{spec.name}", self.cap)
        self.batch_size = max(16, 2 * self.cap)  # tiles per predict call: enough to fill the pool
        # twice the cap: while ``cap`` requests are in flight, the other threads encode the next
        # tiles and wait for a slot, so that a freed slot is refilled at once (the slot, not the
        # pool, bounds what is in flight)
        self._pool = ThreadPoolExecutor(2 * self.cap, thread_name_prefix=spec.type.lower())

    def invoke(self, payload: Any) -> bytes:
        """Send one encoded tile; raise Transient/Throttled/Timeout errors or ModelError."""
        raise NotImplementedError

    def prepare(self, payload: bytes) -> Any:
        """What :meth:`invoke` sends, built before the tile waits for a concurrency slot."""
        return payload

    def encode(self, tile: np.ndarray) -> bytes:
        return encode_tile(tile, self.tile_format, self.tile_compression)

    def parse(self, body: bytes, tile: np.ndarray) -> Detections:
        try:
            return parse_feature_collection(body, tile.shape[1], tile.shape[0])
        except MalformedResponse:
            METRICS.count(self.operation, "malformed")
            raise

    def _tile(self, tile: np.ndarray) -> Detections:
        payload = self.prepare(self.encode(tile))
        slots = None if self.slot_at_send else self.slots
        body = call_with_retries(lambda: self.invoke(payload), self.policy, slots, self.operation)
        return self.parse(body, tile)

    def predict(self, tiles: np.ndarray, offsets: np.ndarray) -> list[Detections | BaseException]:
        self.slots.bind()
        futures = [self._pool.submit(self._tile, tile) for tile in tiles]
        return [_outcome(f) for f in futures]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def validate_url_target(spec: ModelSpec) -> None:
    """Common checks plus: ``imageProcessor.name`` is an http(s) URL (HTTP, TF Serving)."""
    validate_common(spec)
    if not spec.name.startswith(("http://", "https://")):
        raise ModelError(
            f"{spec.type} imageProcessor.name must be an http(s) URL, got {spec.name!r}"
        )


def validate_common(spec: ModelSpec) -> None:
    """Checks every endpoint target shares: tile format/compression, numbers."""
    check_format(spec.tile_format, spec.tile_compression)
    RetryPolicy.from_parameters(spec.parameters)
    concurrency_parameter(spec)
