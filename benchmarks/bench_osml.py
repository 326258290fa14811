"""Side by side with OSML Model Runner 2.3.0: the same 10240 × 10240 COG, the same
``centerpoint`` model over HTTP, 1024-pixel tiles with overlap 50.

Both sides run one after the other (never at once) against one model server, a subprocess
(``model-runner serve-model``, which also reads the chunked bodies OSML sends), with the same
request: the local COG, ``HTTP_ENDPOINT``, tile size 1024, overlap 50,
``imageProcessorTileFormat`` ``--tile-format`` (NITF, OSML's default) without compression.
Each side does one warm-up job and then ``--runs`` timed jobs; the script prints the median job
wall time of each side, CPU seconds per job, the load average, and the ratio.

Ours: ``run_job`` on a LocalCluster of ``--workers`` processes; the wall time is ``run_job``'s
(plan, read, encode, model calls, merge, write GeoJSON); CPU seconds are the client's and every
cluster process's.

OSML's: its own service, in its own venv, driven by ``benchmarks/osml/drive_osml.py``:

1. The venv ``benchmarks/.osmlenv`` (git-ignored) is built on first use:
   ``python3 -m venv --system-site-packages benchmarks/.osmlenv`` from a Python that already
   imports GDAL's bindings (``osgeo``: on Debian ``apt-get install python3-gdal`` gives them to
   ``/usr/bin/python3``, GDAL 3.6.2 on bookworm), then ``pip install osml-model-runner==2.3.0
   "numpy<2"``. Without such a Python but with ``gdal-config`` (libgdal-dev), it installs
   ``GDAL==$(gdal-config --version)`` from source instead. ``--osml-python`` picks the base Python.
2. A moto server (``python -m moto.server`` from this project's venv, a subprocess on
   127.0.0.1) stands in for DynamoDB, SQS, SNS and S3; the driver gets it through
   ``AWS_ENDPOINT_URL`` and creates the four DynamoDB tables, two queues, two status topics and
   the output bucket that OSML's ``ServiceConfig`` names.
3. The driver runs ``ModelRunner().run()`` (OSML's container loop, ``WORKERS`` = ``--osml-workers``
   tile threads) and submits each ImageRequest on the image queue with an ``S3`` output. Its
   wall time is OSML's own job time (``end_time - start_time`` of its job row); CPU seconds are
   the OSML process's; the moto server's are printed apart, since a real deployment would not
   spend them on this machine.

If OSML cannot be installed or run, the script says why in one line and still runs our side.
The issue records OSML 2.3.0 at about 9.2 s for this job on a quiet 2-core machine.

Usage: ``python benchmarks/bench_osml.py [--runs 3] [--workers 2] [--osml-workers 4]
[--tile-format NITF|GTIFF] [--no-osml]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OSML_VENV = HERE / ".osmlenv"
OSML_PACKAGES = ["osml-model-runner==2.3.0", "numpy<2"]
sys.path.insert(0, str(ROOT))


def write_cog(path: Path, size: int = 10240) -> Path:
    """A 3-band uint8 COG (DEFLATE, 512 blocks) with some texture, written in strips."""
    import rasterio
    import rasterio.shutil
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    staging = path.with_suffix(".tmp.tif")
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8",
               "tiled": True, "blockxsize": 512, "blockysize": 512, "compress": "deflate",
               "crs": "EPSG:4326", "transform": from_origin(10.0, 50.0, 1e-5, 1e-5), "BIGTIFF": "IF_SAFER"}
    rng = np.random.default_rng(0)
    with rasterio.open(staging, "w", **profile) as dst:
        for y in range(0, size, 1024):
            rows = min(1024, size - y)
            dst.write(rng.integers(20, 120, (3, rows, size), dtype=np.uint8), window=Window(0, y, size, rows))
    rasterio.shutil.copy(staging, path, driver="COG", compress="DEFLATE", blocksize=512)
    staging.unlink()
    return path


def cpu_seconds(process: Any, exclude: frozenset[int] = frozenset()) -> float:
    """CPU seconds (user + system) of ``process`` and its live descendants, except ``exclude``."""
    total = 0.0
    for proc in [process, *process.children(recursive=True)]:
        if proc.pid in exclude:
            continue
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except Exception:  # noqa: BLE001 - a process that just ended
            pass
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_model_server(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``model-runner serve-model --model centerpoint`` as a subprocess; returns it and its URL."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "-q", "serve-model", "--model", "centerpoint",
                             "--port", "0"],
                            stdout=subprocess.PIPE, stderr=log.open("wb"), cwd=ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().strip()
    if not line.startswith("serving"):
        proc.kill()
        raise SystemExit(f"bench_osml: model server did not start (see {log})")
    return proc, line.split(" on ", 1)[1].split()[0]


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def request_for(job_id: str, cog: Path, model_url: str, out: str, tile_format: str) -> dict[str, Any]:
    return {"jobId": job_id, "imageUrls": [str(cog)], "outputs": [{"type": "LOCAL", "path": out}],
            "imageProcessor": {"name": model_url, "type": "HTTP_ENDPOINT"},
            "imageProcessorTileSize": 1024, "imageProcessorTileOverlap": 50,
            "imageProcessorTileFormat": tile_format, "imageProcessorTileCompression": "NONE"}


def ours(cog: Path, model_url: str, server_pid: int, args: argparse.Namespace) -> tuple[float, float]:
    """Our median job wall time and CPU seconds per job (client and cluster processes)."""
    import psutil

    from graphs.cluster import connect
    from graphs.image_job import run_job
    from pipeline.request import ImageRequest

    print(f"ours: starting ({load()})", flush=True)
    server = psutil.Process(server_pid)
    walls, cpus, model_cpus = [], [], []
    with tempfile.TemporaryDirectory() as out, connect("local", args.workers) as client:
        me = psutil.Process()
        for k in range(args.runs + 1):  # the first run warms connections and imports: not counted
            request = ImageRequest.parse(request_for(f"osml-side-{k}", cog, model_url + "/invocations",
                                                     out, args.tile_format))
            cpu0, model0 = cpu_seconds(me, frozenset({server_pid})), cpu_seconds(server)
            began = time.perf_counter()
            result = run_job(request, client, collect_features=False)
            wall = time.perf_counter() - began
            cpu, model = cpu_seconds(me, frozenset({server_pid})) - cpu0, cpu_seconds(server) - model0
            if result.status != "SUCCESS":
                raise SystemExit(f"ours: job {request.job_id} ended {result.status}")
            if k:
                walls.append(wall)
                cpus.append(cpu)
                model_cpus.append(model)
        image = result.summary["images"][0]
        each = ", ".join(f"{w:.2f}" for w in walls)
        print(f"ours: {image['tiles']} tiles, {result.summary['features']} features; job wall median "
              f"{statistics.median(walls):.2f} s over {args.runs} runs ({each}); "
              f"CPU {statistics.median(cpus):.1f} s per job (client and {args.workers} workers), "
              f"model server {statistics.median(model_cpus):.1f} s ({load()})", flush=True)
        seconds = result.summary["seconds"]
        print(f"ours, last job: total {seconds['total']:.2f} s, client stages {seconds['stages']}, "
              f"worker seconds {seconds['workers']}", flush=True)
    return statistics.median(walls), statistics.median(cpus)


def _run(step: list[str]) -> str | None:
    """Run an install step; None when it worked, else its last error line."""
    done = subprocess.run(step, capture_output=True, text=True)
    if done.returncode == 0:
        return None
    lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip() and "WARNING" not in ln]
    return f"{' '.join(step[:4])}: {(lines or ['failed'])[-1].strip()}"


def osml_python(base: str | None) -> tuple[Path | None, str | None]:
    """OSML's venv Python, building the venv when missing; or why it cannot be had."""
    python = OSML_VENV / "bin" / "python"
    check = [str(python), "-c", "import osgeo.gdal, aws.osml.model_runner"]
    if python.exists() and subprocess.run(check, capture_output=True, env=_osml_import_env()).returncode == 0:
        return python, None
    candidates = [base] if base else ["/usr/bin/python3", "python3"]
    with_gdal = next((c for c in candidates if shutil.which(c) and subprocess.run(
        [c, "-c", "import osgeo.gdal, venv"], capture_output=True).returncode == 0), None)
    if with_gdal:
        steps = [[with_gdal, "-m", "venv", "--clear", "--system-site-packages", str(OSML_VENV)],
                 [str(python), "-m", "pip", "install", "-q", *OSML_PACKAGES]]
    elif shutil.which("gdal-config"):
        version = subprocess.run(["gdal-config", "--version"], capture_output=True, text=True).stdout.strip()
        steps = [[sys.executable, "-m", "venv", "--clear", str(OSML_VENV)],
                 [str(python), "-m", "pip", "install", "-q", *OSML_PACKAGES, "setuptools", "wheel"],
                 [str(python), "-m", "pip", "install", "-q", "--no-build-isolation", f"GDAL=={version}"]]
    else:
        return None, ("no GDAL Python bindings: install python3-gdal (apt) for /usr/bin/python3, "
                      "or libgdal-dev for a source build, or pass --osml-python")
    print(f"osml: building {OSML_VENV.relative_to(ROOT)} (a minute or two)", flush=True)
    for step in steps:
        if (why := _run(step)) is not None:
            return None, why
    done = subprocess.run(check, capture_output=True, text=True, env=_osml_import_env())
    if done.returncode:
        return None, f"OSML does not import: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
    return python, None


