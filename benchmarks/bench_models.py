"""Model-target throughput.

1. Endpoint saturation: ``serve-model`` with a fixed latency L and C processing slots, driven by
   the HTTP_ENDPOINT and SM_ENDPOINT adapters with ``maxConcurrency`` C: tiles/s vs the ideal C/L
   (goal >= 0.9).
2. In-process batching: a vectorised PYTHON model with a fixed per-call overhead, batch sizes
   1 vs 16 (the GPU path's shape, on CPU; pass ``--torch`` on a machine with CUDA to time a
   real convolutional model on the GPU).

Usage: ``python benchmarks/bench_models.py [--tiles 400] [--latency 0.05] [--slots 8]``
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from pipeline.models import ModelSpec, clear_cache, load_model
from pipeline.models.endpoint import resolve_model
from pipeline.models.server import Behaviour, start_server


def endpoint(kind: str, tiles: int, latency: float, slots: int, size: int) -> dict[str, float]:
    server = start_server("centerpoint", behaviour=Behaviour(latency=latency, slots=slots))
    os.environ.update(AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME=server.url, AWS_ACCESS_KEY_ID="x",
                      AWS_SECRET_ACCESS_KEY="x", AWS_DEFAULT_REGION="us-east-1")
    name = server.url + "/invocations" if kind == "HTTP_ENDPOINT" else "bench"
    spec = resolve_model(ModelSpec(kind, name, {"maxConcurrency": slots}))
    adapter = load_model(spec)
    batch = np.random.default_rng(0).integers(0, 255, (tiles, size, size, 3), dtype=np.uint8)
    offsets = np.zeros((tiles, 2), dtype=np.int64)
    adapter.predict(batch[:slots], offsets[:slots])  # warm connections
    began = time.perf_counter()
    results = adapter.predict(batch, offsets)
    seconds = time.perf_counter() - began
    assert not any(isinstance(r, BaseException) for r in results)
    server.shutdown()
    clear_cache()
    ideal = slots / latency
    return {"tiles_per_s": round(tiles / seconds, 1), "ideal": round(ideal, 1),
            "efficiency": round(tiles / seconds / ideal, 3), "peak_in_flight": server.stats.peak_in_flight}


class Overhead:
    """A vectorised model with a fixed cost per call (kernel launch, transfer) and per tile."""

    def __init__(self, call_ms: float = 5.0):
        self.call = call_ms / 1000

    def __call__(self, tiles: np.ndarray, offsets: np.ndarray) -> list[dict[str, object]]:
        time.sleep(self.call)
        means = tiles.reshape(len(tiles), -1).mean(axis=1)
        return [{"boxes": [[0, 0, 1, 1]], "scores": [m / 255], "classes": "x"} for m in means]


def batched(tiles: int, size: int, batch: int) -> dict[str, float]:
    from pipeline.infer import _predict

    spec = ModelSpec("PYTHON", f"{__name__}:Overhead", {"batchSize": batch})
    data = np.random.default_rng(0).integers(0, 255, (tiles, size, size, 3), dtype=np.uint8)
    offsets = np.zeros((tiles, 2), dtype=np.int64)
    began = time.perf_counter()
    for start in range(0, tiles, batch):
        _predict(spec, data[start : start + batch], offsets[start : start + batch])
    return {"batch": batch, "tiles_per_s": round(tiles / (time.perf_counter() - began), 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiles", type=int, default=400)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    report = {
        kind: endpoint(kind, args.tiles, args.latency, args.slots, args.size)
        for kind in ("HTTP_ENDPOINT", "SM_ENDPOINT")
    }
    report["in_process"] = [batched(args.tiles, args.size, b) for b in (1, 16)]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
