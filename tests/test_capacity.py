"""SageMaker endpoint capacity as OSML Model Runner 3 declares it, against moto's SageMaker
(a real moto server process: DescribeEndpoint with variants, weights and serverless settings,
ListTags with ``osml:instance-concurrency``)."""

from __future__ import annotations

import logging
import random
import uuid
from collections import Counter
from typing import Any

import boto3
import pytest

from pipeline.models import ModelError, ModelSpec, clear_cache, load_model
from pipeline.models.endpoint import resolve_model
from pipeline.models.sagemaker import choose_variant, endpoint_capacity


def instances(name: str, count: int, weight: float = 1.0) -> dict[str, Any]:
    return {"VariantName": name, "ModelName": "m", "InitialInstanceCount": count,
            "InstanceType": "ml.m5.large", "InitialVariantWeight": weight}


@pytest.fixture
def endpoint(aws: str):  # noqa: ANN201
    """``endpoint(variants, tags)`` creates an endpoint in moto and returns its name."""
    sm = boto3.client("sagemaker")
    sm.create_model(ModelName="m", ExecutionRoleArn="arn:aws:iam::123456789012:role/model",
                    PrimaryContainer={"Image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/m:1"})

    def create(variants: list[dict[str, Any]], tags: dict[str, str] | None = None) -> str:
        name = f"ep-{uuid.uuid4().hex[:8]}"
        sm.create_endpoint_config(EndpointConfigName=name, ProductionVariants=variants)
        sm.create_endpoint(EndpointName=name, EndpointConfigName=name,
                           Tags=[{"Key": k, "Value": v} for k, v in (tags or {}).items()])
        return name

    yield create
    clear_cache()


def resolved(name: str, **parameters: Any) -> dict[str, Any]:
    return resolve_model(ModelSpec("SM_ENDPOINT", name, parameters)).options


def test_instances_times_the_tagged_concurrency_else_two(endpoint) -> None:
    tagged = endpoint([instances("main", 3)], {"osml:instance-concurrency": "4"})
    options = resolved(tagged)
    assert (options["maxConcurrency"], options["targetVariant"]) == (3 * 4, "main")
    assert resolved(endpoint([instances("main", 3)]))["maxConcurrency"] == 3 * 2  # no tag
    # the request's own settings win: perInstanceConcurrency over the tag, maxConcurrency over all
    assert resolved(tagged, perInstanceConcurrency=5)["maxConcurrency"] == 3 * 5
    assert resolved(tagged, maxConcurrency=7)["maxConcurrency"] == 7


def test_a_tag_that_is_not_a_number_gives_two_per_instance(endpoint, caplog) -> None:
    name = endpoint([instances("main", 3)], {"osml:instance-concurrency": "lots"})
    with caplog.at_level(logging.WARNING, logger="pipeline.models.sagemaker"):
        assert resolved(name)["maxConcurrency"] == 3 * 2
    assert "osml:instance-concurrency='lots' is not an integer" in caplog.text


def test_serverless_capacity_is_its_max_concurrency(endpoint) -> None:
    name = endpoint([{"VariantName": "sv", "ModelName": "m",
                      "ServerlessConfig": {"MemorySizeInMB": 2048, "MaxConcurrency": 7}}],
                    {"osml:instance-concurrency": "4"})  # not for serverless variants
    assert (resolved(name)["maxConcurrency"], resolved(name)["targetVariant"]) == (7, "sv")


def test_the_target_variant_named_sizes_the_job(endpoint) -> None:
    name = endpoint([instances("a", 3, 1.0), instances("b", 1, 3.0)],
                    {"osml:instance-concurrency": "4"})
    assert resolved(name, TargetVariant="a")["maxConcurrency"] == 3 * 4
    assert resolved(name, TargetVariant="b")["maxConcurrency"] == 1 * 4
    one_line = rf"^SageMaker endpoint {name} has no variant 'c' \(variants: a, b\)$"
    with pytest.raises(ModelError, match=one_line):
        resolved(name, TargetVariant="c")
    # asynchronous inference cannot name a variant: the whole endpoint's capacity
    spec = resolve_model(ModelSpec("SM_ENDPOINT", name))
    assert endpoint_capacity(spec, choose=False).requests == 3 * 4 + 1 * 4


def test_a_variant_is_chosen_by_weight_and_the_requests_name_it(endpoint) -> None:
    name = endpoint([instances("a", 3, 1.0), instances("b", 1, 3.0)],
                    {"osml:instance-concurrency": "4"})
    variants = boto3.client("sagemaker").describe_endpoint(EndpointName=name)["ProductionVariants"]
    rng = random.Random(7)
    drawn = Counter(choose_variant(variants, rng)["VariantName"] for _ in range(4000))
    # weights 1 : 3 -> b with probability 0.75; 5 standard deviations of a binomial(4000, 0.75)
    assert abs(drawn["b"] - 3000) < 5 * (4000 * 0.75 * 0.25) ** 0.5 and set(drawn) == {"a", "b"}
    # every weight 0: all alike
    zero = [{**v, "CurrentWeight": 0.0} for v in variants]
    assert set(Counter(choose_variant(zero, rng)["VariantName"] for _ in range(200))) == {"a", "b"}
    # the job: capacity of the chosen variant, and its requests go to that variant
    random.seed(11)  # the draw without an rng (deterministic here: both variants come up)
    seen = set()
    for _ in range(20):
        options = resolved(name)
        seen.add(options["targetVariant"])
        assert options["maxConcurrency"] == {"a": 12, "b": 4}[options["targetVariant"]]
        spec = resolve_model(ModelSpec("SM_ENDPOINT", name))
        assert load_model(spec).extra["TargetVariant"] == spec.options["targetVariant"]  # type: ignore[attr-defined]
    assert seen == {"a", "b"}
