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
