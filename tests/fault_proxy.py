"""A small fault-injecting HTTP proxy on 127.0.0.1, in front of a real server (moto).

``proxy.inject("GET", r"^/bucket/key", status=503, times=2)`` answers the next two matching
requests with an S3-style error (or resets the connection with ``status=None``); everything
else is forwarded unchanged. ``proxy.log`` lists ``(method, path, outcome)`` of every request.
"""

from __future__ import annotations

import http.client
import re
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-connection", "content-length"}
CODES = {500: "InternalError", 503: "SlowDown", 403: "AccessDenied", 404: "NoSuchKey"}


@dataclass
class Fault:
    method: str | None
    path: re.Pattern[str]
    status: int | None  # None: reset the connection
    times: int | None  # None: forever


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

    def _handle(self) -> None:
        body = self._body()
        fault = self.server.take(self.command, self.path)
        if fault is not None:
            self.server.record(self.command, self.path, fault.status or "reset")
            if fault.status is None:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()
                return
            code = CODES.get(fault.status, "InternalError")
            error = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                     f"<Message>injected fault</Message></Error>").encode()
            self.send_response(fault.status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(error) if self.command != "HEAD" else 0))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(error)
            return
        upstream = http.client.HTTPConnection(self.server.upstream_host, self.server.upstream_port,
                                              timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Content-Length"] = str(len(body))
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        self.server.record(self.command, self.path, response.status)
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

    def __init__(self, upstream: str):
        super().__init__(("127.0.0.1", 0), ProxyHandler)
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname or "127.0.0.1", parts.port or 80
        self.faults: list[Fault] = []
        self.log: list[tuple[str, str, int | str]] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def inject(self, method: str | None, path: str, status: int | None = 503, times: int | None = 1) -> None:
        with self._lock:
            self.faults.append(Fault(method, re.compile(path), status, times))

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


@contextmanager
def fault_proxy(upstream: str) -> Iterator[FaultProxy]:
    proxy = FaultProxy(upstream)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()
