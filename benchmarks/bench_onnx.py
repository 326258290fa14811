"""The ONNX text detector (``pipeline.models.onnx:TextDetector``): tiles/s at batch 1 vs batch 8.

Tiles are cut from the real NEON scene in ``../shared/data`` (random noise where it is absent),
run through the ``PYTHON`` adapter as a job's inference task calls it. Prints the median and
range of each batch size's runs, then one JSON line (``tiles_per_s_batch_N``: the median).

Usage: ``python benchmarks/bench_onnx.py [--tiles 64] [--size 512] [--threads 0] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.models import ModelSpec, clear_cache, load_model

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MODEL_RUNNER_SHARED_DATA", ROOT.parent / "shared" / "data"))
SCENE = DATA / "geotiff" / "neon_OSBS_029.tif"
sys.path.insert(0, str(ROOT))

from benchmarks._stats import summary  # noqa: E402


def tiles_of(count: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    if not SCENE.exists():
        return rng.integers(0, 255, (count, size, size, 3), dtype=np.uint8)
    import rasterio

    with rasterio.open(SCENE) as src:
        scene = src.read().transpose(1, 2, 0)
    reps = -(-size // min(scene.shape[:2])) + 1
    big = np.tile(scene, (reps, reps, 1))
    starts = rng.integers(0, big.shape[0] - size, (count, 2))
    return np.stack([big[y : y + size, x : x + size] for y, x in starts])


def rate(tiles: np.ndarray, batch: int, threads: int, device: str) -> float:
    clear_cache()
    spec = ModelSpec("PYTHON", "pipeline.models.onnx:TextDetector",
                     {"batchSize": batch, "threads": threads, "device": device})
    model = load_model(spec)
    offsets = np.zeros((len(tiles), 2))
    model.predict(tiles[:batch], offsets[:batch])  # warm up
    began = time.perf_counter()
    for start in range(0, len(tiles), batch):
        model.predict(tiles[start : start + batch], offsets[start : start + batch])
    return len(tiles) / (time.perf_counter() - began)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs (median and range)")
    args = parser.parse_args()
    if importlib.util.find_spec("onnxruntime") is None:
        print("skipped: needs the onnx extra: pip install 'dask-model-runner[onnx]'")
        return 0
    tiles = tiles_of(args.tiles, args.size)
    result: dict[str, object] = {"tiles": args.tiles, "tile_size": args.size, "threads": args.threads,
                                 "cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine()}
    batches = [int(b) for b in args.batches.split(",")]
    runs: dict[int, list[float]] = {b: [] for b in batches}
    for _ in range(args.repeats):  # interleaved, so that a noisy neighbour hurts every size alike
        for batch in batches:
            runs[batch].append(rate(tiles, batch, args.threads, args.device))
    for batch in batches:
        result[f"tiles_per_s_batch_{batch}"] = round(statistics.median(runs[batch]), 2)
        result[f"tiles_per_s_batch_{batch}_runs"] = [round(r, 2) for r in runs[batch]]
        print(f"batch {batch}: {summary(runs[batch], 'tiles/s', 1)}")
    from pipeline.models.onnx import providers

    result["providers"] = providers(args.device)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