def _osml_import_env() -> dict[str, str]:
    """OSML's ServiceConfig reads these at import time; any values do for an import check."""
    names = ["JOB_TABLE", "REGION_REQUEST_TABLE", "ENDPOINT_TABLE", "FEATURE_TABLE", "IMAGE_QUEUE",
             "REGION_QUEUE", "WORKERS_PER_CPU", "WORKERS"]
    return {**os.environ, **{n: "1" for n in names}, "AWS_DEFAULT_REGION": "us-east-1"}


def theirs(python: Path, cog: Path, model_url: str, server_pid: int, args: argparse.Namespace,
           tmp: Path) -> tuple[float, float] | str:
    """OSML's median job wall time and CPU per job; or why it did not run."""
    port = free_port()
    moto_log, driver_log, out = tmp / "moto.log", tmp / "osml-driver.log", tmp / "osml.json"
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=moto_log.open("wb"))
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            return "the moto server did not start"
        print(f"osml: starting ({load()})", flush=True)
        # OSML's metrics (aws-embedded-metrics, environment "local") go to stdout: discarded
        done = subprocess.run(
            [str(python), str(HERE / "osml" / "drive_osml.py"), "--endpoint", f"http://127.0.0.1:{port}",
             "--image", str(cog), "--model-url", model_url + "/invocations", "--out", str(out),
             "--runs", str(args.runs), "--workers", str(args.osml_workers), "--tile-format", args.tile_format,
             "--watch", str(moto.pid), str(server_pid)],
            stdout=subprocess.DEVNULL, stderr=driver_log.open("wb"), cwd=tmp)
        result = json.loads(out.read_text()) if out.exists() else {}
        if done.returncode or "error" in result or not result.get("runs"):
            lines = driver_log.read_text(errors="replace").strip().splitlines()
            return result.get("error") or (lines or ["no output"])[-1]
    finally:
        moto.terminate()
        moto.wait()
    runs = result["runs"]
    walls = [r["wall"] for r in runs]
    cpus = [r["cpu"] for r in runs]
    last = runs[-1]
    print(f"osml: {last['tiles']} tiles in {last['regions']} regions, {last['features']} features; "
          f"job wall median {statistics.median(walls):.2f} s over {len(runs)} runs "
          f"({', '.join(f'{w:.2f}' for w in walls)}; seen from the queue "
          f"{statistics.median(r['observed'] for r in runs):.2f} s); CPU {statistics.median(cpus):.1f} s "
          f"per job ({result['workers']} tile threads), moto server "
          f"{statistics.median(r['watched_cpu'][0] for r in runs):.1f} s, model server "
          f"{statistics.median(r['watched_cpu'][1] for r in runs):.1f} s ({load()})", flush=True)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed jobs per side (after one warm-up)")
    parser.add_argument("--workers", type=int, default=2, help="our LocalCluster worker processes")
    parser.add_argument("--osml-workers", type=int, default=4, help="OSML's WORKERS (tile threads)")
    parser.add_argument("--size", type=int, default=10240, help="image width and height")
    parser.add_argument("--tile-format", default="NITF", choices=["NITF", "GTIFF"])
    parser.add_argument("--osml-python", help="a Python that imports osgeo, to base OSML's venv on")
    parser.add_argument("--no-osml", action="store_true", help="run our side only")
    args = parser.parse_args()
    print(f"bench_osml: {args.size}² COG, centerpoint over HTTP, tiles 1024/50 {args.tile_format}, "
          f"{os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        cog = write_cog(tmp / "bench.tif", args.size)
        server, model_url = start_model_server(tmp / "model-server.log")
        try:
            wall, cpu = ours(cog, model_url, server.pid, args)
            if args.no_osml:
                print("osml: not run (--no-osml); the issue's reference is ~9.2 s on 2 quiet cores")
                return
            python, why = osml_python(args.osml_python)
            outcome = theirs(python, cog, model_url, server.pid, args, tmp) if python else str(why)
            if isinstance(outcome, str):
                print(f"osml: cannot run here: {outcome}")
                return
            print(f"ratio: OSML / ours job wall time = {outcome[0] / wall:.2f} (goal ≥ 3); "
                  f"CPU per job OSML / ours = {outcome[1] / cpu:.2f} (model and moto servers apart)")
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
