"""Nothing half-written, nothing lost: killed writers, killed clients, killed workers.

What survives (checked below): a writer killed mid-write leaves at most a hidden
``.partial-*`` file, never a truncated file at a final name; a client killed mid-job leaves no
outputs, and a rerun writes the same bytes as a clean run; a worker killed mid-job is replaced
by its nanny and its tasks are recomputed: the job still succeeds with the same features.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from graphs.image_job import run_job
from pipeline.demo import write_scene
from pipeline.models.builtin import bright_objects
from pipeline.request import ImageRequest

ROOT = Path(__file__).resolve().parents[1]
TILE, OVERLAP = 128, 32


def slow_model(delay: float = 0.1, markers: str = "") -> Any:
    """A PYTHON model: bright-objects, ``delay`` seconds per tile, a marker file per tile."""

    def model(tiles: np.ndarray, offsets: np.ndarray) -> list[Any]:
        results = []
        for tile, (x, y) in zip(tiles, offsets, strict=True):
            time.sleep(delay)
            if markers:
                Path(markers, f"{os.getpid()}-{x}-{y}").touch()
            results.append(bright_objects(tile))
        return results

    model.batch_size = 1  # type: ignore[attr-defined]
    return model


def _wait_for(predicate: Any, timeout: float = 60.0, what: str = "") -> None:
    stop = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > stop:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


# ---------------------------------------------------------------------- a writer killed
WRITER = """
import sys
import geopandas as gpd, numpy as np, shapely
from pipeline.sinks import LocalSink
n = int(sys.argv[2])
x = np.arange(n, dtype=float) % 1000
y = np.arange(n, dtype=float) // 1000
features = gpd.GeoDataFrame({"id": [f"f{i}" for i in range(n)], "score": np.linspace(0, 1, n)},
                            geometry=shapely.box(x, y, x + 0.5, y + 0.5), crs="EPSG:4326")
print(LocalSink(sys.argv[1], ("geojson", "parquet")).write_features("job", features), flush=True)
"""


def _writer(out: Path, n: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(n)], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_writer_killed_mid_write_leaves_no_file_at_the_final_name(tmp_path: Path) -> None:
    out, n = tmp_path / "out", 60_000
    out.mkdir()
    writer = _writer(out, n)

    def partial_size() -> int:
        return sum(p.stat().st_size for p in out.glob(".partial-*.geojson") if p.exists())

    try:
        _wait_for(lambda: partial_size() > 64 * 1024 or writer.poll() is not None, 60, "a partial file")
        assert writer.poll() is None, "the writer finished before it could be killed"
        writer.kill()
    finally:
        writer.wait(30)
    names = sorted(p.name for p in out.iterdir())
    assert "job.geojson" not in names and "job.parquet" not in names
    assert all(name.startswith(".partial-") for name in names)  # what a kill leaves: hidden temp

    done = _writer(out, n)
    assert done.wait(120) == 0, done.stderr.read() if done.stderr else ""
    first = (out / "job.geojson").read_bytes()
    assert len(json.loads(first)["features"]) == n
    again = _writer(out, n)
    assert again.wait(120) == 0
    assert (out / "job.geojson").read_bytes() == first  # a rerun writes the same bytes


# ---------------------------------------------------------------------- a client killed
@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return write_scene(tmp_path_factory.mktemp("scene") / "scene.tif", size=768, count=30,
                       tile_size=TILE, overlap=OVERLAP, bands=1, seed=5)


def _wire(scene: Any, out: Path, markers: Path, delay: float) -> dict[str, Any]:
    return {
        "jobId": "atomic",
        "imageUrls": [str(scene.path)],
        "outputs": [{"type": "LOCAL", "path": str(out)}],
        "imageProcessor": {"name": "tests.test_atomic_outputs:slow_model", "type": "PYTHON"},
        "imageProcessorParameters": {"delay": delay, "markers": str(markers)},
        "imageProcessorTileSize": TILE,
        "imageProcessorTileOverlap": OVERLAP,
    }


@pytest.fixture(scope="module")
def reference(scene: Any, dask_client: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A clean run, for comparison."""
    out = tmp_path_factory.mktemp("reference")
    (out / "markers").mkdir()
    result = run_job(ImageRequest.parse(_wire(scene, out, out / "markers", 0.0)), dask_client,
                     chunk_target=2 * (TILE - OVERLAP))
    assert result.status == "SUCCESS" and len(result.features) == len(scene.truth)
    return result


def _boxes(features: Any) -> list[list[float]]:
    return sorted(np.array(list(features["imageBBox"]), dtype=float).round(6).tolist())


def test_a_client_killed_mid_job_leaves_nothing_and_a_rerun_matches(
    scene: Any, reference: Any, tmp_path: Path
) -> None:
    out, markers = tmp_path / "out", tmp_path / "markers"
    markers.mkdir()
    request = tmp_path / "request.json"
    request.write_text(json.dumps(_wire(scene, out, markers, 0.15)))
    client = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "-q", "run", str(request), "--workers", "1", "--no-progress"],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        _wait_for(lambda: len(list(markers.iterdir())) >= 3 or client.poll() is not None, 90,
                  "the first tiles")
        assert client.poll() is None, client.communicate()[1]
        os.killpg(client.pid, signal.SIGKILL)  # the client and its LocalCluster, at once
    finally:
        client.wait(30)
    leftovers = sorted(p.name for p in out.glob("*")) if out.exists() else []
    finals = {"atomic.geojson", "atomic.parquet", "atomic.summary.json"}
    assert not finals & set(leftovers), leftovers  # at most the resume work dir (atomic.parts)

    request.write_text(json.dumps(_wire(scene, out, markers, 0.0)))  # the rerun need not be slow
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "-q", "run", str(request), "--workers", "1", "--no-progress"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "atomic.summary.json").read_text())
    assert summary["status"] == "SUCCESS" and summary["features"] == len(scene.truth)
    import geopandas as gpd

    assert _boxes(gpd.read_parquet(out / "atomic.parquet")) == _boxes(reference.features)


# ---------------------------------------------------------------------- a worker killed
def test_a_worker_killed_mid_job_is_replaced_and_nothing_is_lost(
    scene: Any, reference: Any, tmp_path: Path
) -> None:
    from graphs.cluster import connect

    markers = tmp_path / "markers"
    markers.mkdir()
    request = ImageRequest.parse(_wire(scene, tmp_path / "out", markers, 0.1))
    with connect("local", workers=2) as client:
        pids = client.run(os.getpid)
        outcome: dict[str, Any] = {}
        job = threading.Thread(target=lambda: outcome.setdefault(
            "result", run_job(request, client, chunk_target=2 * (TILE - OVERLAP))))
        job.start()
        victim = next(iter(pids.values()))
        _wait_for(lambda: any(p.name.startswith(f"{victim}-") for p in markers.iterdir()), 90,
                  "the victim to start a tile")
        os.kill(victim, signal.SIGKILL)
        job.join(240)
        assert not job.is_alive()
        after = client.run(os.getpid)
    result = outcome["result"]
    assert victim not in after.values() and len(after) == 2  # the nanny started a new worker
    assert result.status == "SUCCESS"
    assert result.summary["images"][0]["failedTiles"] == []
    assert _boxes(result.features) == _boxes(reference.features)
