"""Start-up: a whole ``model-runner run`` of a small image against the bare import of the stack.

Each round times, as subprocesses from start to exit (every process included):

* ``import``: ``python -c "import rasterio, geopandas, dask.distributed"``, the floor any
  command of this stack pays;
* ``help``: ``model-runner --help``;
* ``job``: ``model-runner run`` of a request naming one ``--size``² GeoTIFF (the demo's layout:
  512-px tiles, DEFLATE, overviews, with planted objects), the built-in ``bright-objects`` model,
  a LOCAL output (GeoJSON, GeoParquet, summary and its chart), the default cluster.

Prints the median and range of each over ``--rounds`` rounds and the ratio of the job's median to
the import's (goal: job ≤ 2.5 s and ≤ 2.5× the import on the 2-core development machine).
``--json`` prints the figures as one JSON object instead.

Run: ``.venv/bin/python benchmarks/bench_startup.py [--rounds 5] [--size 1024] [--json]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

IMPORT = "import rasterio, geopandas, dask.distributed"


def cli() -> list[str]:
    """The ``model-runner`` console script beside this Python (``python -m pipeline`` without)."""
    script = Path(sys.executable).with_name("model-runner")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipeline"]


def timed(command: list[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Seconds from start to exit of ``command`` (its child processes end before it does)."""
    began = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    return time.perf_counter() - began, proc


def main() -> None:
    from _stats import summary

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (1024)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    from pipeline.demo import write_scene

    load = os.getloadavg()[0]
    times: dict[str, list[float]] = {"import": [], "help": [], "job": []}
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        scene = write_scene(Path(tmp) / "scene.tif", size=args.size, count=20)
        request = Path(tmp) / "request.json"
        request.write_text(json.dumps({
            "jobId": "startup", "imageUrls": [str(scene.path)],
            "outputs": [{"type": "LOCAL", "path": str(Path(tmp) / "out")}],
            "imageProcessor": {"name": "bright-objects", "type": "BUILTIN"},
        }))
        commands = {"import": [sys.executable, "-c", IMPORT], "help": [*cli(), "--help"],
                    "job": [*cli(), "run", str(request), "--no-progress"]}
        for _ in range(args.rounds):
            for name, command in commands.items():
                seconds, proc = timed(command)
                if proc.returncode != 0:
                    sys.exit(f"bench_startup: {name} failed ({proc.returncode}): "
                             f"{proc.stderr.strip()[-500:]}")
                if name == "job" and f"SUCCESS, {len(scene.truth)} features" not in proc.stdout:
                    sys.exit(f"bench_startup: unexpected job output: {proc.stdout.strip()}")
                times[name].append(seconds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["job"] / medians["import"]
    if args.json:
        print(json.dumps({"size": args.size, "rounds": args.rounds, "cores": os.cpu_count(),
                          "load_average": load, "seconds": times, "median": medians,
                          "job_over_import": ratio}, indent=2))
        return
    print(f"machine: {os.cpu_count()} cores; load average at start {load:.2f}")
    print(f"bare import ({IMPORT}): {summary(times['import'])}")
    print(f"model-runner --help: {summary(times['help'])}")
    print(f"model-runner run, {args.size}² GeoTIFF, bright-objects, LOCAL output: {summary(times['job'])}")
    print(f"job / import: {ratio:.2f}× (medians; goal: job ≤ 2.5 s and ≤ 2.5×)")


if __name__ == "__main__":
    main()
