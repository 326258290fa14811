"""S3 read throughput: the pipeline (``null`` model) vs a plain windowed rasterio read.

Both read the same COG through GDAL's ``/vsis3/`` from the same server: a plain HTTP range
server in its own process that speaks the path-style S3 GET/HEAD that GDAL uses and counts the
bytes it sends (moto is not used: it reads the whole object for every range request). Prints
seconds, MB/s, the ratio pipeline / baseline, and bytes fetched vs the file size and vs the
bytes of the full-resolution blocks (what one read of every pixel must fetch: the ideal 1.0).
The pipeline's chunks overlap by the tile overlap, so a block column and row at each chunk seam
is wanted by two chunks; it is fetched once when one worker reads both (GDAL's block cache
and the worker's open dataset keep it), twice otherwise.

Each side runs ``--repeat`` times (each run a fresh object key: GDAL caches ``/vsis3/`` objects
by name) and its seconds are printed as the median and range of its runs; the JSON holds the
medians, and the bytes of the first run.

Usage: ``python benchmarks/bench_s3_read.py [--size 8192] [--tile 512] [--workers 2] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._stats import summary  # noqa: E402


def serve(directory: str, port: int) -> None:
    """A path-style S3 stand-in: ``GET/HEAD /<bucket>/<key>`` with ``Range``, ``/__bytes``."""
    sent = {"bytes": 0, "requests": 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _file(self) -> Path | None:
            path = Path(directory) / self.path.split("?", 1)[0].lstrip("/")
            return path if path.is_file() else None

        def do_HEAD(self) -> None:  # noqa: N802
            self._answer(body=False)

        def do_GET(self) -> None:  # noqa: N802
            if self.path.startswith("/__bytes"):
                data = json.dumps(sent).encode()
                if "reset" in self.path:
                    sent.update(bytes=0, requests=0)
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            path = self._file()
            if path is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            size = path.stat().st_size
            start, end = 0, size - 1
            match = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if match:
                start = int(match.group(1))
                end = min(int(match.group(2)) if match.group(2) else size - 1, size - 1)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if body:
                with open(path, "rb") as handle:
                    handle.seek(start)
                    data = handle.read(end - start + 1)
                self.wfile.write(data)
                sent["bytes"] += len(data)
                sent["requests"] += 1

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


def counter(port: int, reset: bool = False) -> dict[str, int]:
    url = f"http://127.0.0.1:{port}/__bytes" + ("?reset" if reset else "")
    with urllib.request.urlopen(url) as answer:  # noqa: S310 - 127.0.0.1 only
        return dict(json.loads(answer.read()))


def baseline(url: str, options: dict[str, str], chunk: int) -> float:
    """A plain windowed read of every chunk, one after another, in this process."""
    import rasterio
    from rasterio.windows import Window

    from pipeline.reading import gdal_env, gdal_path

    began = time.perf_counter()
    with gdal_env(url, options), rasterio.open(gdal_path(url)) as src:
        for y in range(0, src.height, chunk):
            for x in range(0, src.width, chunk):
                src.read(window=Window(x, y, min(chunk, src.width - x), min(chunk, src.height - y)))
    return time.perf_counter() - began


def full_resolution_bytes(path: Path) -> int:
    """Bytes of the full-resolution image's blocks (no header, no overviews)."""
    import rasterio

    with rasterio.open(path) as src:
        bands = 1 if str(src.profile.get("interleave", "")).lower() == "pixel" else src.count
        return sum(src.block_size(band, i, j) for band in range(1, bands + 1)
                   for (i, j), _ in src.block_windows(1))


