"""A small fault-injecting HTTP proxy on 127.0.0.1, in front of a real server (moto).

``proxy.inject("GET", r"^/bucket/key", status=503, times=2)`` answers the next two matching
requests with an S3-style error (or resets the connection with ``status=None``); everything
else is forwarded unchanged. ``proxy.log`` lists ``(method, path, outcome)`` of every request.

As AWS does, it can also reject expired and anonymous requests: ``proxy.expire_tokens(4)``
answers 403 ``ExpiredToken`` to any request signed with an STS session token that passed
through the proxy (in an ``AssumeRole`` answer) more than 4 seconds earlier;
``proxy.reject_unsigned = True`` answers 403 ``AccessDenied`` to requests without a signature.
:func:`proxy_process` runs one in its own process (for GDAL reads from the test process), in
front of several upstreams (moto for S3 and STS, a model server for ``/endpoints/``).
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-connection", "content-length"}
CODES = {500: "InternalError", 503: "SlowDown", 403: "AccessDenied", 404: "NoSuchKey"}
_SESSION_TOKEN = re.compile(rb"<SessionToken>([^<]+)</SessionToken>")


@dataclass
class Fault:
    method: str | None
    path: re.Pattern[str]
    status: int | None  # None: reset the connection
    times: int | None  # None: forever
    code: str | None = None  # the error code (default: by status)


class ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FaultProxy

    def log_message(self, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(parts)
        return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))

    def _error(self, status: int, code: str, message: str) -> None:
        """An AWS-style error: XML (S3, STS) or JSON (a ``json`` route, e.g. SageMaker runtime)."""
        if self.server.route(self.path)[2]:
            error = json.dumps({"__type": code, "message": message}).encode()
            kind = "application/x-amz-json-1.1"
        else:
            error = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                     f"<Message>{message}</Message></Error>").encode()
            kind = "application/xml"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("x-amzn-ErrorType", code)
        self.send_header("Content-Length", str(len(error) if self.command != "HEAD" else 0))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(error)

    def _refused(self) -> bool:
        """Answer an expired or unsigned request as AWS would; True if it was refused."""
        query = parse_qs(urlsplit(self.path).query)
        token = self.headers.get("X-Amz-Security-Token") or (query.get("X-Amz-Security-Token") or [None])[0]
        signed = "Authorization" in self.headers or "X-Amz-Signature" in query
        if self.server.reject_unsigned and not signed:
            self.server.record(self.command, self.path, "unsigned")
            self._error(403, "AccessDenied", "Access Denied")
            return True
        if token and self.server.expired(token):
            self.server.record(self.command, self.path, "expired")
            self._error(403, "ExpiredToken", "The provided token has expired.")
            return True
        return False

    def _control(self, body: bytes) -> None:
        """``/__proxy/<what>``: the API of :class:`ProxyProcess` (JSON in, JSON out)."""
        what = urlsplit(self.path).path.rsplit("/", 1)[-1]
        answer = self.server.control(what, json.loads(body) if body else {})
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        body = self._body()
        if self.path.startswith("/__proxy/"):
            self._control(body)
            return
        if self._refused():
            return
        fault = self.server.take(self.command, self.path)
        if fault is not None:
            self.server.record(self.command, self.path, fault.status or "reset")
            if fault.status is None:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()
                return
            code = fault.code or CODES.get(fault.status, "InternalError")
            self._error(fault.status, code, "injected fault")
            return
        host, port, _ = self.server.route(self.path)
        upstream = http.client.HTTPConnection(host, port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Content-Length"] = str(len(body))
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        self.server.record(self.command, self.path, response.status)
        if response.status == 200:
            for token in _SESSION_TOKEN.findall(data):  # an STS answer: the session starts now
                self.server.issued(token.decode())
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in HOP_BY_HOP:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


class FaultProxy(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: str, *, json_errors: bool = False, routes: dict[str, str] | None = None):
        """``routes``: path prefix → another upstream (``json:`` before its URL: JSON errors)."""
        super().__init__(("127.0.0.1", 0), ProxyHandler)
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname or "127.0.0.1", parts.port or 80
        self.routes: list[tuple[str, str, int, bool]] = [(prefix, *self._split(url)) for prefix, url in
                                                         (routes or {}).items()]
        self.routes.append(("/", self.upstream_host, self.upstream_port, json_errors))
        self.faults: list[Fault] = []
        self.log: list[tuple[str, str, int | str]] = []
        self._lock = threading.Lock()
        self.reject_unsigned = False
        self.max_token_age: float | None = None
        self.tokens: dict[str, float] = {}  #: STS session token → when it was issued
        self.expired_tokens: list[str] = []  #: STS tokens some request was refused for
        self.token_uses: dict[str, int] = {}  #: requests forwarded per STS token

    @staticmethod
    def _split(url: str) -> tuple[str, int, bool]:
        json_errors = url.startswith("json:")
        parts = urlsplit(url.removeprefix("json:"))
        return parts.hostname or "127.0.0.1", parts.port or 80, json_errors

    def route(self, path: str) -> tuple[str, int, bool]:
        """(host, port, JSON errors) of the upstream that serves ``path``."""
        return next((h, p, j) for prefix, h, p, j in self.routes if path.startswith(prefix))

    def expire_tokens(self, seconds: float | None) -> None:
        """Refuse STS session tokens older than ``seconds`` (None: never)."""
        self.max_token_age = seconds

    def control(self, what: str, data: dict[str, Any]) -> Any:
        """The remote API (see :class:`ProxyProcess`)."""
        if what == "inject":
            self.inject(data["method"], data["path"], data.get("status", 503), data.get("times", 1),
                        data.get("code"))
        elif what == "settings":
            if "max_token_age" in data:
                self.expire_tokens(data["max_token_age"])
            if "reject_unsigned" in data:
                self.reject_unsigned = bool(data["reject_unsigned"])
        elif what == "clear":
            self.clear()
        with self._lock:
            return {"log": self.log, "tokens": list(self.tokens), "expired_tokens": self.expired_tokens,
                    "token_uses": self.token_uses}

    def issued(self, token: str) -> None:
        with self._lock:
            self.tokens.setdefault(token, time.monotonic())

    def expired(self, token: str) -> bool:
        with self._lock:
            born = self.tokens.get(token)
            if self.max_token_age is None or born is None:
                return False
            if time.monotonic() - born > self.max_token_age:
                self.expired_tokens.append(token)
                return True
            self.token_uses[token] = self.token_uses.get(token, 0) + 1
            return False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def inject(self, method: str | None, path: str, status: int | None = 503, times: int | None = 1,
               code: str | None = None) -> None:
        with self._lock:
            self.faults.append(Fault(method, re.compile(path), status, times, code))

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.log.clear()

    def take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if (fault.method in (None, method) and fault.path.search(path)
                        and (fault.times is None or fault.times > 0)):
                    if fault.times is not None:
                        fault.times -= 1
                    return fault
        return None

    def record(self, method: str, path: str, outcome: int | str) -> None:
        with self._lock:
            self.log.append((method, path, outcome))

    def outcomes(self, method: str, path: str) -> list[int | str]:
        with self._lock:
            return [o for m, p, o in self.log if m == method and re.search(path, p)]


class ProxyProcess:
    """A :class:`FaultProxy` in its own process (GDAL calls that hold the GIL while they wait on
    HTTP, such as ``overviews()`` on ``/vsis3/``, deadlock against a server thread of their own
    process), driven through its ``/__proxy/`` API."""

    def __init__(self, url: str, process: subprocess.Popen[str]):
        self.url = url
        self.process = process

    def _call(self, what: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
        import requests

        answer = requests.post(f"{self.url}/__proxy/{what}", json=data or {}, timeout=10)
        answer.raise_for_status()
        return dict(answer.json())

    def inject(self, method: str | None, path: str, status: int | None = 503, times: int | None = 1,
               code: str | None = None) -> None:
        self._call("inject", {"method": method, "path": path, "status": status, "times": times, "code": code})

    def expire_tokens(self, seconds: float | None) -> None:
        self._call("settings", {"max_token_age": seconds})

    def reject_unsigned(self, reject: bool = True) -> None:
        self._call("settings", {"reject_unsigned": reject})

    def state(self) -> dict[str, Any]:
        return self._call("state")

    def outcomes(self, method: str, path: str) -> list[int | str]:
        return [o for m, p, o in self.state()["log"] if m == method and re.search(path, p)]


@contextmanager
def proxy_process(upstream: str, routes: dict[str, str] | None = None) -> Iterator[ProxyProcess]:
    """A :class:`ProxyProcess` in front of ``upstream`` (and ``routes``, see :class:`FaultProxy`)."""
    argv = [sys.executable, "-m", "tests.fault_proxy", upstream]
    argv += [f"{prefix}={url}" for prefix, url in (routes or {}).items()]
    root = str(Path(__file__).resolve().parents[1])
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=root)  # noqa: S603
    try:
        assert process.stdout is not None
        yield ProxyProcess(process.stdout.readline().strip(), process)
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextmanager
def fault_proxy(upstream: str, *, json_errors: bool = False) -> Iterator[FaultProxy]:
    proxy = FaultProxy(upstream, json_errors=json_errors)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()


if __name__ == "__main__":  # python -m tests.fault_proxy UPSTREAM [PREFIX=URL ...]: prints its URL
    server = FaultProxy(sys.argv[1], routes=dict(arg.split("=", 1) for arg in sys.argv[2:]))
    print(server.url, flush=True)
    server.serve_forever()
