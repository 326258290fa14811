"""Side by side with OSML Model Runner 2.3.0: the same 10240 × 10240 COG, the same
``centerpoint`` model over HTTP, 1024-pixel tiles with overlap 50, the same request through the
same entry, the same AWS stand-in.

Each round runs each side once (the order alternates between rounds), as a fresh process that
takes ``--jobs`` ImageRequest messages from an SQS queue and exits:

- the request: the local COG, ``HTTP_ENDPOINT`` (one ``model-runner serve-model --model
  centerpoint`` subprocess serves both sides; it also reads the chunked bodies OSML sends),
  tile size 1024, overlap 50, ``imageProcessorTileFormat`` ``--tile-format`` (NITF, OSML's
  default) without compression, and an ``S3`` output (bucket ``bench-osml-output``, prefix
  ``out``). The same JSON body goes on the image queue for both sides, before the process starts.
- the stand-in: a fresh moto server (``python -m moto.server``, a subprocess on 127.0.0.1) per
  side and round, with the same layout for both: the four DynamoDB tables, two queues, two
  status topics and the output bucket that OSML's ``ServiceConfig`` names
  (``benchmarks/osml/drive_osml.py``). Both sides read the image queue, publish status to the
  image status topic and write their outputs to the bucket; OSML also keeps its job, region and
  feature rows in DynamoDB, ours its part files and manifest beside the outputs.
- ours: ``python -m pipeline worker --queue-url <image queue> --max-jobs N --exit-when-idle``
  (our queue worker, a LocalCluster of ``--workers`` processes). It writes GeoJSON, GeoParquet
  and a summary per job (OSML: GeoJSON only).
- OSML: its own service loop (``ModelRunner().run()``, ``WORKERS`` = ``--osml-workers`` tile
  threads) in its own venv, run by ``drive_osml.py``, which stops the loop after N jobs ended.

Measured per side and round:

- process: wall time from launch to exit (imports, cluster start-up and shut-down included);
- job: from the first job's start to the last job's end, by each side's own clock: OSML's job
  row (``start_time`` when it starts the request, ``end_time`` after its output is written);
  ours the summary's ``startTime``/``endTime`` (``run_job`` begins; features written);
  with ``--jobs`` > 1 also the last (warm) job alone;
- CPU seconds: the side's process and all its reaped descendants (``os.wait4``'s rusage), and,
  by psutil ``cpu_times()`` before launch and after exit, the moto server's and the model
  server's; "charged" is the sum: each side pays for its stand-ins.

The script prints the median and range over the rounds of each figure, the load average, and
the ratios OSML / ours of the medians. OSML's venv ``benchmarks/.osmlenv`` (git-ignored) is built
on first use: ``python3 -m venv --system-site-packages`` from a Python that imports GDAL's
bindings (``osgeo``: on Debian ``apt-get install python3-gdal python3-venv`` gives them to
``/usr/bin/python3``, GDAL 3.6.2 on bookworm), then ``pip install osml-model-runner==2.3.0
"numpy<2"``; without such a Python but with ``gdal-config`` (libgdal-dev), ``GDAL`` is built from
source; ``--osml-python`` picks the base Python. If OSML cannot be installed or run, the script
says why in one line and still runs our side.

Usage: ``python benchmarks/bench_osml.py [--rounds 3] [--jobs 2] [--workers 2] [--osml-workers 4]
[--tile-format NITF|GTIFF] [--size 10240] [--no-osml]``
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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OSML_VENV = HERE / ".osmlenv"
OSML_PACKAGES = ["osml-model-runner==2.3.0", "numpy<2"]
sys.path[:0] = [str(ROOT), str(HERE / "osml")]

import drive_osml as stand_in  # noqa: E402 - benchmarks/osml, on the path above

from benchmarks._stats import summary  # noqa: E402


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def start_moto(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A moto server subprocess on 127.0.0.1; returns it and its URL."""
    port = free_port()
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=log.open("ab"))
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return moto, f"http://127.0.0.1:{port}"
        except OSError:
            if moto.poll() is not None:
                break
            time.sleep(0.1)
    moto.kill()
    moto.wait()
    raise SystemExit(f"bench_osml: the moto server did not start (see {log})")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of the live process ``pid`` (psutil)."""
    import psutil

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def request_body(job_id: str, cog: Path, model_url: str, tile_format: str) -> str:
    """The ImageRequest message both sides get: OSML's form, with an ``S3`` output."""
    return json.dumps({
        "jobId": job_id, "imageUrls": [str(cog)],
        "outputs": [{"type": "S3", "bucket": stand_in.BUCKET, "prefix": "out"}],
        "imageProcessor": {"name": model_url, "type": "HTTP_ENDPOINT"},
        "imageProcessorTileSize": 1024, "imageProcessorTileOverlap": 50,
        "imageProcessorTileFormat": tile_format, "imageProcessorTileCompression": "NONE",
    })


