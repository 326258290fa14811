"""The CLI: exit codes and one-line errors for bad requests and arguments."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.request import ImageRequest

ROOT = Path(__file__).resolve().parents[1]


def test_example_requests_validate() -> None:
    for path in sorted((ROOT / "configs" / "requests").glob("*")):
        ImageRequest.from_file(path)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"jobId": "j", "imageUrls": ["a.tif"], "imageProcessor": {"name": "null", "type": "BUILTIN"},'
         ' "imageProcessorTilesize": 5}', "imageProcessorTilesize: unknown field"),
        ("{broken", "not valid JSON"),
        ('{"jobId": "j", "imageUrls": ["a.tif"], "imageProcessor": {"name": "nope", "type": "BUILTIN"},'
         ' "outputs": [{"type": "LOCAL", "path": "o"}]}', "unknown BUILTIN model 'nope'"),
        ('{"jobId": "j", "imageUrls": ["a.tif"], "imageProcessor": {"name": "null", "type": "BUILTIN"}}',
         "the request has no outputs"),
        ('{"jobId": "j", "imageUrls": ["a.tif"], "imageProcessor": {"name": "null", "type": "BUILTIN"},'
         ' "regionOfInterest": "POLYGON((1 2"}', "regionOfInterest"),
    ],
)
def test_bad_request_exit_2_one_line(tmp_path, capsys, content: str, expected: str) -> None:
    path = tmp_path / "request.json"
    path.write_text(content)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert expected in err


def test_missing_request_file_and_bad_arguments(tmp_path, capsys) -> None:
    assert main(["run", str(tmp_path / "missing.json")]) == 2
    assert "request file not found" in capsys.readouterr().err
    assert main(["run", "x.json", "--workers", "0"]) == 2
    assert main(["frobnicate"]) == 2


def test_subprocess_bad_request_has_no_traceback(tmp_path) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"jobId": "j", "imageUrls": ["a.tif"],
                                "imageProcessor": {"name": "null", "type": "BUILTIN"},
                                "imageProcessorTileOverlap": 1024}))
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(path)], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "must be smaller than imageProcessorTileSize" in proc.stderr


def test_help_lists_commands() -> None:
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0
    for command in ("run", "demo"):
        assert command in proc.stdout


def test_demo_finds_every_planted_object_across_chunk_edges(tmp_path) -> None:
    """What `make demo` runs: a 4096² scene, 2 × 2 chunks, objects across tile and chunk edges."""
    proc = subprocess.run([sys.executable, "-m", "pipeline", "demo", "--output-dir", str(tmp_path),
                           "--workers", "2", "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "recall 100.0% (150/150), duplicates 0, unmatched features 0" in proc.stdout
    summary = json.loads((tmp_path / "demo.summary.json").read_text())
    assert summary["chunks"] == {"computed": 4, "resumed": 0}
    assert summary["features"] == 150 and summary["classes"] == {"bright-object": 150}
    for name in ("demo.geojson", "demo.parquet", "demo.summary.png", "demo-quicklook.png"):
        assert (tmp_path / name).stat().st_size > 1000, name


# ---------------------------------------------------------------- negative numbers as values
def _value_options() -> list[tuple[str, str]]:
    """``(command, --option)`` for every long option of every command that takes a value."""
    import argparse

    from pipeline.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [(name, option) for name, sub in commands.choices.items() for action in sub._actions
            if action.nargs != 0 and action.option_strings
            for option in action.option_strings if option.startswith("--")]


#: what each command needs besides the option under test
_BASE = {"run": ["r.json"], "worker": ["--queue-url", "q"], "tiles": [], "demo": [],
         "serve-model": []}


@pytest.mark.parametrize(("command", "option"), _value_options())
def test_every_option_takes_a_value_with_a_minus_sign(command: str, option: str, capsys) -> None:
    """``--opt -1,2`` is read as ``--opt=-1,2`` (the same namespace, or the same error), not as
    an unknown option ``-1,2``."""
    from pipeline.cli import build_parser

    def parse(argv: list[str]) -> object:
        try:
            return vars(build_parser().parse_args(argv))
        except SystemExit:
            return capsys.readouterr().err.splitlines()[-1]

    for value in ("-1,2", "-78.37,39.19,-78.3,39.2", "-0.5"):
        spaced = parse([command, *_BASE[command], option, value])
        assert spaced == parse([command, *_BASE[command], f"{option}={value}"])
        assert "expected one argument" not in str(spaced)


def test_tiles_bbox_with_negative_longitudes(tmp_path, capsys) -> None:
    from pipeline.cli import _tile_request, build_parser

    argv = ["tiles", "--bbox", "-78.37,39.19,-78.3,39.2", "--zoom", "12", "--imagery-url",
            "http://127.0.0.1:9/{z}/{x}/{y}.png", "--model", "null", "--output-dir", str(tmp_path)]
    assert list(_tile_request(build_parser().parse_args(argv)).bbox) == [-78.37, 39.19, -78.3, 39.2]
    # the whole command gets past its arguments to the next check (no outputs)
    assert main(argv[:-2]) == 2
    assert capsys.readouterr().err.strip() == (
        "model-runner: error: the tile job has no outputs: add one or pass --output-dir DIR")


# ---------------------------------------------------------------- one line per failed image
def _run_cli(tmp_path: Path, image: str, *flags: str, **extra: object) -> subprocess.CompletedProcess:
    request = tmp_path / "request.json"
    request.write_text(json.dumps({
        "jobId": "one-line", "imageUrls": [image], "outputs": [{"type": "LOCAL", "path": str(tmp_path)}],
        "imageProcessor": {"name": "null", "type": "BUILTIN"}, **extra}))
    return subprocess.run([sys.executable, "-m", "pipeline", *flags, "run", str(request), "--workers",
                           "1", "--no-progress"], capture_output=True, text=True, cwd=ROOT, timeout=120)


def _roi_far_away(tmp_path: Path) -> tuple[str, str]:
    """A small georeferenced image (10°E, 50°N) and a regionOfInterest 1° east of it."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    path = tmp_path / "small.tif"
    with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=1, dtype="uint8",
                       crs="EPSG:4326", transform=from_origin(10.0, 50.0, 1e-4, 1e-4)) as dst:
        dst.write(np.zeros((1, 64, 64), dtype=np.uint8))
    return str(path), "POLYGON ((11 49.9, 11.1 49.9, 11.1 50, 11 50, 11 49.9))"