def seam_bound(grid: Any, block_w: int, block_h: int) -> float:
    """Blocks read / blocks in the image when every chunk window (chunk + halo) is read alone:
    a chunk seam that cuts through a block column or row makes two chunks read it."""
    import math

    def axis(length: int, block: int, chunks: int) -> float:
        blocks = math.ceil(length / block)
        read = 0
        for c in range(chunks):
            x0 = c * grid.chunk
            x1 = min(x0 + grid.chunk + grid.overlap, length)
            read += math.ceil(x1 / block) - x0 // block
        return read / blocks

    return axis(grid.width, block_w, grid.chunks_x) * axis(grid.height, block_h, grid.chunks_y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--serve", nargs=2, metavar=("DIR", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return

    from benchmarks.bench_throughput import write_cog
    from graphs.cluster import connect
    from graphs.image_job import plan_image, run_job
    from pipeline.reading import read_options
    from pipeline.request import ImageRequest
    from tests.conftest import free_port

    work = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    (work / "bucket").mkdir()
    path = write_cog(work / "bucket" / "scene.tif", args.size)
    size = path.stat().st_size
    full_res = full_resolution_bytes(path)
    names = ["warm.tif", *(f"{side}-{k}.tif" for side in ("scene", "base") for k in range(args.repeat))]
    for name in names:  # fresh keys: GDAL caches /vsis3/ objects by name
        os.link(path, work / "bucket" / name)
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(work), str(port)])  # noqa: S603
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")
    url = "s3://bucket/scene.tif"
    try:
        for _ in range(100):
            try:
                counter(port)
                break
            except OSError:
                time.sleep(0.05)
        request = ImageRequest.parse({
            "jobId": "bench-s3", "imageUrls": ["s3://bucket/warm.tif"], "outputs": [],
            "imageProcessor": {"name": "null", "type": "BUILTIN"},
            "imageProcessorTileSize": args.tile, "imageProcessorTileOverlap": args.overlap,
        })
        with connect("local", workers=args.workers) as client:
            run_job(request, client)  # warm the workers (imports, GDAL)
            pipeline_runs = []
            for k in range(args.repeat):
                request = request.model_copy(update={"image_urls": [f"s3://bucket/scene-{k}.tif"]})
                counter(port, reset=True)
                began = time.perf_counter()
                result = run_job(request, client)
                pipeline_runs.append(time.perf_counter() - began)
                fetched = counter(port, reset=True)
                if k == 0:
                    pipeline_bytes = fetched
        plan = plan_image(request, url)
        grid, info = plan.grid, plan.info
        base_runs = []
        for k in range(args.repeat):
            base_url = f"s3://bucket/base-{k}.tif"
            counter(port, reset=True)  # the plan's header reads are not the baseline's
            base_runs.append(baseline(base_url, read_options(base_url), grid.chunk))
            fetched = counter(port, reset=True)
            if k == 0:
                base_bytes = fetched
    finally:
        server.terminate()
        server.wait()
    print(f"pipeline: {summary(pipeline_runs)}; baseline: {summary(base_runs)}")
    pipeline_seconds, base_seconds = statistics.median(pipeline_runs), statistics.median(base_runs)
    pixels_mb = args.size * args.size * 3 / 1e6
    report = {
        "image": f"{args.size}x{args.size}x3 uint8 COG, {size / 1e6:.1f} MB",
        "pipeline": {"seconds": round(pipeline_seconds, 3),
                     "MPix/s": round(pixels_mb / 3 / pipeline_seconds, 1),
                     "bytesFetched": pipeline_bytes["bytes"], "requests": pipeline_bytes["requests"],
                     "workers": args.workers, "status": result.status,
                     "jobSeconds": result.summary.get("seconds")},
        "baseline": {"seconds": round(base_seconds, 3), "MPix/s": round(pixels_mb / 3 / base_seconds, 1),
                     "bytesFetched": base_bytes["bytes"], "requests": base_bytes["requests"]},
        "ratio_pipeline_over_baseline_seconds": round(pipeline_seconds / base_seconds, 2),
        "fullResolutionBytes": full_res,
        "pipelineBytes_over_fileSize": round(pipeline_bytes["bytes"] / size, 3),
        "baselineBytes_over_fileSize": round(base_bytes["bytes"] / size, 3),
        "pipelineBytes_over_fullResolution": round(pipeline_bytes["bytes"] / full_res, 3),
        "baselineBytes_over_fullResolution": round(base_bytes["bytes"] / full_res, 3),
        "chunk": {"size": grid.chunk, "count": grid.chunks_x * grid.chunks_y,
                  "block": [info.block_width, info.block_height]},
        # if no seam block were shared by one worker: each seam re-reads a block column/row
        "seamBound_over_fullResolution": round(seam_bound(grid, info.block_width, info.block_height), 3),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
