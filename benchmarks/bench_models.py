"""Model-target throughput.

1. Endpoint saturation: ``model-runner serve-model`` (its own process, as a deployed endpoint is)
   with a fixed latency L and C processing slots, driven by the HTTP_ENDPOINT and SM_ENDPOINT
   adapters with ``maxConcurrency`` C: tiles/s vs the ideal C/L (goal >= 0.9). ``--in-process``
   runs the server in this process instead (client and server then share one GIL).
2. In-process batching: a vectorised PYTHON model with a fixed per-call overhead, batch sizes
   1 vs 16 (the GPU path's shape, on CPU).

Usage: ``python benchmarks/bench_models.py [--tiles 400] [--latency 0.05] [--slots 8]
[--format NITF] [--size 256] [--in-process] [--repeat 3]``; each measurement is run ``--repeat``
times and printed as the median and range of its runs (the JSON holds the medians and runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import requests

from pipeline.models import ModelSpec, clear_cache, load_model
from pipeline.models.encoding import DEFAULT_TILE_FORMAT, encode_tile
from pipeline.models.endpoint import resolve_model
from pipeline.models.retry import METRICS, merge_snapshots
from pipeline.models.server import Behaviour, start_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._stats import summary  # noqa: E402


@contextmanager
def serve(latency: float, slots: int, in_process: bool) -> Iterator[str]:
    """The URL of a ``serve-model`` (centerpoint) with ``latency`` and ``slots``."""
    if in_process:
        server = start_server("centerpoint", behaviour=Behaviour(latency=latency, slots=slots))
        try:
            yield server.url
        finally:
            server.shutdown()
        return
    command = [sys.executable, "-m", "pipeline.cli", "serve-model", "--port", "0",
               "--latency", str(latency), "--slots", str(slots)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # "serving centerpoint on http://127.0.0.1:PORT (...)"
        yield line.split(" on ", 1)[1].split()[0]
    finally:
        process.terminate()
        process.wait(10)


def endpoint(kind: str, tiles: int, latency: float, slots: int, size: int, tile_format: str,
             in_process: bool) -> dict[str, float]:
    with serve(latency, slots, in_process) as url:
        os.environ.update(AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME=url, AWS_ACCESS_KEY_ID="x",
                          AWS_SECRET_ACCESS_KEY="x", AWS_DEFAULT_REGION="us-east-1")
        name = url + "/invocations" if kind == "HTTP_ENDPOINT" else "bench"
        spec = resolve_model(ModelSpec(kind, name, {"maxConcurrency": slots}, tile_format))
        adapter = load_model(spec)
        batch = np.random.default_rng(0).integers(0, 255, (tiles, size, size, 3), dtype=np.uint8)
        offsets = np.zeros((tiles, 2), dtype=np.int64)
        adapter.predict(batch[: 2 * slots], offsets[: 2 * slots])  # warm connections and threads
        METRICS.reset()
        began = time.perf_counter()
        results = adapter.predict(batch, offsets)
        seconds = time.perf_counter() - began
        failed = [r for r in results if isinstance(r, BaseException)]
        assert not failed, failed[0]
        stats = requests.get(url + "/stats", timeout=5).json()
        clear_cache()
    ideal = slots / latency
    latency_ms = merge_snapshots([METRICS.snapshot()])[adapter.operation]["latencyMs"]  # type: ignore[attr-defined]
    return {"tiles_per_s": round(tiles / seconds, 1), "ideal": round(ideal, 1),
            "efficiency": round(tiles / seconds / ideal, 3), "peak_in_flight": stats["peak_in_flight"],
            "request_ms_p50": latency_ms["p50"], "request_ms_p90": latency_ms["p90"]}


def _predict_in_task(spec: ModelSpec, tiles: int, size: int) -> float:
    """Seconds for ``tiles`` through the adapter, timed inside a Dask task (cluster semaphore)."""
    adapter = load_model(spec)
    batch = np.random.default_rng(0).integers(0, 255, (tiles, size, size, 3), dtype=np.uint8)
    offsets = np.zeros((tiles, 2), dtype=np.int64)
    adapter.predict(batch[:16], offsets[:16])
    began = time.perf_counter()
    results = adapter.predict(batch, offsets)
    seconds = time.perf_counter() - began
    assert not any(isinstance(r, BaseException) for r in results)
    return seconds


def in_dask_worker(tiles: int, latency: float, slots: int, size: int, tile_format: str,
                   in_process: bool) -> dict[str, float]:
    """HTTP_ENDPOINT from a task on a one-worker LocalCluster (cluster-wide leases)."""
    import logging

    from distributed import Client, LocalCluster

    with serve(latency, slots, in_process) as url, \
            LocalCluster(n_workers=1, threads_per_worker=1, host="127.0.0.1",
                         dashboard_address="127.0.0.1:0", silence_logs=logging.WARNING) as cluster, \
            Client(cluster) as client:
        spec = resolve_model(ModelSpec("HTTP_ENDPOINT", url + "/invocations", {"maxConcurrency": slots},
                                       tile_format))
        seconds = client.submit(_predict_in_task, spec, tiles, size, pure=False).result()
    ideal = slots / latency
    return {"tiles_per_s": round(tiles / seconds, 1), "efficiency": round(tiles / seconds / ideal, 3)}


def raw_client(tiles: int, latency: float, slots: int, size: int, tile_format: str,
               in_process: bool) -> dict[str, float]:
    """The ceiling on this machine: C threads posting one pre-encoded tile over urllib3."""
    from concurrent.futures import ThreadPoolExecutor

    import urllib3

    data = encode_tile(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8),
                       tile_format)
    with serve(latency, slots, in_process) as url:
        host, port = url.removeprefix("http://").split(":")
        pool = urllib3.HTTPConnectionPool(host, int(port), maxsize=slots)

        def send(_: int) -> int:
            return pool.request("POST", "/invocations", body=data).status

        with ThreadPoolExecutor(slots) as threads:
            list(threads.map(send, range(2 * slots)))
            began = time.perf_counter()
            statuses = list(threads.map(send, range(tiles)))
            seconds = time.perf_counter() - began
    assert set(statuses) == {200}, statuses
    ideal = slots / latency
    return {"tiles_per_s": round(tiles / seconds, 1), "efficiency": round(tiles / seconds / ideal, 3)}


class Overhead:
    """A vectorised model with a fixed cost per call (kernel launch, transfer) and per tile."""

    def __init__(self, call_ms: float = 5.0):
        self.call = call_ms / 1000

    def __call__(self, tiles: np.ndarray, offsets: np.ndarray) -> list[dict[str, object]]:
        time.sleep(self.call)
        means = tiles.reshape(len(tiles), -1).mean(axis=1)
        return [{"boxes": [[0, 0, 1, 1]], "scores": [m / 255], "classes": "x"} for m in means]


def batched(tiles: int, size: int, batch: int) -> dict[str, float]:
    from pipeline.infer import predict

    spec = ModelSpec("PYTHON", f"{__name__}:Overhead", {"batchSize": batch})
    data = np.random.default_rng(0).integers(0, 255, (tiles, size, size, 3), dtype=np.uint8)
    offsets = np.zeros((tiles, 2), dtype=np.int64)
    began = time.perf_counter()
    for start in range(0, tiles, batch):
        predict(spec, data[start : start + batch], offsets[start : start + batch])
    return {"batch": batch, "tiles_per_s": round(tiles / (time.perf_counter() - began), 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiles", type=int, default=400)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--format", default=DEFAULT_TILE_FORMAT, help="imageProcessorTileFormat")
    parser.add_argument("--in-process", action="store_true", help="serve-model in this process")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement")
    args = parser.parse_args()

    def repeated(name: str, measure: Any, *more: Any) -> dict[str, Any]:
        """``measure`` run ``--repeat`` times: its first run's fields, and the median and runs of
        ``tiles_per_s`` and ``efficiency``; prints their median and range."""
        runs = [measure(*more) for _ in range(args.repeat)]
        out: dict[str, Any] = dict(runs[0])
        line = []
        for key, unit in (("tiles_per_s", "tiles/s"), ("efficiency", "")):
            if key in out:
                values = [r[key] for r in runs]
                out[key], out[f"{key}_runs"] = statistics.median(values), values
                line.append(f"{key} {summary(values, unit, 3 if key == 'efficiency' else 1)}")
        print(f"{name}: {'; '.join(line)}", flush=True)
        return out

    common = (args.tiles, args.latency, args.slots, args.size, args.format, args.in_process)
    report: dict[str, object] = {kind: repeated(kind, endpoint, kind, *common)
                                 for kind in ("HTTP_ENDPOINT", "SM_ENDPOINT")}
    report["HTTP_ENDPOINT_in_dask_worker"] = repeated("HTTP_ENDPOINT in a Dask worker", in_dask_worker,
                                                      *common)
    report["raw_client"] = repeated("raw client (ceiling)", raw_client, *common)
    report["in_process"] = [repeated(f"in-process batch {b}", batched, args.tiles, args.size, b)
                            for b in (1, 16)]
    print(json.dumps(report, indent=2))

if __name__ == "__main__":
    main()