@pytest.mark.parametrize("case", ["bad NITF", "regionOfInterest misses"])
def test_a_failed_image_is_one_line_on_stderr(case: str, tmp_path: Path) -> None:
    """A NITF GDAL cannot open (p0_02a.ntf, ../shared/data/README.md) and a regionOfInterest
    that misses the image: stderr names the image on exactly one line, with the cause; no
    GDAL warnings; stdout names it once more in the job's image list; exit 1."""
    from tests.conftest import shared_file

    if case == "bad NITF":
        image, extra = str(shared_file("nitf/jitc/p0_02a.ntf")), {}
        cause = "Unable to open JPEG2000 image within NITF file"
    else:
        image, roi = _roi_far_away(tmp_path)
        extra, cause = {"regionOfInterest": roi}, "regionOfInterest does not intersect image"
    done = _run_cli(tmp_path, image, **extra)
    assert done.returncode == 1, done.stderr
    named = [line for line in done.stderr.splitlines() if image in line]
    assert len(named) == 1 and cause in named[0], done.stderr
    assert "CPLE_" not in done.stderr and "Traceback" not in done.stderr
    (listed,) = [line for line in done.stdout.splitlines() if image in line]
    assert listed.startswith(f"  FAILED   {image}  (") and cause in listed and listed.count(image) == 1
    summary = json.loads((tmp_path / "one-line.summary.json").read_text())
    assert summary["status"] == "FAILED" and cause in summary["reason"]
    assert summary["images"][0]["reason"] == summary["reason"]
    if case == "bad NITF":  # --debug shows more (GDAL's warnings)
        assert "CPLE_" in _run_cli(tmp_path, image, "--debug").stderr


# ---------------------------------------------------------------- start-up
#: modules that no --help needs (each costs 0.1-0.4 s to import)
HEAVY = ("numpy", "rasterio", "dask", "distributed", "geopandas", "pandas", "matplotlib", "boto3")


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["worker", "--help"]])
def test_help_imports_no_stage_or_dask(argv: list[str]) -> None:
    code = ("import sys\nfrom pipeline.cli import main\nrc = main(sys.argv[1:])\n"
            f"print(rc, sorted(m for m in {HEAVY!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "0 []"
    assert "usage: model-runner" in proc.stdout


def test_job_pixels_counts_local_and_synthetic_images_only(tmp_path) -> None:
    from pipeline.cli import job_pixels
    from pipeline.demo import write_scene

    scene = write_scene(tmp_path / "s.tif", size=300, count=2)

    def request(*urls: str) -> ImageRequest:
        return ImageRequest.parse({"jobId": "px", "imageUrls": list(urls),
                                   "imageProcessor": {"name": "null", "type": "BUILTIN"}})

    assert job_pixels(request(str(scene.path), "synthetic://500x200")) == 300 * 300 + 500 * 200
    assert job_pixels(request(str(scene.path), "s3://bucket/image.tif")) is None
    assert job_pixels(request(str(tmp_path / "missing.tif"))) is None


def test_small_job_runs_in_process_with_the_results_of_worker_processes(tmp_path) -> None:
    """A 1024² job with the default cluster runs on threads in the CLI's process (no dashboard,
    no worker process) and writes the same features as on a worker process (``--workers 1``),
    every planted object once."""
    import numpy as np

    from pipeline.demo import match_truth, write_scene

    scene = write_scene(tmp_path / "scene.tif", size=1024, count=20)
    request = tmp_path / "request.json"
    request.write_text(json.dumps({
        "jobId": "small", "imageUrls": [str(scene.path)],
        "imageProcessor": {"name": "bright-objects", "type": "BUILTIN"}}))
    found = {}
    for name, flags in (("threads", []), ("process", ["--workers", "1"])):
        proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(request), "--no-progress",
                               "--output-dir", str(tmp_path / name), *flags],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert ("threads in this process" in proc.stderr) == (name == "threads"), proc.stderr
        assert ("dashboard http://" in proc.stderr) == (name == "process"), proc.stderr
        collection = json.loads((tmp_path / name / "small.geojson").read_text())
        found[name] = sorted((f["properties"]["imageBBox"], f["geometry"]["coordinates"])
                             for f in collection["features"])
    assert found["threads"] == found["process"]
    boxes = np.array([box for box, _ in found["threads"]], dtype=float)
    assert match_truth(boxes, scene.truth) == (len(scene.truth), 0, 0)
