"""``detect(DataArray)`` against the URL path on the same COG, in one run, on one cluster.

Three ways to the same features of one ``--size``² COG (``bench_throughput.write_cog``: real RGB
pixels, 512-px blocks, DEFLATE) with the same model, tiles and merge, each computed to a
GeoDataFrame on the same LocalCluster of ``--workers`` single-threaded processes (nothing
written):

* ``url``: :func:`pipeline.lazy_features` of a request naming the file (each chunk task reads
  its own window, halo included);
* ``array, grid chunks``: ``rioxarray.open_rasterio`` with chunks that already are the job's
  chunks (the rechunk is a no-op; the halo comes from the neighbours by ``overlap``);
* ``array, 512 chunks``: the file's own 512-px blocks as chunks, rechunked to the job's chunks.

One warm-up of each, then ``--repeat`` alternating rounds; the medians are compared. The
features of the three are checked equal. Prints the machine's load (compare quiet runs).

Run: ``.venv/bin/python benchmarks/bench_xarray.py [--size 16384] [--workers 2] [--repeat 3]``
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
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--model", default="null")
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--overlap", type=int, default=50)
    args = parser.parse_args()

    import rioxarray
    from bench_throughput import write_cog

    import pipeline
    from graphs.array_job import grid_chunks
    from graphs.cluster import connect
    from pipeline.tiling import DEFAULT_CHUNK_TARGET, TileGrid, chunk_size

    print(f"machine: {os.cpu_count()} cores; load average at start {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="bench-xarray-") as tmp:
        began = time.perf_counter()
        cog = write_cog(Path(tmp) / "bench.tif", args.size)
        print(f"wrote {args.size}² COG in {time.perf_counter() - began:.1f} s")
        request = {"jobId": "bench", "imageUrls": [str(cog)], "imageProcessorTileSize": args.tile,
                   "imageProcessorTileOverlap": args.overlap,
                   "imageProcessor": {"name": args.model, "type": "BUILTIN"}}
        grid = TileGrid(args.size, args.size, args.tile, args.overlap,
                        chunk_size(args.tile, args.overlap, DEFAULT_CHUNK_TARGET))
        ys, xs = grid_chunks(grid)

        def url() -> Any:
            return pipeline.lazy_features(request)

        def array(chunks: Any) -> Any:
            data = rioxarray.open_rasterio(cog, chunks=chunks, lock=False)
            return pipeline.detect(data, args.model, tile_size=args.tile, overlap=args.overlap,
                                   image_url=str(cog))

        ways = {"url": url,
                "array, grid chunks": lambda: array({"band": -1, "y": ys, "x": xs}),
                "array, 512 chunks": lambda: array({"band": -1, "y": 512, "x": 512})}
        times: dict[str, list[float]] = {name: [] for name in ways}
        found: dict[str, Any] = {}
        with connect("local", args.workers) as client:
            for round_ in range(args.repeat + 1):
                for name, build in ways.items():
                    began = time.perf_counter()
                    features = client.compute(build()).result()
                    seconds = time.perf_counter() - began
                    if round_:
                        times[name].append(seconds)
                    found[name] = features
        boxes = {n: np.array(sorted(map(tuple, f["imageBBox"].tolist()))) for n, f in found.items()}
        same = all(np.array_equal(boxes["url"], b) for b in boxes.values())
        tiles = grid.n_tiles
        base = statistics.median(times["url"])
        print(f"{args.size}² px, {tiles} tiles of {args.tile} (overlap {args.overlap}), model {args.model}, "
              f"{grid.chunks_y}×{grid.chunks_x} chunks, {args.workers} workers; "
              f"{len(found['url'])} features, equal in all three: {same}")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"  {name:20s} median {median:7.2f} s ({tiles / median:6.1f} tiles/s), "
                  f"{median / base:.2f}× the URL path; runs {', '.join(f'{v:.2f}' for v in values)}")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
