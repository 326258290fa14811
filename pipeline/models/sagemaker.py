"""``SM_ENDPOINT``: SageMaker real-time inference through ``sagemaker-runtime`` ``invoke_endpoint``.

``imageProcessorParameters`` may hold the ``invoke_endpoint`` parameters that OSML passes
(:data:`PASS_THROUGH`) besides the runner's own keys. The runtime URL follows
``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME``/``AWS_ENDPOINT_URL``. Without ``maxConcurrency`` the cap is
the endpoint's current instance count (``describe_endpoint``) × ``perInstanceConcurrency``
(default 2), or 8 with a warning if the endpoint cannot be described.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.models.base import RUNNER_PARAMETERS, ModelAdapter, ModelError, ModelSpec
from pipeline.models.endpoint import (
    EndpointAdapter,
    aws_options,
    boto_client,
    classify_boto_error,
    concurrency_parameter,
    validate_common,
    with_options,
)
from pipeline.models.retry import DEFAULT_CONCURRENCY, PER_INSTANCE_CONCURRENCY, SlotAtSend, ThrottledError

log = logging.getLogger(__name__)

PASS_THROUGH = (
    "ContentType", "Accept", "CustomAttributes", "TargetModel", "TargetVariant",
    "TargetContainerHostname", "InferenceId", "InferenceComponentName",
)


def check_parameters(spec: ModelSpec, allowed: tuple[str, ...]) -> dict[str, str]:
    """The pass-through parameters; a one-line error naming any other key."""
    unknown = sorted(k for k in spec.parameters if k not in allowed and k not in RUNNER_PARAMETERS)
    if unknown:
        raise ModelError(
            f"imageProcessorParameters.{unknown[0]} is not supported by {spec.type} "
            f"(allowed: {', '.join(allowed)} and runner keys maxConcurrency, maxRetries, timeout, ...)"
        )
    return {k: str(v) for k, v in spec.parameters.items() if k in allowed}


def endpoint_capacity(spec: ModelSpec) -> int:
    """Instances × per-instance concurrency from ``describe_endpoint``, or the default."""
    import boto3

    try:
        per_instance = int(spec.parameters.get("perInstanceConcurrency", PER_INSTANCE_CONCURRENCY))
    except (TypeError, ValueError):
        raise ModelError("imageProcessorParameters.perInstanceConcurrency must be an integer") from None
    try:
        session = boto3.session.Session(
            region_name=spec.options.get("region"), **spec.options.get("credentials", {})
        )
        answer = session.client("sagemaker").describe_endpoint(EndpointName=spec.name)
        instances = sum(int(v.get("CurrentInstanceCount", 0) or 0) for v in answer["ProductionVariants"])
    except Exception as exc:  # noqa: BLE001 - no permission, no endpoint, no network: use a default
        text = str(exc).strip().splitlines()
        log.warning("cannot describe SageMaker endpoint %s (%s); concurrency cap %d",
                    spec.name, text[0] if text else type(exc).__name__, DEFAULT_CONCURRENCY)
        return DEFAULT_CONCURRENCY
    return max(1, instances * per_instance)


class SageMakerEndpoint(EndpointAdapter):
    operation = "SM_ENDPOINT:invoke"

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        self.extra: dict[str, Any] = check_parameters(spec, PASS_THROUGH)
        self.extra.setdefault("ContentType", self.content_type)
        self.extra.setdefault("Accept", "application/json")
        self.client = boto_client("sagemaker-runtime", spec, self.policy, self.cap)
        self.send_slot = SlotAtSend(self.slots)
        self.send_slot.register(self.client, "before-send.sagemaker-runtime.InvokeEndpoint")

    slot_at_send = True  # taken once botocore has built and signed the request

    def invoke(self, payload: bytes) -> bytes:
        try:
            answer = self.client.invoke_endpoint(EndpointName=self.spec.name, Body=payload, **self.extra)
            return bytes(answer["Body"].read())
        except Exception as exc:  # noqa: BLE001 - classified: retried or one line
            error = classify_boto_error(exc, f"SageMaker endpoint {self.spec.name}")
            if isinstance(error, ThrottledError):
                self.send_slot.throttled()
            raise error from None
        finally:
            self.send_slot.done()


def validate(spec: ModelSpec) -> None:
    validate_common(spec)
    check_parameters(spec, PASS_THROUGH)


def resolve(spec: ModelSpec) -> ModelSpec:
    """Runtime URL, region, assumed-role credentials and the concurrency cap (in the client)."""
    spec = with_options(spec, **aws_options(spec, "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME"))
    cap = concurrency_parameter(spec) or endpoint_capacity(spec)
    return with_options(spec, maxConcurrency=cap)


def create(spec: ModelSpec) -> ModelAdapter:
    return SageMakerEndpoint(spec)
