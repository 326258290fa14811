"""Job throughput with the ``null`` model against a raw windowed read+decode of the same COG.

Both sides read the same windows (every chunk of the job's plan, halo included) of one tiled,
DEFLATE-compressed COG (real RGB pixels, repeated) on the same cores: the raw read is a pool
of ``--workers`` threads (GDAL decodes without the GIL) each with its own open dataset, given
what the pipeline's chunk reads get (the plan's GDAL read options, ``GDAL_NUM_THREADS`` among
them, entered per read; the workers' capped block cache; the same band-last output buffer); the
pipeline is the whole job, ``run_job`` (plan → per-chunk read → tiles → model → merge →
write GeoJSON, GeoParquet and the summary) on a LocalCluster of ``--workers`` single-threaded
processes, warmed up by one run first. The summary chart that the CLI and ``pipeline.run``
draw after a job is timed apart, and also shown added to the job. Each side runs ``--repeat``
times, alternating; each figure is printed as the median and range of its runs, and the
medians are compared. Also prints where the job's time went, the peak
RSS summed over the client and its cluster processes, and the machine's load (the machine may
be shared: compare runs at a similar load).

Run: ``.venv/bin/python benchmarks/bench_throughput.py [--size 16384] [--workers 2] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._stats import summary  # noqa: E402

#: real pixels for the benchmark COG: 512 × 512 × 3 uint8 (two parked airliners)
REAL_TILE = ROOT.parent / "shared" / "data" / "geotiff" / "osml_2_planes.tiff"


def write_cog(path: Path, size: int, block: int = 512) -> Path:
    """A ``size²`` 3-band uint8 COG-layout GeoTIFF (``block``-tiled, DEFLATE with the
    horizontal predictor, overviews) whose pixels repeat a real 512² RGB image, so that blocks
    compress and decode like real imagery; written in strips (never the whole image in memory).
    Falls back to a generated texture if ``REAL_TILE`` is missing."""
    from rasterio.enums import Resampling
    from rasterio.transform import from_origin

    if REAL_TILE.exists():
        with rasterio.open(REAL_TILE) as src:
            real = src.read()[:3]
    else:
        rng = np.random.default_rng(0)
        real = (rng.integers(0, 12, (3, 512, 512)) + np.arange(512) // 9 % 48 + 30).astype(np.uint8)
    th, tw = real.shape[1:]
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8",
               "tiled": True, "blockxsize": block, "blockysize": block, "compress": "deflate",
               "predictor": 2, "interleave": "pixel", "crs": "EPSG:4326",
               "transform": from_origin(10.0, 50.0, 1e-5, 1e-5)}
    with rasterio.open(path, "w", **profile) as dst:
        for y in range(0, size, block):
            h = min(block, size - y)
            rows = np.arange(y, y + h) % th
            strip = np.tile(real[:, rows, :], (1, 1, -(-size // tw)))[:, :, :size]
            dst.write(np.ascontiguousarray(strip), window=Window(0, y, size, h))
        dst.build_overviews([2, 4, 8, 16], Resampling.average)
    return path


def cold(path: Path) -> None:
    """A new modification time for ``path``: workers keep their datasets open between jobs
    (``pipeline.reading``), and GDAL's block cache would serve a job the blocks its worker
    decoded in the previous round (a 4096² chunk re-read in 0.012 instead of 0.10 CPU s); with
    another mtime every read opens the file anew, cold, as a job over a new image does (the
    raw reads open their datasets anew each time)."""
    stamp = time.time_ns()
    os.utime(path, ns=(stamp, stamp))


def raw_read(path: Path, windows: list[tuple[int, int, int, int]], threads: int,
             options: dict[str, str], band_last: bool = True) -> float:
    """Seconds to read and decode ``windows`` with ``threads`` threads, one dataset each, with
    what the pipeline's chunk reads get: its GDAL options (``GDAL_NUM_THREADS`` and the rest,
    entered per read as ``RasterSource`` does), this process's block cache capped like a
    worker's (``cap_block_cache``) and the same buffer layout (``RasterSource.read``: band-last,
    or band by band with one GDAL thread where ``band_last`` is False)."""
    import threading

    from pipeline.reading import band_sequential, cap_block_cache, rasterio_env

    cap_block_cache()
    local = threading.local()
    options = options if band_last else band_sequential(options)  # as RasterSource.read does

    def read(window: tuple[int, int, int, int]) -> None:
        with rasterio_env(options):
            if not hasattr(local, "src"):
                local.src = rasterio.open(path)
            x0, y0, x1, y1 = window
            shape = (y1 - y0, x1 - x0, local.src.count) if band_last else (local.src.count, y1 - y0, x1 - x0)
            out = np.empty(shape, dtype=local.src.dtypes[0])
            out = out.transpose(2, 0, 1) if band_last else out
            local.src.read(window=Window(x0, y0, x1 - x0, y1 - y0), out=out)

    began = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(read, windows))
    return time.perf_counter() - began


def _tree_cpu() -> float:
    """CPU seconds used so far by this process and its children (the cluster), live ones."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--overlap", type=int, default=50)
    args = parser.parse_args()

    from benchmarks.bench_scale import PeakRSS
    from graphs.cluster import connect
    from graphs.image_job import plan_image, run_job
    from pipeline.detections import Detections
    from pipeline.geolocate import to_features
    from pipeline.merge import nms
    from pipeline.plots import write_summary_charts
    from pipeline.reading import cap_block_cache, describe
    from pipeline.request import ImageRequest
    from pipeline.sensor_models import sensor_model

    # Before anything touches GDAL, as in a worker: GDAL's default block cache (5% of RAM) kept
    # ~0.9 GiB of the COG written below in this process, counted in the peak RSS (2.23 GiB
    # against 1.31 GiB, 16384², 2 workers).
    cap_block_cache()
    print(f"machine: {os.cpu_count()} cores; load average at start {os.getloadavg()[0]:.2f}; "
          f"pixels from {REAL_TILE.name if REAL_TILE.exists() else 'a generated texture'}")
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        path = write_cog(Path(tmp) / "scene.tif", args.size)
        print(f"wrote {args.size}x{args.size}x3 COG ({path.stat().st_size / 1e6:.0f} MB) in "
              f"{time.perf_counter() - began:.1f} s")
        request = ImageRequest.parse({
            "jobId": "bench", "imageUrls": [str(path)],
            "outputs": [{"type": "LOCAL", "path": str(Path(tmp) / "out")}],
            "imageProcessor": {"name": "null", "type": "BUILTIN"},
            "imageProcessorTileSize": args.tile, "imageProcessorTileOverlap": args.overlap,
        })
        plan = plan_image(request, str(path))
        grid = plan.grid
        windows = [grid.chunk_window(r, c) for r in range(grid.chunks_y) for c in range(grid.chunks_x)]
        raw: list[float] = []
        raw_one: list[float] = []  # one thread: the baseline of earlier versions of this script
        job: list[float] = []
        chart: list[float] = []
        raw_cpu: list[float] = []  # CPU seconds, a steadier measure than wall time on a shared machine
        job_cpu: list[float] = []
        last: dict[str, Any] = {}
        with PeakRSS() as rss, connect("local", args.workers) as client:
            run_job(request, client, collect_features=False)  # warm: imports, GDAL, model
            for _ in range(args.repeat):
                cpu = _tree_cpu()
                raw.append(raw_read(path, windows, args.workers, plan.read_options))
                raw_cpu.append(_tree_cpu() - cpu)
                raw_one.append(raw_read(path, windows, 1, plan.read_options))
                cold(path)
                began, cpu = time.perf_counter(), _tree_cpu()
                result = run_job(request, client, collect_features=False)
                job.append(time.perf_counter() - began)
                job_cpu.append(_tree_cpu() - cpu)
                began = time.perf_counter()
                write_summary_charts(request, result)
                chart.append(time.perf_counter() - began)
                last = result.summary
        assert last["status"] == "SUCCESS", last
        megapixels = args.size**2 / 1e6
        raw_s, job_s = statistics.median(raw), statistics.median(job)
        print(f"image {args.size}x{args.size}x3 uint8, {grid.n_tiles} tiles of {args.tile} "
              f"(overlap {args.overlap}), {len(windows)} chunks of {grid.chunk}px, "
              f"{args.workers} workers; medians of {args.repeat}")
        print(f"raw windowed read+decode, {args.workers} threads: {summary(raw)} "
              f"({megapixels / raw_s:.0f} Mpx/s)")
        print(f"raw windowed read+decode, 1 thread:  {summary(raw_one)}")
        print(f"pipeline job, null model:            {summary(job)} ({megapixels / job_s:.0f} Mpx/s)")
        print(f"pipeline throughput / raw read throughput (medians): {raw_s / job_s:.2f} (goal >= 0.85); "
              f"per round {summary([r / j for r, j in zip(raw, job, strict=True)], '')}")
        seconds = last["seconds"]
        print(f"  against the 1-thread raw read: {statistics.median(raw_one) / job_s:.2f}")
        raw_c, job_c = statistics.median(raw_cpu), statistics.median(job_cpu)
        print(f"  CPU seconds (client and cluster processes): raw read {summary(raw_cpu)}, job "
              f"{summary(job_cpu)}; ratio of the medians {raw_c / job_c:.2f}")
        chart_s = statistics.median(chart)
        print(f"  with the summary chart drawn after it (CLI, pipeline.run; {summary(chart)}): "
              f"{raw_s / (job_s + chart_s):.2f}")
        print(f"last job: total {seconds['total']} s before its summary; client stages "
              f"{seconds['stages']}; worker seconds {seconds['workers']}")

        rng = np.random.default_rng(0)
        xy = rng.uniform(0, args.size - 40, size=(26000, 2))
        boxes = np.hstack([xy, xy + rng.uniform(5, 40, size=(26000, 2))])
        dets = Detections(boxes, rng.uniform(0, 1, 26000), np.full(26000, "x", dtype=object))
        model = sensor_model(describe(str(path)))
        geo, merge = [], []
        for _ in range(args.repeat):
            began = time.perf_counter()
            to_features(dets, model, image_url="x", job_id="bench")
            geo.append(time.perf_counter() - began)
            began = time.perf_counter()
            kept = nms(dets, 0.75)
            merge.append(time.perf_counter() - began)
        print(f"geolocate 26,000 boxes: {summary(geo, digits=3)}; NMS: {summary(merge, digits=3)} "
              f"({len(kept)} kept)")
    print(f"peak RSS of client + cluster processes: {rss.peak / 2**30:.2f} GiB (the client "
          f"{rss.start / 2**30:.2f} GiB before its cluster started); "
          f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