@dataclass
class SideRun:
    """One process of one side: its times (s), CPU seconds and what its jobs produced."""

    process: float
    job: float
    last_job: float
    cpu: float
    moto_cpu: float
    model_cpu: float
    tiles: int
    features: list[int] = field(default_factory=list)
    #: where the last job's time went, as far as the side tells
    detail: str = ""

    @property
    def charged(self) -> float:
        return self.cpu + self.moto_cpu + self.model_cpu


#: (start, end) epoch seconds, tiles and features of each job, read back from the stand-in, and
#: where the last job's time went
Collected = tuple[list[tuple[float, float, int, int]], str]


def features_written(s3: Any, job_id: str) -> int:
    """Features in the job's ``out/<jobId>.geojson``, which both sides write."""
    body = s3.get_object(Bucket=stand_in.BUCKET, Key=f"out/{job_id}.geojson")["Body"].read()
    return len(json.loads(body)["features"])


def collect_ours(env: dict[str, str], job_ids: list[str], cog: Path) -> Collected:
    """Our jobs' clocks from their ``<jobId>.summary.json`` in the bucket."""
    s3 = stand_in.aws_client("s3", env)
    out = []
    for job_id in job_ids:
        done = json.loads(s3.get_object(Bucket=stand_in.BUCKET,
                                        Key=f"out/{job_id}.summary.json")["Body"].read())
        if done["status"] != "SUCCESS":
            raise RuntimeError(f"ours: job {job_id} ended {done['status']}: {done.get('reason')}")
        out.append((datetime.fromisoformat(done["startTime"]).timestamp(),
                    datetime.fromisoformat(done["endTime"]).timestamp(),
                    int(done["images"][0]["tiles"]), features_written(s3, job_id)))
    seconds = done["seconds"]
    return out, (f"last job: total {seconds['total']} s, client stages {seconds['stages']}, "
                 f"worker seconds {seconds['workers']}")


def collect_osml(env: dict[str, str], job_ids: list[str], cog: Path) -> Collected:
    """OSML's jobs' clocks from their job rows, tiles from their region rows."""
    ddb, s3 = stand_in.aws_client("dynamodb", env), stand_in.aws_client("s3", env)
    out = []
    for job_id in job_ids:
        image_id = {"S": f"{job_id}:{cog}"}
        item = ddb.get_item(TableName=env["JOB_TABLE"], Key={"image_id": image_id}).get("Item", {})
        if "end_time" not in item:
            raise RuntimeError(f"osml: job {job_id} has no end_time")
        if int(item.get("region_error", {}).get("N", 0)):
            raise RuntimeError(f"osml: job {job_id}: {item['region_error']['N']} regions failed")
        rows = ddb.query(TableName=env["REGION_REQUEST_TABLE"], KeyConditionExpression="image_id = :i",
                         ExpressionAttributeValues={":i": image_id})["Items"]
        tiles = sum(int(r.get("total_tiles", {}).get("N", 0)) for r in rows)
        out.append((int(item["start_time"]["N"]) / 1000, int(item["end_time"]["N"]) / 1000, tiles,
                    features_written(s3, job_id)))
    return out, f"last job: {len(rows)} regions"


