"""``TFSERVING_ENDPOINT``: TF Serving REST predict, several tiles per request.

``imageProcessor.name`` is the model URL (``http://host:8501/v1/models/<model>``; ``:predict`` is
added). The body is ``{"instances": [{"b64": <encoded tile>}, ...]}`` with up to ``batchSize``
tiles (default 8); the answer's ``detection_boxes`` (normalised ``y1, x1, y2, x2``),
``detection_scores`` and ``detection_classes`` become boxes, kept where the score reaches
``scoreThresholds[<class>]`` (or ``scoreThresholds.default``), as chip-n-scale does.
``classNames`` maps class ids to names.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np

from pipeline.detections import Detections
from pipeline.models.base import ModelAdapter, ModelError, ModelSpec
from pipeline.models.endpoint import EndpointAdapter, _outcome, validate_url_target
from pipeline.models.http import post, prepare, resolve, session_for
from pipeline.models.results import MalformedResponse, parse_tfserving
from pipeline.models.retry import METRICS, call_with_retries

DEFAULT_BATCH = 8

__all__ = ["TFServingEndpoint", "create", "resolve", "validate"]


def _mapping(spec: ModelSpec, key: str) -> dict[str, Any]:
    value = spec.parameters.get(key, {})
    if not isinstance(value, dict):
        raise ModelError(f"imageProcessorParameters.{key} must be a mapping")
    return value


class TFServingEndpoint(EndpointAdapter):
    operation = "TFSERVING_ENDPOINT:predict"

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        self.url = spec.name if spec.name.endswith(":predict") else spec.name.rstrip("/") + ":predict"
        self.request_batch = spec.batch_size or DEFAULT_BATCH
        self.batch_size = self.request_batch * self.cap
        self.thresholds = {str(k): float(v) for k, v in _mapping(spec, "scoreThresholds").items()}
        self.class_names = {int(k): str(v) for k, v in _mapping(spec, "classNames").items()}
        self.signature = spec.parameters.get("signatureName")
        self.session = session_for(self.cap)
        self.settings = self.session.merge_environment_settings(self.url, {}, True, None, None)

    def _batch(self, tiles: np.ndarray) -> list[Detections]:
        body: dict[str, Any] = {
            "instances": [{"b64": base64.b64encode(self.encode(t)).decode("ascii")} for t in tiles]
        }
        if self.signature:
            body["signature_name"] = self.signature
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        what = f"TF Serving {self.url}"
        request = prepare(self.session, self.url, data, headers)
        answer = call_with_retries(
            lambda: post(self.session, self.url, request, headers, self.policy.timeout, what, self.settings),
            self.policy, self.slots, self.operation,
        )
        try:
            return parse_tfserving(answer, tiles.shape[2], tiles.shape[1], len(tiles),
                                   self.thresholds, self.class_names)
        except MalformedResponse:
            METRICS.count(self.operation, "malformed")
            raise

    def predict(self, tiles: np.ndarray, offsets: np.ndarray) -> list[Detections | BaseException]:
        self.slots.bind()
        step = self.request_batch
        futures = [self._pool.submit(self._batch, tiles[i : i + step]) for i in range(0, len(tiles), step)]
        results: list[Detections | BaseException] = []
        for start, future in zip(range(0, len(tiles), step), futures, strict=True):
            outcome = _outcome(future)
            count = len(tiles[start : start + step])
            results.extend([outcome] * count if isinstance(outcome, BaseException) else outcome)
        return results

    def close(self) -> None:
        super().close()
        self.session.close()


def validate(spec: ModelSpec) -> None:
    validate_url_target(spec)
    for key in ("scoreThresholds", "classNames"):
        _mapping(spec, key)


def create(spec: ModelSpec) -> ModelAdapter:
    return TFServingEndpoint(spec)
