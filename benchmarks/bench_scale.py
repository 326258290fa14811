"""Scale benchmarks (issue 6). Each section prints what it measured in this run.

1. ``plan``: planning a 200,000 × 200,000 job (header, tile grid, Dask graph, one delayed
   object per chunk) from a ``synthetic://`` image; goal < 5 s.
2. ``merge``: our NMS (``pipeline.merge.nms_indices``) over 1,000,000 clustered boxes (5 per
   object, as overlapping tiles and models give); goal < 5 s. Then ours and a naive all-pairs
   NMS (numpy: each kept box against every remaining box, O(n²)) side by side on crops of
   those same boxes (``--naive-boxes``, about 5,000 and 20,000), checked to keep the same
   boxes. Nothing is extrapolated or quoted.
3. ``memory`` (run first, so the client holds nothing from the other sections): peak RSS
   summed over the client and every process of its LocalCluster (nannies included) on 10k²,
   20k², 40k² images: ``synthetic://`` (pixels generated per chunk; ``centerpoint`` model, so
   features flow through the streaming merge) and a VRT mosaic of a real 512² RGB tile
   (``../shared/data/geotiff/osml_2_planes.tiff``, ``null`` model; a small nested VRT, nothing
   big is written). Goals: < 2 GB at 40k², flat as the
   image grows. (Throughput against a raw read is ``bench_throughput.py``, on a real file: a
   VRT that repeats one tile is served from GDAL's block cache, which flatters a raw read.)

Each timing is repeated (``--repeat``, 3; the memory jobs ``--memory-repeat``, 1) and printed
as the median and range of its runs.

Usage: ``python benchmarks/bench_scale.py [plan merge memory] [--repeat 3] [--boxes 1000000]
[--naive-boxes 5000 20000] [--sizes 10240 20480 40960] [--memory-repeat 1] [--workers 2]
[--sources synthetic vrt]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._stats import summary  # noqa: E402


# ---------------------------------------------------------------- 1. planning
def bench_plan(repeat: int = 3) -> None:
    from graphs.cluster import connect
    from graphs.image_job import chunk_results, model_spec, plan_image
    from pipeline.request import ImageRequest

    url = "synthetic://200000x200000"
    request = ImageRequest.parse({
        "jobId": "plan", "imageUrls": [url], "outputs": [{"type": "LOCAL", "path": "/tmp/unused"}],
        "imageProcessor": {"name": "null", "type": "BUILTIN"},
    })
    planned = []
    for _ in range(repeat):
        began = time.perf_counter()
        plan = plan_image(request, url)
        results = chunk_results(plan, request, model_spec(request))
        delayed = results.to_delayed()
        planned.append(time.perf_counter() - began)
    grid = plan.grid
    print(f"plan 200000x200000: {grid.n_tiles} tiles, {delayed.size} chunks, "
          f"{len(results.__dask_graph__())} graph tasks: {summary(planned)} (goal < 5 s)", flush=True)
    submitted = []
    with connect("local", 1) as client:
        for _ in range(repeat):
            began = time.perf_counter()
            futures = client.compute(list(delayed.ravel()))
            submitted.append(time.perf_counter() - began)
            count = len(futures)
            client.cancel(futures)
            del futures
            time.sleep(1.0)  # let the workers drop the cancelled tasks before the next or the close
    print(f"  and submitting its {count} chunk futures to a LocalCluster: {summary(submitted)}")


# ---------------------------------------------------------------- 2. merge
def clustered_boxes(n: int, extent: float = 200_000, per: int = 5,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` boxes in clusters of ``per`` near-duplicates (8-40 px objects), random scores."""
    rng = np.random.default_rng(seed)
    k = n // per
    cx, cy = np.repeat(rng.uniform(0, extent, (2, k)), per, axis=1) + rng.normal(0, 2, (2, k * per))
    w, h = np.repeat(rng.uniform(8, 40, (2, k)), per, axis=1) * rng.uniform(0.9, 1.1, (2, k * per))
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    return boxes, rng.uniform(0.1, 1.0, len(boxes))


