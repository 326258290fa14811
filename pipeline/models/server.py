"""``serve-model``: a built-in model behind the SageMaker container contract, for real sockets.

Paths: ``GET /ping``; ``POST /invocations`` (the container contract) and the runtime paths
``POST /endpoints/<name>/invocations`` and ``/endpoints/<name>/async-invocations`` (input and
output through S3, as SageMaker asynchronous inference does); ``POST /v1/models/<name>:predict``
(TF Serving REST, ``{"instances": [{"b64": ...}]}``); and the control-plane
``DescribeEndpoint`` (``X-Amz-Target: SageMaker.DescribeEndpoint``) and ``ListTags`` (none), so
that one server stands in for an endpoint. Bodies are tiles in any format GDAL reads; answers
are OSML GeoJSON, for ``centerpoint`` and ``flood`` exactly what OSML's test model containers
answer (random ids included).

It can misbehave on purpose (:class:`Behaviour`): latency, a limited number of processing slots,
random 5xx errors, throttling (HTTP 429 ``ThrottlingException``), malformed bodies, and
persistent failures for tiles marked by their first pixel. It counts requests and the peak of
requests in flight (``GET /stats``).
"""

from __future__ import annotations

import base64
import json
import logging
import random
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

import numpy as np

from pipeline.models.base import ModelSpec
from pipeline.models.builtin import create as create_builtin
from pipeline.models.encoding import decode_tile

MAX_REQUEST_BYTES = 256 * 2**20  # a chunked request body larger than this is refused

log = logging.getLogger(__name__)

SERVED_MODELS = ("null", "centerpoint", "flood", "bright-objects", "threshold", "vegetation")


@dataclass
class Behaviour:
    """How the server misbehaves (all off by default)."""

    latency: float = 0.0
    slots: int = 0  #: at most this many tiles processed at once (0: no limit); others queue
    error_rate: float = 0.0
    throttle_rate: float = 0.0
    malformed_rate: float = 0.0
    fail_marker: int | None = None  #: tiles whose first pixel (band 1) equals this always fail (500)
    malformed_marker: int | None = None  #: ... always get a malformed body
    async_fail_marker: int | None = None  #: async: write a failure object for these tiles
    instances: int = 1  #: CurrentInstanceCount that DescribeEndpoint reports
    async_output: str = ""  #: s3://bucket/prefix for async results
    seed: int = 0


@dataclass
class Stats:
    requests: int = 0
    tiles: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    statuses: dict[str, int] = field(default_factory=dict)


class ModelServer(ThreadingHTTPServer):
    """A threading HTTP server holding the model, the behaviour and the counters."""

    daemon_threads = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], model: str = "centerpoint",
                 parameters: dict[str, Any] | None = None, behaviour: Behaviour | None = None):
        super().__init__(address, Handler)
        self.model_name = model
        from pipeline.segmentation.models import BUILTIN_SEGMENTERS, builtin

        spec = ModelSpec("BUILTIN", model, dict(parameters or {}))
        #: a built-in segmenter answers an encoded array (pipeline.segmentation.contract)
        self.segmenter = builtin(spec) if model in BUILTIN_SEGMENTERS else None
        self.adapter: Any = None if self.segmenter else create_builtin(spec, random_ids=True)
        self.behaviour = behaviour or Behaviour()
        self.stats = Stats()
        self.class_ids: dict[str, int] = {}
        self._lock = threading.Lock()
        self._random = random.Random(self.behaviour.seed)
        self._slots = threading.BoundedSemaphore(self.behaviour.slots) if self.behaviour.slots else None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    # ------------------------------------------------------------------ model
    def roll(self, rate: float) -> bool:
        with self._lock:
            return rate > 0 and self._random.random() < rate

    def count(self, status: int) -> None:
        with self._lock:
            self.stats.statuses[str(status)] = self.stats.statuses.get(str(status), 0) + 1

    def enter(self) -> None:
        with self._lock:
            self.stats.requests += 1
            self.stats.in_flight += 1
            self.stats.peak_in_flight = max(self.stats.peak_in_flight, self.stats.in_flight)

    def leave(self) -> None:
        with self._lock:
            self.stats.in_flight -= 1

    def detect(self, tiles: list[np.ndarray]) -> list[Any]:
        """The model's detections for each tile (TF Serving's answer is built from them)."""
        return self._run(tiles, lambda t: self.adapter.predict(t[None], np.zeros((1, 2), dtype=np.int64))[0])

    def answer(self, tile: np.ndarray) -> dict[str, Any]:
        """The model's OSML FeatureCollection for one tile."""
        return self._run([tile], lambda t: self.adapter.answer(t, np.zeros(2, dtype=np.int64)))[0]

    def _run(self, tiles: list[np.ndarray], model: Any) -> list[Any]:
        """Run ``model`` on each tile (after the configured latency, in a slot when slots are
        limited)."""
        if self._slots is not None:
            self._slots.acquire()
        try:
            if self.behaviour.latency:
                time.sleep(self.behaviour.latency)
            with self._lock:
                self.stats.tiles += len(tiles)
            return [model(t) for t in tiles]
        finally:
            if self._slots is not None:
                self._slots.release()

    def marked(self, tile: np.ndarray, marker: int | None) -> bool:
        return marker is not None and int(tile.reshape(-1)[0]) == marker


