"""Job throughput with the ``null`` model against a raw windowed read of the same pixels.

Both sides read every chunk (plus halo) of a generated tiled GeoTIFF once. The baseline is a
single process looping over ``rasterio`` windowed reads; the pipeline is the full job
(plan → map_overlap read → tile → model → merge → write) on a LocalCluster. Also times the
reduce stages (geolocation and NMS) over 26,000 boxes. Prints ratios and peak RSS.

Run: ``.venv/bin/python benchmarks/bench_throughput.py [--size 8192] [--workers 2]``
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window


def peak_rss_mib() -> tuple[float, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def raw_read(path: Path, chunk: int, halo: int) -> float:
    start = time.perf_counter()
    with rasterio.open(path) as src:
        for y in range(0, src.height, chunk):
            for x in range(0, src.width, chunk):
                w = min(chunk + halo, src.width - x)
                h = min(chunk + halo, src.height - y)
                src.read(window=Window(x, y, w, h))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    from graphs.cluster import connect
    from graphs.image_job import run_job
    from pipeline.demo import write_scene
    from pipeline.detections import Detections
    from pipeline.geolocate import to_features
    from pipeline.io import describe, sensor_model
    from pipeline.merge import nms
    from pipeline.request import ImageRequest
    from pipeline.tiling import chunk_size

    with tempfile.TemporaryDirectory() as tmp:
        scene = write_scene(Path(tmp) / "scene.tif", size=args.size, count=200)
        tile, overlap = 1024, 50
        chunk = chunk_size(tile, overlap)
        baseline = raw_read(scene.path, chunk, overlap)
        request = ImageRequest.parse({
            "jobId": "bench", "imageUrls": [str(scene.path)],
            "outputs": [{"type": "LOCAL", "path": tmp}],
            "imageProcessor": {"name": "null", "type": "BUILTIN"},
        })
        with connect("local", args.workers) as client:
            client.run(lambda: None)  # workers are up before timing
            start = time.perf_counter()
            result = run_job(request, client)
            job = time.perf_counter() - start
        megapixels = args.size**2 / 1e6
        print(f"image {args.size}x{args.size}x3 uint8, {result.summary['images'][0]['tiles']} tiles, "
              f"chunk {chunk}px, {args.workers} workers")
        print(f"raw windowed read (1 process): {baseline:.2f} s ({megapixels / baseline:.0f} Mpx/s)")
        print(f"pipeline, null model:          {job:.2f} s ({megapixels / job:.0f} Mpx/s)")
        print(f"ratio pipeline/raw-read time: {job / baseline:.2f}")

        rng = np.random.default_rng(0)
        xy = rng.uniform(0, args.size - 40, size=(26000, 2))
        boxes = np.hstack([xy, xy + rng.uniform(5, 40, size=(26000, 2))])
        dets = Detections(boxes, rng.uniform(0, 1, 26000), np.full(26000, "x", dtype=object))
        model = sensor_model(describe(str(scene.path)))
        start = time.perf_counter()
        to_features(dets, model, image_url="x", job_id="bench")
        geo = time.perf_counter() - start
        start = time.perf_counter()
        kept = nms(dets, 0.75)
        merge = time.perf_counter() - start
        print(f"geolocate 26,000 boxes: {geo * 1000:.0f} ms; NMS: {merge * 1000:.0f} ms "
              f"({len(kept)} kept)")
    own, children = peak_rss_mib()
    print(f"peak RSS: client {own:.0f} MiB, largest child process {children:.0f} MiB")


if __name__ == "__main__":
    main()
