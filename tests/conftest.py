"""Shared fixtures: paths to ../shared/data, a real moto server, a real Dask cluster."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MODEL_RUNNER_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared_file(relative: str) -> Path:
    """A file under ``../shared/data``; the test is skipped (with the reason) if it is absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"needs ../shared/data/{relative} (shared test data not present)")
    return path


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("needs ../shared/data (shared test data not present)")
    return SHARED_DATA


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A real moto server (S3, SQS, SNS, STS, Kinesis, ...) on 127.0.0.1; yields its URL.

    It runs in its own process: GDAL calls that hold the GIL while they wait on HTTP
    (``src.overviews()`` on /vsis3/, for one) deadlock against a server thread of the same
    process.
    """
    port = free_port()
    server = subprocess.Popen(  # noqa: S603 - fixed argv
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on 127.0.0.1:{port}") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def aws(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """AWS settings that point boto3 (and, through pipeline.aws, GDAL) at the moto server."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    return moto_endpoint


#: the workers' own credentials (as an instance or task role would give them): they sign their
#: reads and model calls with these, never with the client's
WORKER_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "worker-testing-key",
                      "AWS_SECRET_ACCESS_KEY": "worker-testing-secret", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def dask_client() -> Iterator[object]:
    """A real LocalCluster with 2 single-threaded worker processes on 127.0.0.1, whose
    environment has :data:`WORKER_CREDENTIALS` and no AWS endpoint (that travels in tasks)."""
    import dask

    from graphs.cluster import connect

    with dask.config.set({"distributed.nanny.environ": WORKER_CREDENTIALS}), \
            connect("local", workers=2) as client:
        yield client