def _s3_parts(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    return parsed.netloc, parsed.path.lstrip("/")


class Handler(BaseHTTPRequestHandler):
    server: ModelServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else headers and body wait on delayed ACKs (40 ms)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s " + format, self.address_string(), *args)

    # ------------------------------------------------------------------ replies
    def _reply(self, status: int, body: bytes | dict[str, Any], headers: dict[str, str] | None = None,
               content_type: str = "application/json") -> None:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        self.server.count(status)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, code: str, message: str) -> None:
        self._reply(status, {"__type": code, "message": message}, {"x-amzn-ErrorType": code})

    def _body(self) -> bytes:
        """The request body, sized by ``Content-Length`` or sent ``Transfer-Encoding: chunked``
        (as OSML's HTTP detector and other clients that stream a file do)."""
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        parts: list[bytes] = []
        received = 0
        while True:
            size = int(self.rfile.readline(64).split(b";", 1)[0].strip() or b"0", 16)
            received += size
            if received > MAX_REQUEST_BYTES:
                raise ValueError(f"request body over {MAX_REQUEST_BYTES} bytes")
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline(8)  # the CRLF after each chunk

    def _misbehave(self) -> bool:
        """Answer with a random throttle or 5xx (True when answered)."""
        behaviour = self.server.behaviour
        if self.server.roll(behaviour.throttle_rate):
            self._error(429, "ThrottlingException", "Rate exceeded")
            return True
        if self.server.roll(behaviour.error_rate):
            self._error(500, "InternalFailure", "injected server error")
            return True
        return False

    # ------------------------------------------------------------------ routes
    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        if self.path == "/ping":
            self._reply(200, {"status": "healthy", "model": self.server.model_name})
        elif self.path == "/stats":
            self._reply(200, asdict(self.server.stats))
        else:
            self._error(404, "NotFound", f"no route {self.path}")

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        try:
            body = self._body()
        except ValueError as exc:
            self.close_connection = True
            self._error(413, "ValidationError", str(exc))
            return
        path = self.path.split("?", 1)[0]
        self.server.enter()
        try:
            if path == "/" and "DescribeEndpoint" in self.headers.get("X-Amz-Target", ""):
                self._describe(body)
            elif path == "/" and "ListTags" in self.headers.get("X-Amz-Target", ""):
                self._reply(200, {"Tags": []}, content_type="application/x-amz-json-1.1")
            elif path == "/invocations" or (path.startswith("/endpoints/") and path.endswith("/invocations")):
                self._invoke(body)
            elif path.startswith("/endpoints/") and path.endswith("/async-invocations"):
                self._invoke_async()
            elif path.startswith("/v1/models/") and path.endswith(":predict"):
                self._tfserving(body)
            else:
                self._error(404, "NotFound", f"no route {path}")
        except Exception as exc:  # noqa: BLE001 - a server answers, it never dies
            log.warning("serve-model: %s", exc)
            self._error(500, "InternalFailure", str(exc).splitlines()[0] if str(exc) else "error")
        finally:
            self.server.leave()

    def _describe(self, body: bytes) -> None:
        name = json.loads(body or b"{}").get("EndpointName", "endpoint")
        self._reply(200, {
            "EndpointName": name,
            "EndpointArn": f"arn:aws:sagemaker:us-east-1:123456789012:endpoint/{name}",
            "EndpointStatus": "InService",
            "ProductionVariants": [
                {"VariantName": "AllTraffic", "CurrentInstanceCount": self.server.behaviour.instances,
                 "DesiredInstanceCount": self.server.behaviour.instances}
            ],
        }, content_type="application/x-amz-json-1.1")

    def _invoke(self, body: bytes) -> None:
        if self._misbehave():
            return
        tile = decode_tile(body)
        behaviour = self.server.behaviour
        if self.server.marked(tile, behaviour.fail_marker):
            self._error(500, "InternalFailure", "this tile always fails")
            return
        if self.server.marked(tile, behaviour.malformed_marker) or self.server.roll(behaviour.malformed_rate):
            self._reply(200, b'{"type": "FeatureCollection", "feat', content_type="application/json")
            return
        if self.server.segmenter is not None:  # the array type that Accept names (NPY by default)
            from pipeline.segmentation.contract import CONTENT_TYPES, NPY_TYPE, encode_array

            accept = self.headers.get("Accept", NPY_TYPE)
            kind = accept if accept in CONTENT_TYPES else NPY_TYPE
            segmenter, origin = self.server.segmenter, np.zeros((1, 2), dtype=np.int64)
            answer = self.server._run([tile], lambda t: segmenter.segment(t[None], origin)[0])[0]
            self._reply(200, encode_array(answer, kind), content_type=kind)
            return
        self._reply(200, self.server.answer(tile))

    def _invoke_async(self) -> None:
        if self._misbehave():
            return
        location = self.headers.get("X-Amzn-SageMaker-InputLocation")
        if not location or not location.startswith("s3://"):
            self._error(400, "ValidationError", "InputLocation must be an s3:// URL")
            return
        output = self.server.behaviour.async_output.rstrip("/")
        if not output.startswith("s3://"):
            self._error(400, "ValidationError", "the server has no async output location (--async-output)")
            return
        inference_id = self.headers.get("X-Amzn-SageMaker-Inference-Id") or uuid.uuid4().hex
        token = uuid.uuid4().hex
        output_url, failure_url = f"{output}/{token}.out", f"{output}/{token}-error.out"
        args = (location, output_url, failure_url)
        threading.Thread(target=self._run_async, args=args, daemon=True).start()
        self._reply(202, {"InferenceId": inference_id},
                    {"X-Amzn-SageMaker-OutputLocation": output_url,
                     "X-Amzn-SageMaker-FailureLocation": failure_url})

    def _run_async(self, location: str, output_url: str, failure_url: str) -> None:
        import boto3

        s3 = boto3.client("s3")
        try:
            bucket, key = _s3_parts(location)
            tile = decode_tile(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
            if self.server.marked(tile, self.server.behaviour.async_fail_marker):
                raise RuntimeError("inference failed for this tile")
            bucket, key = _s3_parts(output_url)
            s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(self.server.answer(tile)).encode())
        except Exception as exc:  # noqa: BLE001 - reported through the failure location
            bucket, key = _s3_parts(failure_url)
            s3.put_object(Bucket=bucket, Key=key, Body=str(exc).encode())

    def _tfserving(self, body: bytes) -> None:
        if self._misbehave():
            return
        instances = json.loads(body)["instances"]
        tiles = [decode_tile(base64.b64decode(item["b64"])) for item in instances]
        predictions = []
        for tile, found in zip(tiles, self.server.detect(tiles), strict=True):
            height, width = tile.shape[:2]
            ids = []
            for name in found.classes:
                ids.append(self.server.class_ids.setdefault(str(name), len(self.server.class_ids) + 1))
            boxes = found.boxes[:, [1, 0, 3, 2]] / np.array([height, width, height, width])
            predictions.append({
                "detection_boxes": boxes.tolist(),
                "detection_scores": found.scores.tolist(),
                "detection_classes": ids,
                "num_detections": len(found),
            })
        self._reply(200, {"predictions": predictions})


def start_server(model: str = "centerpoint", port: int = 0, host: str = "127.0.0.1",
                 parameters: dict[str, Any] | None = None,
                 behaviour: Behaviour | None = None) -> ModelServer:
    """Start a :class:`ModelServer` on a background thread (``port=0``: a free port)."""
    server = ModelServer((host, port), model, parameters, behaviour)
    threading.Thread(target=server.serve_forever, name=f"serve-model-{port}", daemon=True).start()
    return server
