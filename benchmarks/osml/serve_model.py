"""``serve-model`` for the OSML side-by-side benchmark: our model server, also reading chunked bodies.

OSML 2.3.0's ``HTTPDetector`` POSTs each tile as an open file, which urllib3 sends with
``Transfer-Encoding: chunked`` and no ``Content-Length``; ``pipeline.models.server`` reads only
``Content-Length`` bodies, so it answered every OSML tile with HTTP 500 (which OSML then counts as
a tile with no features). This wrapper reads chunked bodies too and is otherwise the same
server. Run with the project's venv: ``python benchmarks/osml/serve_model.py [--model centerpoint]``;
it prints ``serving <model> on <url>`` and serves until killed.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.models.server import Handler, start_server  # noqa: E402


class ChunkedHandler(Handler):
    """:class:`Handler` that also reads ``Transfer-Encoding: chunked`` request bodies."""

    def _body(self) -> bytes:
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            return super()._body()
        parts: list[bytes] = []
        while True:
            size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline()  # the CRLF after each chunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="centerpoint")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = start_server(args.model, port=args.port)
    server.RequestHandlerClass = ChunkedHandler
    print(f"serving {args.model} on {server.url}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