def naive_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """All-pairs greedy NMS: each kept box against every remaining box (what simple code does)."""
    order = np.argsort(-scores, kind="stable")
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    while len(order):
        top, rest = order[0], order[1:]
        keep.append(top)
        w = np.minimum(boxes[top, 2], boxes[rest, 2]) - np.maximum(boxes[top, 0], boxes[rest, 0])
        h = np.minimum(boxes[top, 3], boxes[rest, 3]) - np.maximum(boxes[top, 1], boxes[rest, 1])
        inter = np.clip(w, 0, None) * np.clip(h, 0, None)
        iou = inter / (area[top] + area[rest] - inter)
        order = rest[iou <= threshold]
    return np.sort(np.array(keep))


def bench_merge(n: int = 1_000_000, subsets: tuple[int, ...] = (5_000, 20_000), repeat: int = 3) -> None:
    """Our NMS over ``n`` clustered boxes, then ours and :func:`naive_nms` side by side on
    subsets of those same boxes (each a square crop holding about ``sub`` of them, so the
    density is the same), checked to keep the same boxes."""
    from pipeline.merge import nms_indices

    boxes, scores = clustered_boxes(n)
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        kept = nms_indices(boxes, scores, 0.5)
        times.append(time.perf_counter() - began)
    print(f"merge {n} clustered boxes: ours (pipeline.merge.nms_indices) {summary(times)}, "
          f"{len(kept)} kept (goal < 5 s)", flush=True)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    extent = float(centres.max())
    for sub in subsets:
        side = extent * min(1.0, sub / n) ** 0.5
        inside = np.flatnonzero((centres < side).all(axis=1))
        b, s = boxes[inside], scores[inside]
        ours, naive = [], []
        for _ in range(repeat):
            began = time.perf_counter()
            ours_kept = nms_indices(b, s, 0.5)
            ours.append(time.perf_counter() - began)
            began = time.perf_counter()
            naive_kept = naive_nms(b, s, 0.5)
            naive.append(time.perf_counter() - began)
        same = np.array_equal(naive_kept, np.sort(ours_kept))
        print(f"  {len(b)} of those boxes (a crop): ours {summary(ours, digits=3)}; naive all-pairs NMS "
              f"(numpy, each kept box against every remaining box) {summary(naive)}: naive / ours "
              f"{statistics.median(naive) / statistics.median(ours):.0f}x; "
              f"{'same boxes kept' if same else 'DIFFERENT boxes kept'}", flush=True)
        if not same:
            raise SystemExit("bench_scale: naive and our NMS disagree")


# ---------------------------------------------------------------- 3. memory
#: the real tile the VRT mosaics repeat: 512 × 512 × 3 uint8, two parked airliners
REAL_TILE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "geotiff" / "osml_2_planes.tiff"


