"""The GPU worker path: PyTorch ``bright-objects`` on a GPU worker, against the model alone.

Writes the demo scene (planted objects, a tiled DEFLATE GeoTIFF) at ``--size``, then measures
in one run:

1. the model alone: every tile of the job cut into host memory first, then fed in batches of
   ``--batch`` through :class:`pipeline.models.torch_bright.BrightObjects` (host → GPU copy,
   labelling, boxes back): the ceiling of the GPU path, in tiles/s;
2. the whole job (plan → read → tiles → model → merge → write) on a LocalCluster of
   ``--cpu-workers`` CPU workers plus one GPU worker (the ``gpu`` section of a local profile)
   with 1, 2 and 4 slots: tiles/s, and the ratio to (1); its features must equal those of
   the CPU built-in, every planted object must be found once, and every model task must have
   run on the GPU worker;
3. the CPU built-in ``bright-objects`` job on the CPU workers alone, for comparison.

Each timing is repeated (``--repeat``, 3; the jobs on one warmed cluster) and printed as the
median and range of its runs. Prints the GPU, peak GPU memory of the model-alone run and peak
RSS of client + cluster.
Needs PyTorch (and a GPU: without one it says so and runs the model on the CPU).

Run: ``python benchmarks/bench_gpu.py [--size 8192] [--batch 16] [--cpu-workers 4] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._stats import summary  # noqa: E402

TILE, OVERLAP = 512, 64


def _request(image: Path, out: Path, processor: dict[str, Any], job: str, batch: int) -> Any:
    from pipeline.request import ImageRequest

    return ImageRequest.parse({
        "jobId": job, "imageUrls": [str(image)], "outputs": [{"type": "LOCAL", "path": str(out / job)}],
        "imageProcessor": processor, "imageProcessorParameters": {"batchSize": batch},
        "imageProcessorTileSize": TILE, "imageProcessorTileOverlap": OVERLAP,
    })


def model_alone(image: Path, batch: int, repeat: int = 1) -> tuple[list[float], int, float]:
    """``(seconds of each of repeat runs, tiles, peak GPU MiB)`` of the model over every tile,
    cut beforehand."""
    import rasterio
    import torch

    from graphs.image_job import plan_image
    from pipeline.models.torch_bright import BrightObjects
    from pipeline.request import ImageRequest
    from pipeline.tiling import cut_tiles

    request = ImageRequest.parse({"jobId": "x", "imageUrls": [str(image)],
                                  "outputs": [{"type": "LOCAL", "path": "/tmp/unused"}],
                                  "imageProcessor": {"name": "null", "type": "BUILTIN"},
                                  "imageProcessorTileSize": TILE, "imageProcessorTileOverlap": OVERLAP})
    grid = plan_image(request, str(image)).grid
    with rasterio.open(image) as src:
        pixels = src.read()
    chunks = [(r, c) for r in range(grid.chunks_y) for c in range(grid.chunks_x)]
    windows = np.concatenate([grid.chunk_tiles(r, c) for r, c in chunks])
    tiles = cut_tiles(pixels, (0, 0), windows, TILE)
    offsets = windows[:, :2].astype(np.float64)
    model = BrightObjects()
    model(tiles[:batch], offsets[:batch])  # warm: CUDA context, kernels
    if model.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(repeat):
        began = time.perf_counter()
        for start in range(0, len(tiles), batch):
            model(tiles[start:start + batch], offsets[start:start + batch])
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - began)
    peak = torch.cuda.max_memory_allocated() / 2**20 if model.device.type == "cuda" else 0.0
    return seconds, len(tiles), peak


def job(image: Path, out: Path, processor: dict[str, Any], name: str, batch: int, cpu_workers: int,
        slots: int, chunk: int, repeat: int = 1) -> tuple[list[float], Any, list[str]]:
    """``(seconds of each of repeat runs, last result, workers that loaded the model)`` of a job
    on a fresh local cluster (warmed by one run first) with ``slots`` GPU slots (0: none)."""
    import yaml

    from graphs.cluster import connect
    from graphs.image_job import run_job

    profile = out / f"{name}.yaml"
    settings: dict[str, Any] = {"kind": "local", "workers": cpu_workers, "options": {"threads_per_worker": 1}}
    if slots:
        settings["gpu"] = {"workers": 1, "slots": slots}
    profile.write_text(yaml.safe_dump(settings))
    module = "pipeline.models.torch_bright"
    with connect(str(profile)) as client:
        run_job(_request(image, out, processor, f"{name}-warm", batch), client, progress=None,
                chunk_target=chunk)
        seconds = []
        for k in range(repeat):
            began = time.perf_counter()
            result = run_job(_request(image, out, processor, f"{name}-{k}", batch), client, progress=None,
                             chunk_target=chunk)
            seconds.append(time.perf_counter() - began)
        loaded = client.run(lambda: module in sys.modules)
        workers = client.scheduler_info(n_workers=-1)["workers"]
        names = {address: str(w["name"]) for address, w in workers.items()}
    return seconds, result, sorted(names[a] for a, yes in loaded.items() if yes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--cpu-workers", type=int, default=4)
    parser.add_argument("--slots", default="1,2,4")
    parser.add_argument("--chunk", type=int, default=4096, help="chunk target of the jobs")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each measurement")
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        print("bench_gpu: PyTorch is not installed; nothing to measure")
        return
    from benchmarks.bench_scale import PeakRSS
    from pipeline.demo import match_truth, write_scene

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (model on the CPU)"
    print(f"machine: {os.cpu_count()} cores; {gpu}; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp, PeakRSS() as rss:
        out = Path(tmp)
        began = time.perf_counter()
        scene = write_scene(out / "scene.tif", size=args.size, count=args.size**2 // 60_000,
                            tile_size=TILE, overlap=OVERLAP)
        print(f"scene {args.size}² x3, {len(scene.truth)} planted objects, written in "
              f"{time.perf_counter() - began:.1f} s; tiles {TILE}/{OVERLAP}, batch {args.batch}")
        alone_runs, tiles, peak_gpu = model_alone(scene.path, args.batch, args.repeat)
        alone_rate = tiles / statistics.median(alone_runs)
        print(f"model alone (tiles in host memory): {tiles} tiles in {summary(alone_runs)} = "
              f"{summary([tiles / s for s in alone_runs], 'tiles/s', 0)}; peak GPU memory {peak_gpu:.0f} MiB")

        torch_model = {"type": "PYTHON", "name": "pipeline.models.torch_bright:BrightObjects"}
        builtin = {"type": "BUILTIN", "name": "bright-objects"}
        cpu_runs, cpu_result, _ = job(scene.path, out, builtin, "cpu", args.batch, args.cpu_workers, 0,
                                      args.chunk, args.repeat)
        cpu_s = statistics.median(cpu_runs)
        print(f"CPU built-in job, {args.cpu_workers} CPU workers: {summary(cpu_runs)} = "
              f"{summary([tiles / s for s in cpu_runs], 'tiles/s', 0)}")
        for slots in (int(s) for s in args.slots.split(",")):
            runs, result, loaded = job(scene.path, out, torch_model, f"gpu{slots}", args.batch,
                                       args.cpu_workers, slots, args.chunk, args.repeat)
            seconds = statistics.median(runs)
            same = sorted(result.features["id"]) == sorted(cpu_result.features["id"])
            found = np.array(result.features["imageBBox"].tolist())
            matched, duplicates, unmatched = match_truth(found, scene.truth)
            print(f"GPU job, {slots} slot(s): {summary(runs)} = "
                  f"{summary([tiles / s for s in runs], 'tiles/s', 0)}; medians: "
                  f"{tiles / seconds / alone_rate:.2f} of the model alone, "
                  f"{cpu_s / seconds:.2f}x the CPU job; features equal to the CPU built-in: {same}; "
                  f"planted found {matched}/{len(scene.truth)}, "
                  f"duplicates {duplicates}, unmatched {unmatched}; model loaded on {loaded}; "
                  f"worker seconds {result.summary['seconds']['workers']}")
    print(f"peak RSS of client + cluster processes: {rss.peak / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