def run_side(name: str, argv: list[str], extra_env: dict[str, str], collect: Callable[..., Collected],
             cog: Path, model_url: str, server_pid: int, args: argparse.Namespace, tmp: Path,
             round_: int) -> SideRun | str:
    """One process of one side against a fresh moto server; or why it failed."""
    moto, endpoint = start_moto(tmp / "moto.log")
    log = tmp / f"{name}-{round_}.log"
    try:
        env = {k: v for k, v in os.environ.items()
               if k not in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")}
        env.update(stand_in.service_env(endpoint, args.osml_workers))
        env.update(stand_in.create_resources(env))
        env.update(extra_env)
        job_ids = [f"{name}-{round_}-{j}" for j in range(args.jobs)]
        sqs = stand_in.aws_client("sqs", env)
        for job_id in job_ids:
            sqs.send_message(QueueUrl=env["IMAGE_QUEUE"],
                             MessageBody=request_body(job_id, cog, model_url, args.tile_format))
        argv = [a.replace("{queue}", env["IMAGE_QUEUE"]).replace("{topic}", env["IMAGE_STATUS_TOPIC"])
                for a in argv]
        moto0, model0 = cpu_seconds(moto.pid), cpu_seconds(server_pid)
        began = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
        killer = threading.Timer(args.timeout, proc.kill)
        killer.start()
        _, status, usage = os.wait4(proc.pid, 0)  # its rusage: it and its reaped descendants
        killer.cancel()
        process = time.perf_counter() - began
        proc.returncode = os.waitstatus_to_exitcode(status)
        moto_cpu, model_cpu = cpu_seconds(moto.pid) - moto0, cpu_seconds(server_pid) - model0
        if proc.returncode:
            lines = log.read_text(errors="replace").strip().splitlines()
            return f"exit status {proc.returncode}: {(lines or ['no output'])[-1].strip()}"
        try:
            collected, detail = collect(env, job_ids, cog)
            jobs = sorted(collected)
        except Exception as exc:  # noqa: BLE001 - reported in one line
            return f"{type(exc).__name__}: {exc}"
    finally:
        moto.terminate()
        moto.wait()
    return SideRun(process=process, job=jobs[-1][1] - jobs[0][0], last_job=jobs[-1][1] - jobs[-1][0],
                   cpu=usage.ru_utime + usage.ru_stime, moto_cpu=moto_cpu, model_cpu=model_cpu,
                   tiles=jobs[-1][2], features=[j[3] for j in jobs], detail=detail)


def report(name: str, runs: list[SideRun], args: argparse.Namespace) -> None:
    """Median and range over the rounds of each figure of one side."""
    jobs = f"{args.jobs} jobs" if args.jobs > 1 else "1 job"
    print(f"{name}: {runs[-1].tiles} tiles per job, features {runs[-1].features}; {runs[-1].detail}")
    print(f"{name}, per process ({jobs}):")
    print(f"  process, launch to exit: {summary([r.process for r in runs])}")
    print(f"  job, first start to last end: {summary([r.job for r in runs])}")
    if args.jobs > 1:
        print(f"  last (warm) job alone: {summary([r.last_job for r in runs])}")
    print(f"  CPU of the process tree: {summary([r.cpu for r in runs])}")
    print(f"  CPU of the moto server: {summary([r.moto_cpu for r in runs])}")
    print(f"  CPU of the model server: {summary([r.model_cpu for r in runs])}")
    print(f"  CPU charged (process + moto + model server): {summary([r.charged for r in runs])}",
          flush=True)


def ratios(ours: list[SideRun], theirs: list[SideRun], args: argparse.Namespace) -> None:
    """OSML / ours of the medians."""
    def of(figure: Callable[[SideRun], float]) -> str:
        mine = statistics.median(figure(r) for r in ours)
        other = statistics.median(figure(r) for r in theirs)
        return f"{other / mine:.2f}" if mine else "n/a"

    line = (f"ratio OSML / ours of the medians: process {of(lambda r: r.process)}, "
            f"job {of(lambda r: r.job)}")
    if args.jobs > 1:
        line += f", last job {of(lambda r: r.last_job)}"
    print(f"{line}, CPU charged {of(lambda r: r.charged)} (process tree alone "
          f"{of(lambda r: r.cpu)}, moto {of(lambda r: r.moto_cpu)})")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="processes per side (order alternating)")
    parser.add_argument("--jobs", type=int, default=2, help="ImageRequest messages per process")
    parser.add_argument("--workers", type=int, default=2, help="our LocalCluster worker processes")
    parser.add_argument("--osml-workers", type=int, default=4, help="OSML's WORKERS (tile threads)")
    parser.add_argument("--size", type=int, default=10240, help="image width and height")
    parser.add_argument("--tile-format", default="NITF", choices=["NITF", "GTIFF"])
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one process may take")
    parser.add_argument("--osml-python", help="a Python that imports osgeo, to base OSML's venv on")
    parser.add_argument("--no-osml", action="store_true", help="run our side only")
    args = parser.parse_args()
    print(f"bench_osml: {args.size}² COG, centerpoint over HTTP, tiles 1024/50 {args.tile_format}, "
          f"S3 output to moto, jobs per process {args.jobs}, rounds {args.rounds}, {os.cpu_count()} cores",
          flush=True)
    python, why = (None, "--no-osml") if args.no_osml else osml_python(args.osml_python)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        cog = write_cog(tmp / "bench.tif", args.size)
        server, model_url = start_model_server(tmp / "model-server.log")
        sides: dict[str, tuple[list[str], dict[str, str], Callable[..., Collected]]] = {
            "ours": ([sys.executable, "-m", "pipeline", "-q", "worker", "--queue-url", "{queue}",
                      "--status-topic-arn", "{topic}", "--workers", str(args.workers),
                      "--max-jobs", str(args.jobs), "--exit-when-idle", "--wait-seconds", "1"],
                     {"MODEL_RUNNER_ALLOWED_SOURCES": str(tmp),
                      "MODEL_RUNNER_ALLOWED_OUTPUTS": f"s3://{stand_in.BUCKET}"}, collect_ours),
        }
        if python is not None:
            sides["osml"] = ([str(python), str(HERE / "osml" / "drive_osml.py"), "--jobs", str(args.jobs),
                              "--timeout", str(args.timeout)], {}, collect_osml)
        else:
            print(f"osml: not run: {why}", flush=True)
        runs: dict[str, list[SideRun]] = {side: [] for side in sides}
        try:
            for k in range(1, args.rounds + 1):
                for side in list(sides) if k % 2 else list(sides)[::-1]:
                    if side not in sides:
                        continue
                    argv, extra, collect = sides[side]
                    print(f"round {k} {side}: starting ({load()})", flush=True)
                    outcome = run_side(side, argv, extra, collect, cog, model_url + "/invocations",
                                       server.pid, args, tmp, k)
                    if isinstance(outcome, str):
                        if side == "ours":
                            raise SystemExit(f"ours: {outcome}")
                        print(f"osml: cannot run here: {outcome}", flush=True)
                        del sides[side], runs[side]
                        continue
                    runs[side].append(outcome)
                    print(f"round {k} {side}: process {outcome.process:.2f} s, job {outcome.job:.2f} s, "
                          f"CPU {outcome.cpu:.1f} + moto {outcome.moto_cpu:.1f} + model server "
                          f"{outcome.model_cpu:.1f} = {outcome.charged:.1f} s ({load()})", flush=True)
        finally:
            server.terminate()
            server.wait()
    for side, done in runs.items():
        report(side, done, args)
    if "osml" in runs:
        ratios(runs["ours"], runs["osml"], args)


if __name__ == "__main__":
    main()
