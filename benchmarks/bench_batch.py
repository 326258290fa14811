"""Many images in one job: a job over ``--images`` GeoTIFFs against a raw windowed read of them.

The images are ``--size``² 3-band uint8 GeoTIFFs in a temporary directory, tiled and compressed
like the demo's (512-px blocks, DEFLATE, overviews; ``bench_throughput.write_cog``: real pixels
repeated), written once and copied (not timed). In the same run, alternating, ``--rounds`` times:

* ``job``: ``run_job`` of one request naming every image, built-in ``null`` model (no
  detections: the per-image costs and the reads), LOCAL output (GeoJSON, GeoParquet, summary),
  on a LocalCluster of ``--workers`` single-threaded processes started and warmed up (a job on
  a few of the images) before the rounds;
* ``raw``: the same chunk windows of every image (the job's plan) read and decoded by a pool of
  ``--workers`` threads (GDAL decodes without the GIL) with the pipeline's read options
  (``GDAL_NUM_THREADS`` and the rest), block cache capped like a worker's, band-last buffers
  like ``RasterSource.read`` (``bench_throughput.raw_read``'s conditions), each image opened
  once by the thread that reads it.

Prints the median and range of both, and raw / job (goal ≥ 0.8). ``--json`` prints the figures
as one JSON object instead.

Run: ``.venv/bin/python benchmarks/bench_batch.py [--images 500] [--size 2048] [--workers 2]
[--rounds 3] [--json]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import rasterio.errors

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def raw_read(paths: list[Path], windows: list[tuple[int, int, int, int]], threads: int,
             options: dict[str, str]) -> float:
    """Seconds to read and decode ``windows`` of every image in ``paths`` with ``threads``
    threads (``bench_throughput.raw_read``'s conditions; each image opened once)."""
    import rasterio
    from rasterio.windows import Window

    from pipeline.reading import cap_block_cache, rasterio_env

    cap_block_cache()

    def read(path: Path) -> None:
        with rasterio_env(options), rasterio.open(path) as src:
            for x0, y0, x1, y1 in windows:
                out = np.empty((y1 - y0, x1 - x0, src.count), dtype=src.dtypes[0]).transpose(2, 0, 1)
                src.read(window=Window(x0, y0, x1 - x0, y1 - y0), out=out)

    began = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(read, paths))
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    from _stats import summary
    from bench_throughput import write_cog

    from graphs.cluster import connect
    from graphs.image_job import plan_image, run_job
    from pipeline.request import ImageRequest

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        began = time.perf_counter()
        with warnings.catch_warnings():  # the real pixels it repeats are not georeferenced
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            first = write_cog(Path(tmp) / "image-0000.tif", args.size)
        paths = [first]
        for k in range(1, args.images):
            paths.append(Path(shutil.copyfile(first, Path(tmp) / f"image-{k:04d}.tif")))
        written = time.perf_counter() - began

        def request(images: list[Path], job: str) -> ImageRequest:
            return ImageRequest.parse({
                "jobId": job, "imageUrls": [str(p) for p in images],
                "outputs": [{"type": "LOCAL", "path": str(Path(tmp) / "out")}],
                "imageProcessor": {"name": "null", "type": "BUILTIN"}})

        plan = plan_image(request(paths[:1], "plan"), str(first))
        grid = plan.grid
        windows = [grid.chunk_window(r, c) for r in range(grid.chunks_y) for c in range(grid.chunks_x)]
        job_times: list[float] = []
        raw_times: list[float] = []
        statuses: set[str] = set()
        with connect("local", args.workers) as client:
            run_job(request(paths[:4], "warm"), client, collect_features=False)
            raw_read(paths[:4], windows, args.workers, plan.read_options)
            for round_ in range(args.rounds):
                raw_times.append(raw_read(paths, windows, args.workers, plan.read_options))
                began = time.perf_counter()
                result = run_job(request(paths, f"batch-{round_}"), client, collect_features=False)
                job_times.append(time.perf_counter() - began)
                statuses.add(result.status)
                images = result.summary["images"]
                if result.status != "SUCCESS" or len(images) != args.images:
                    sys.exit(f"bench_batch: job {result.status} with {len(images)} images: "
                             f"{result.summary.get('reason')}")
    job, raw = statistics.median(job_times), statistics.median(raw_times)
    ratio = raw / job
    if args.json:
        print(json.dumps({"images": args.images, "size": args.size, "workers": args.workers,
                          "rounds": args.rounds, "chunks_per_image": len(windows),
                          "load_average": load, "job_seconds": job_times, "raw_seconds": raw_times,
                          "raw_over_job": ratio}, indent=2))
        return
    print(f"machine: {os.cpu_count()} cores; load average at start {load:.2f}; "
          f"{args.images} images of {args.size}² written in {written:.1f} s (not timed)")
    print(f"{args.images} images × {len(windows)} chunk(s) of {grid.chunk} px, {args.workers} workers, "
          f"model null, LOCAL output")
    print(f"  job (run_job): {summary(job_times)}, {1000 * job / args.images:.1f} ms per image")
    print(f"  raw windowed read ({args.workers} threads): {summary(raw_times)}, "
          f"{1000 * raw / args.images:.1f} ms per image")
    print(f"raw / job: {ratio:.2f} (medians; goal ≥ 0.8); per round "
          f"{', '.join(f'{r / j:.2f}' for r, j in zip(raw_times, job_times, strict=True))}")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
