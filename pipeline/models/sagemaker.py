"""``SM_ENDPOINT``: SageMaker real-time inference through ``sagemaker-runtime`` ``invoke_endpoint``.

``imageProcessorParameters`` may hold the ``invoke_endpoint`` parameters that OSML passes
(:data:`PASS_THROUGH`) besides the runner's own keys. The runtime URL follows
``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME``/``AWS_ENDPOINT_URL``.

The concurrency cap is ``imageProcessorParameters.maxConcurrency`` where given; else the
endpoint's capacity as OSML Model Runner 3 declares it (:func:`endpoint_capacity`): the job runs
on one production variant, the ``TargetVariant`` named or one chosen at random by the variants'
``CurrentWeight`` (and the job's requests name it, as OSML's do), and that variant's capacity is
its ``MaxConcurrency`` when it is serverless, else its ``CurrentInstanceCount`` × the requests
one instance takes at once: ``perInstanceConcurrency``, else the endpoint's
``osml:instance-concurrency`` tag, else 2. An endpoint that cannot be described gets 8, with a
warning.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

from pipeline.models.base import RUNNER_PARAMETERS, ModelAdapter, ModelError, ModelSpec
from pipeline.models.endpoint import (
    EndpointAdapter,
    aws_options,
    aws_session,
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


def invoke_parameters(spec: ModelSpec, allowed: tuple[str, ...], content_type: str) -> dict[str, Any]:
    """The keyword arguments of every invoke call: the pass-through parameters, with
    ``ContentType`` (the tile format's) and ``Accept`` (JSON) where not given."""
    extra: dict[str, Any] = check_parameters(spec, allowed)
    extra.setdefault("ContentType", content_type)
    extra.setdefault("Accept", "application/json")
    return extra


def validate_endpoint(spec: ModelSpec, allowed: tuple[str, ...]) -> None:
    """The checks of every SageMaker target: the common ones and the pass-through keys."""
    validate_common(spec)
    check_parameters(spec, allowed)


def runtime_options(spec: ModelSpec) -> dict[str, Any]:
    """Region and endpoint URLs, the ``sagemaker-runtime`` one from ``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME``."""
    return aws_options(spec, "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME")


#: the endpoint tag that declares how many requests one instance takes at once (OSML 3)
INSTANCE_CONCURRENCY_TAG = "osml:instance-concurrency"


@dataclass(frozen=True)
class Capacity:
    """How many requests an endpoint takes at once, and the variant they go to (None: any)."""

    requests: int
    variant: str | None = None


def variant_capacity(variant: dict[str, Any], per_instance: int) -> int:
    """A ``describe_endpoint`` production variant's capacity: a serverless variant's
    ``MaxConcurrency``, else ``CurrentInstanceCount × per_instance``."""
    serverless = variant.get("CurrentServerlessConfig")
    if serverless:
        return int(serverless.get("MaxConcurrency", 0) or 0)
    return int(variant.get("CurrentInstanceCount", 0) or 0) * per_instance


def choose_variant(variants: list[dict[str, Any]], rng: random.Random | None = None) -> dict[str, Any]:
    """One variant, drawn with probability proportional to its ``CurrentWeight`` (1 when
    absent; all alike when every weight is 0), as SageMaker routes requests that name none."""
    weights = [max(0.0, float(v.get("CurrentWeight", 1.0) or 0.0)) for v in variants]
    if not any(weights):
        weights = [1.0] * len(variants)
    return (rng or random).choices(variants, weights=weights, k=1)[0]  # noqa: S311 - routing, not secrets


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _per_instance(spec: ModelSpec, tags: dict[str, str]) -> int:
    """``perInstanceConcurrency``, else the ``osml:instance-concurrency`` tag, else 2."""
    if "perInstanceConcurrency" in spec.parameters:
        try:
            return int(spec.parameters["perInstanceConcurrency"])
        except (TypeError, ValueError):
            raise ModelError("imageProcessorParameters.perInstanceConcurrency must be an integer") from None
    if INSTANCE_CONCURRENCY_TAG in tags:
        try:
            return int(tags[INSTANCE_CONCURRENCY_TAG])
        except ValueError:
            log.warning("SageMaker endpoint %s: tag %s=%r is not an integer; %d per instance",
                        spec.name, INSTANCE_CONCURRENCY_TAG, tags[INSTANCE_CONCURRENCY_TAG],
                        PER_INSTANCE_CONCURRENCY)
    return PER_INSTANCE_CONCURRENCY


def endpoint_capacity(spec: ModelSpec, choose: bool = True, rng: random.Random | None = None) -> Capacity:
    """The capacity of the variant the job's requests go to (see the module docstring); with
    ``choose=False`` and no ``TargetVariant`` (asynchronous inference, which cannot name one),
    the sum over all variants."""
    named = spec.parameters.get("TargetVariant")
    try:
        sagemaker = aws_session(spec).client("sagemaker")
        answer = sagemaker.describe_endpoint(EndpointName=spec.name)
    except Exception as exc:  # noqa: BLE001 - no permission, no endpoint, no network: use a default
        log.warning("cannot describe SageMaker endpoint %s (%s); concurrency cap %d",
                    spec.name, _first_line(exc), DEFAULT_CONCURRENCY)
        return Capacity(DEFAULT_CONCURRENCY, named)
    variants: list[dict[str, Any]] = answer.get("ProductionVariants") or []
    tags: dict[str, str] = {}
    instances = any(not v.get("CurrentServerlessConfig") for v in variants)
    if instances and "perInstanceConcurrency" not in spec.parameters:
        try:
            listed = sagemaker.list_tags(ResourceArn=answer["EndpointArn"]).get("Tags", [])
            tags = {t["Key"]: t["Value"] for t in listed}
        except Exception as exc:  # noqa: BLE001 - as OSML: go on without the tags
            log.warning("cannot list the tags of SageMaker endpoint %s (%s); %d requests per instance",
                        spec.name, _first_line(exc), PER_INSTANCE_CONCURRENCY)
    per_instance = _per_instance(spec, tags)
    if named:
        chosen = [v for v in variants if v.get("VariantName") == named]
        if not chosen:
            names = ", ".join(str(v.get("VariantName")) for v in variants) or "none"
            raise ModelError(f"SageMaker endpoint {spec.name} has no variant {named!r} (variants: {names})")
        return Capacity(max(1, variant_capacity(chosen[0], per_instance)), str(named))
    if not variants:
        return Capacity(DEFAULT_CONCURRENCY)
    if not choose:
        return Capacity(max(1, sum(variant_capacity(v, per_instance) for v in variants)))
    variant = choose_variant(variants, rng)
    return Capacity(max(1, variant_capacity(variant, per_instance)), str(variant["VariantName"]))


class SageMakerEndpoint(EndpointAdapter):
    operation = "SM_ENDPOINT:invoke"

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        self.extra = invoke_parameters(spec, PASS_THROUGH, self.content_type)
        if spec.options.get("targetVariant"):  # the variant the job's capacity was sized for
            self.extra.setdefault("TargetVariant", spec.options["targetVariant"])
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
    validate_endpoint(spec, PASS_THROUGH)


def resolve(spec: ModelSpec) -> ModelSpec:
    """Runtime URL, region and the concurrency cap (in the client)."""
    spec = with_options(spec, **runtime_options(spec))
    cap = concurrency_parameter(spec)
    if cap is not None:
        return with_options(spec, maxConcurrency=cap)
    capacity = endpoint_capacity(spec)  # and the variant the job's requests name
    return with_options(spec, maxConcurrency=capacity.requests, targetVariant=capacity.variant)


def create(spec: ModelSpec) -> ModelAdapter:
    return SageMakerEndpoint(spec)
