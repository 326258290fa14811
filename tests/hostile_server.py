"""A model endpoint on 127.0.0.1 that misbehaves on purpose, tile by tile.

It decodes the posted tile (any format GDAL reads) and looks at its first pixel: the value
picks the behaviour from :data:`BEHAVIOURS`. A test paints each tile of an image with a code, so
it knows exactly which tiles must fail and why. Every request is counted per code.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

OK, ERROR_500, THROTTLE_429, FLAKY, RESET, TIMEOUT, TRICKLE, HUGE, INVALID_JSON, NAN, HUGE_COORDS, \
    NEGATIVE, MANY_BOXES, EMPTY_200, WRONG_SHAPE = range(10, 160, 10)

BEHAVIOURS = {
    OK: "one box", ERROR_500: "HTTP 500", THROTTLE_429: "HTTP 429", FLAKY: "500 twice, then OK",
    RESET: "connection reset", TIMEOUT: "no answer for 3 s", TRICKLE: "1 byte every 0.2 s for 6 s",
    HUGE: "256 MiB body", INVALID_JSON: "invalid JSON", NAN: "NaN coordinates",
    HUGE_COORDS: "1e300 coordinates", NEGATIVE: "negative coordinates",
    MANY_BOXES: "50,000 boxes", EMPTY_200: "empty body", WRONG_SHAPE: "JSON that is not a FeatureCollection",
}
HUGE_BYTES = 256 * 1024 * 1024
MANY = 50_000


def feature(box: list[float], score: float = 0.9) -> dict[str, Any]:
    return {"type": "Feature", "geometry": None,
            "properties": {"imageBBox": box, "featureClasses": [{"iri": "thing", "score": score}]}}


def collection(boxes: list[list[float]]) -> bytes:
    return json.dumps({"type": "FeatureCollection", "features": [feature(b) for b in boxes]},
                      allow_nan=True).encode()


def tile_code(body: bytes) -> int:
    """The first pixel of the posted tile."""
    from rasterio.io import MemoryFile

    with MemoryFile(body) as memory, memory.open() as src:
        return int(src.read(1, window=((0, 1), (0, 1)))[0, 0])


class HostileHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HostileServer

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.server.delay:
            time.sleep(self.server.delay)
        code = tile_code(body)
        with self.server.lock:
            self.server.calls[code] += 1
            calls = self.server.calls[code]
        try:
            self._behave(code, calls)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _behave(self, code: int, calls: int) -> None:
        if code == ERROR_500 or (code == FLAKY and calls <= 2):
            self._send(500, b"internal error\ntraceback line")
        elif code == THROTTLE_429:
            self._send(429, b"slow down")
        elif code == RESET:
            # RST instead of FIN: the client sees "connection reset by peer"
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
        elif code == TIMEOUT:
            time.sleep(3.0)
            self._send(200, collection([[1, 1, 5, 5]]))
        elif code == TRICKLE:
            body = collection([[1, 1, 5, 5]])
            body = body[:-1] + b" " * 29 + body[-1:]
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            head = len(body) - 30
            self.wfile.write(body[:head])
            for i in range(head, len(body)):
                self.wfile.write(body[i : i + 1])
                self.wfile.flush()
                time.sleep(0.2)
        elif code == HUGE:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(HUGE_BYTES))
            self.end_headers()
            block = b" " * (1 << 20)
            for _ in range(HUGE_BYTES // len(block)):
                self.wfile.write(block)
        elif code == INVALID_JSON:
            self._send(200, b'{"type": "FeatureCollection", "features": [')
        elif code == NAN:
            self._send(200, collection([[float("nan"), 1, 5, 5]]))
        elif code == HUGE_COORDS:
            self._send(200, collection([[1e300, 1, 1e301, 5]]))
        elif code == NEGATIVE:
            self._send(200, collection([[-500, -500, -400, -400]]))
        elif code == MANY_BOXES:
            rng = np.random.default_rng(0)
            xy = rng.uniform(0, 60, size=(MANY, 2)).round(2)
            self._send(200, collection(np.hstack([xy, xy + 2]).tolist()))
        elif code == EMPTY_200:
            self._send(200, b"")
        elif code == WRONG_SHAPE:
            self._send(200, b'{"predictions": "no"}')
        else:
            self._send(200, collection([[10, 10, 20, 20]]))


class HostileServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int = 0, delay: float = 0.0) -> None:
        super().__init__(("127.0.0.1", port), HostileHandler)
        self.calls: Counter[int] = Counter()
        self.lock = threading.Lock()
        self.delay = delay
        self.connections: set[socket.socket] = set()

    def kill(self) -> None:
        """Stop as a crashed server would: no listener, every open connection cut."""
        self.shutdown()
        self.server_close()
        with self.lock:
            open_connections = list(self.connections)
        for connection in open_connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/invocations"


def start(port: int = 0, delay: float = 0.0) -> HostileServer:
    server = HostileServer(port, delay)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@contextmanager
def hostile_server(delay: float = 0.0) -> Iterator[HostileServer]:
    server = start(delay=delay)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