def write_mosaic(tile: Path, side: int, directory: Path) -> Path:
    """A ``side × side`` VRT that repeats ``tile`` (nothing big is written): a row VRT of
    ``tile`` side by side, and the mosaic of that row stacked, so the XML stays small."""
    import rasterio

    with rasterio.open(tile) as src:
        tw, th, bands = src.width, src.height, src.count
        dtype = {"uint8": "Byte", "uint16": "UInt16"}[src.dtypes[0]]

    def vrt(path: Path, width: int, height: int, source: Path, sw: int, sh: int,
            offsets: list[tuple[int, int]]) -> Path:
        body = []
        for band in range(1, bands + 1):
            parts = "".join(
                f'<SimpleSource><SourceFilename relativeToVRT="0">{source}</SourceFilename>'
                f"<SourceBand>{band}</SourceBand>"
                f'<SrcRect xOff="0" yOff="0" xSize="{sw}" ySize="{sh}"/>'
                f'<DstRect xOff="{x}" yOff="{y}" xSize="{sw}" ySize="{sh}"/></SimpleSource>'
                for x, y in offsets)
            body.append(f'<VRTRasterBand dataType="{dtype}" band="{band}">{parts}</VRTRasterBand>')
        path.write_text(
            f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}"><SRS>EPSG:4326</SRS>'
            f"<GeoTransform>10.0, 1e-5, 0.0, 50.0, 0.0, -1e-5</GeoTransform>"
            f"<BlockXSize>512</BlockXSize><BlockYSize>512</BlockYSize>{''.join(body)}</VRTDataset>")
        return path

    n_x, n_y = -(-side // tw), -(-side // th)
    row = vrt(directory / f"row{side}.vrt", n_x * tw, th, tile, tw, th, [(i * tw, 0) for i in range(n_x)])
    return vrt(directory / f"mosaic{side}.vrt", side, side, row, n_x * tw, th,
               [(0, j * th) for j in range(n_y)])


class PeakRSS:
    """Samples the RSS of this process plus all its descendants; ``peak`` in bytes, ``start``
    the sum when entered."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self.process = psutil.Process(os.getpid())
        self.interval = interval
        self.peak = self.start = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        total = 0
        for proc in [self.process, *self.process.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except Exception:  # noqa: BLE001 - a process that just ended
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def bench_memory(sizes: list[int], workers: int, sources: list[str], repeat: int = 1) -> None:
    from graphs.cluster import connect
    from graphs.image_job import plan_image, run_job
    from pipeline.request import ImageRequest

    # the mosaic is a VRT of a local file; VRT is off the default driver list (security)
    os.environ["MODEL_RUNNER_IMAGE_DRIVERS"] = "GTiff,VRT"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        peaks: dict[str, list[float]] = {}
        for kind in sources:
            for side in sizes:
                if kind == "vrt":  # the null model: reading is the whole job
                    url, model = str(write_mosaic(REAL_TILE, side, work)), "null"
                else:  # one bright square per 256 px cell; centerpoint: a box per tile to merge
                    url, model = f"synthetic://{side}x{side}", "centerpoint"
                request = ImageRequest.parse({
                    "jobId": f"mem-{kind}-{side}", "imageUrls": [url],
                    "outputs": [{"type": "LOCAL", "path": str(work / "out")}],
                    "imageProcessor": {"name": model, "type": "BUILTIN"},
                })
                grid = plan_image(request, url).grid
                jobs, rsses = [], []
                for _ in range(repeat):  # a fresh cluster each time
                    with PeakRSS() as rss, connect("local", workers) as client:
                        began = time.perf_counter()
                        result = run_job(request, client, collect_features=False)
                        jobs.append(time.perf_counter() - began)
                    assert result.status == "SUCCESS", result.summary
                    rsses.append(rss.peak / 2**30)
                peaks.setdefault(kind, []).append(statistics.median(rsses))
                print(f"{kind:9s} {side}x{side} ({grid.n_tiles} tiles, {grid.chunks_x * grid.chunks_y} "
                      f"chunks, {workers} workers, {model}, {result.summary['features']} features): job "
                      f"{summary(jobs, digits=1)}; peak RSS of client + cluster processes "
                      f"{summary(rsses, 'GiB')} (the client {rss.start / 2**30:.2f} GiB before)", flush=True)
        for kind, values in peaks.items():  # the medians
            print(f"{kind}: peak RSS (medians) {' / '.join(f'{v:.2f}' for v in values)} GiB at "
                  f"{' / '.join(f'{s // 1024}k' for s in sizes)}; largest/smallest "
                  f"{max(values) / min(values):.2f} (goal: < 2 GB at 40k, flat)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*", default=["plan", "merge", "memory"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10240, 20480, 40960])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each plan and merge timing")
    parser.add_argument("--boxes", type=int, default=1_000_000)
    parser.add_argument("--naive-boxes", type=int, nargs="+", default=[5_000, 20_000],
                        help="about how many of the boxes ours and a naive NMS both merge")
    parser.add_argument("--memory-repeat", type=int, default=1, help="jobs at each memory size")
    parser.add_argument("--sources", nargs="+", default=["synthetic", "vrt"], choices=["synthetic", "vrt"])
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, {os.uname().machine}")
    # memory first: what plan and merge allocate here (1,000,000 boxes) stays in this process's
    # RSS and was counted in the memory jobs' peak (1.14 GiB against 0.76 GiB at 10k²)
    if "memory" in args.sections:
        bench_memory(args.sizes, args.workers, args.sources, args.memory_repeat)
    if "plan" in args.sections:
        bench_plan(args.repeat)
    if "merge" in args.sections:
        bench_merge(args.boxes, tuple(args.naive_boxes), args.repeat)


if __name__ == "__main__":
    main()
