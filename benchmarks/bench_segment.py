"""Segmentation job throughput and memory.

1. ``throughput``: segmentation jobs (``threshold``, a trivial per-pixel model) over a
   ``--size``² 3-band COG of real pixels against a raw windowed read+decode of the job's own
   chunk windows (no halo, band by band: the segmenter is per-pixel, see ``stitch.read_window``)
   by a pool of ``--workers`` threads, each window read whole (the job reads it 512 rows at a
   time, ``stitch.SLAB_ROWS``; read so, the raw read cost as much CPU or more: 108 against 104 ms
   per 4096² window, so whole windows are the stricter baseline): BLEND and CORE stitching, each
   with the class COG alone and with the polygons too (:data:`VARIANTS`); each run's ratio is
   the raw read's time over the job's in the same round, each read cold (``bench_throughput.cold``);
   medians and ranges of ``--repeat`` rounds, after one warm-up job.
2. ``memory``: peak RSS of the client plus every cluster process for segmentation jobs over
   ``synthetic://`` images of ``--sizes`` (default 10k² and 40k²; one bright square per 256 px
   cell, so tens of thousands of polygons at 40k²), or with ``--real`` over COGs of real pixels
   (``bench_throughput.write_cog``; 70,400 polygons of ~80 vertices at 40k²).

Run: ``.venv/bin/python benchmarks/bench_segment.py [--size 8192] [--sizes 10240,40960]``
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


#: the job variants timed against the same raw read: (label, segmentation options); the first,
#: the headline, is the job a user runs for a class raster with the defaults (BLEND stitching)
VARIANTS: list[tuple[str, dict[str, object]]] = [
    ("BLEND, COG only (headline)", {"stitch": "BLEND", "polygons": False}),
    ("BLEND, COG + polygons", {"stitch": "BLEND"}),
    ("CORE, COG only", {"stitch": "CORE", "polygons": False}),
    ("CORE, COG + polygons", {"stitch": "CORE"}),
]


def segmentation_request(url: str, out: Path, job_id: str, tile: int, overlap: int,
                         options: dict[str, object] | None = None) -> object:
    from pipeline.request import ImageRequest

    return ImageRequest.parse({
        "jobId": job_id, "imageUrls": [url], "outputs": [{"type": "LOCAL", "path": str(out)}],
        "imageProcessor": {"name": "threshold", "type": "BUILTIN"},
        "imageProcessorTileSize": tile, "imageProcessorTileOverlap": overlap,
        "segmentation": options or {"stitch": "BLEND"},
    })


def bench_throughput(size: int, workers: int, repeat: int, tile: int, overlap: int) -> None:
    from benchmarks.bench_scale import PeakRSS
    from benchmarks.bench_throughput import cold, raw_read, write_cog
    from graphs.cluster import connect
    from graphs.image_job import model_spec, plan_image
    from graphs.segment_job import chunk_bounds, run_segmentation
    from pipeline.reading import cap_block_cache
    from pipeline.segmentation.models import load_segmenter, resolve_segmenter
    from pipeline.segmentation.stitch import answers_per_pixel, covering_tiles, read_window

    cap_block_cache()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_cog(Path(tmp) / "scene.tif", size)
        requests = [segmentation_request(str(path), Path(tmp) / "out", f"bench{k}", tile, overlap, options)
                    for k, (_, options) in enumerate(VARIANTS)]
        plan = plan_image(requests[0], str(path))  # type: ignore[arg-type]
        grid = plan.grid
        # the job's own read windows: a per-pixel segmenter's chunks read no halo
        per_pixel = answers_per_pixel(load_segmenter(resolve_segmenter(model_spec(requests[0]))),  # type: ignore[arg-type]
                                      plan.range_adjustment["type"])
        windows = []
        for r in range(grid.chunks_y):
            for c in range(grid.chunks_x):
                bounds = chunk_bounds(grid, r, c)  # the job's chunks, on the COG's block grid
                if bounds[2] > bounds[0] and bounds[3] > bounds[1]:
                    windows.append(read_window(covering_tiles(grid, bounds, "BLEND"), bounds, per_pixel))
        raw: list[float] = []
        jobs: list[list[float]] = [[] for _ in VARIANTS]
        last: list[Any] = [None] * len(VARIANTS)
        with PeakRSS() as rss, connect("local", workers) as client:
            run_segmentation(requests[0], client)  # type: ignore[arg-type]  # warm up
            for round_ in range(repeat):
                cold(path)
                raw.append(raw_read(path, windows, workers, plan.read_options, band_last=not per_pixel))
                # each round starts with the next variant: the first job after the raw read ran
                # ~10% slower than the same job later in the round
                for k in [(round_ + i) % len(VARIANTS) for i in range(len(VARIANTS))]:
                    cold(path)
                    began = time.perf_counter()
                    result = run_segmentation(requests[k], client)  # type: ignore[arg-type]
                    jobs[k].append(time.perf_counter() - began)
                    assert result.status == "SUCCESS", result.summary
                    last[k] = result
        chunks = grid.chunks_x * grid.chunks_y
        print(f"throughput {size}x{size}x3 COG, tiles {tile}/{overlap}, {chunks} chunks, {workers} workers; "
              f"raw windowed read {statistics.median(raw):.2f} s ({min(raw):.2f}-{max(raw):.2f}); "
              f"peak RSS {rss.peak / 2**30:.2f} GiB")
        for (label, _), times, result in zip(VARIANTS, jobs, last, strict=True):
            seconds = result.images[0].seconds
            ratios = [r / t for r, t in zip(raw, times, strict=True)]  # each run against its raw read
            print(f"  {label}: ratio {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}; "
                  f"goal >= 0.7), job {statistics.median(times):.2f} s ({min(times):.2f}-{max(times):.2f}); "
                  f"last run: chunks {seconds['chunks']:.2f} s, COG {seconds['raster']:.2f} s, "
                  f"{result.feature_count} polygons; worker seconds "
                  + ", ".join(f"{k[7:]} {v:.2f}" for k, v in seconds.items() if k.startswith("worker_")),
                  flush=True)


def written_apart(path: Path, size: int) -> str:
    """``bench_throughput.write_cog`` in a process of its own: writing a 40k² COG left ~1 GiB
    (GDAL's cache, freed pages not returned) in the process that measures."""
    import subprocess

    code = ("from pathlib import Path; from benchmarks.bench_throughput import write_cog; "
            f"write_cog(Path({str(path)!r}), {size})")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    return str(path)


def bench_memory(sizes: list[int], workers: int, real: bool = False) -> None:
    from benchmarks.bench_scale import PeakRSS
    from graphs.cluster import connect
    from graphs.segment_job import run_segmentation

    peaks = []
    with tempfile.TemporaryDirectory() as tmp:
        for side in sizes:
            url = written_apart(Path(tmp) / f"real-{side}.tif", side) if real else f"synthetic://{side}x{side}"
            request = segmentation_request(url, Path(tmp) / "out", f"mem-{side}", 1024, 50)
            with PeakRSS() as rss, connect("local", workers) as client:
                began = time.perf_counter()
                # as the CLI and the queue worker run it: the features go to the files only
                result = run_segmentation(request, client, collect_features=False)  # type: ignore[arg-type]
                seconds = time.perf_counter() - began
            assert result.status == "SUCCESS", result.summary
            peaks.append(rss.peak / 2**30)
            print(f"memory {side}x{side}: {seconds:.1f} s, {result.feature_count} polygons, peak RSS of "
                  f"client + cluster processes {peaks[-1]:.2f} GiB", flush=True)
    print(f"peak RSS {' / '.join(f'{p:.2f}' for p in peaks)} GiB; largest/smallest "
          f"{max(peaks) / min(peaks):.2f} (goal: < 2 GB at 40k², ratio < 1.3)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--sizes", default="10240,40960")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--overlap", type=int, default=50)
    parser.add_argument("--only", choices=["throughput", "memory"], default=None)
    parser.add_argument("--real", action="store_true",
                        help="memory over COGs of real pixels (polygons of ~80 vertices, written first: "
                             "minutes at 40k²) instead of synthetic squares")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores; load average at start {os.getloadavg()[0]:.2f}")
    if args.only in (None, "throughput"):
        bench_throughput(args.size, args.workers, args.repeat, args.tile, args.overlap)
    if args.only in (None, "memory"):
        bench_memory([int(s) for s in args.sizes.split(",")], args.workers, args.real)


if __name__ == "__main__":
    main()
