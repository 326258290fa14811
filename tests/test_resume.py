"""Resume: a job killed part-way redoes only the chunks its manifest does not list, and ends
with the same output as an uninterrupted run. Model calls are counted through a PYTHON model
that logs every tile it sees."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import geopandas as gpd
import pytest
import yaml

from graphs.image_job import plan_image, run_job
from pipeline import synthetic
from pipeline.cli import main
from pipeline.parts import ResumeError
from pipeline.request import ImageRequest
from tests.scale_models import calls

ROOT = Path(__file__).resolve().parents[1]
URL = "synthetic://1600x1200?spacing=140&size=10&seed=4"
CHUNK = 450


def _wire(out: Path, log: Path, delay: float = 0.0, tile: int = 256) -> dict:
    return {
        "jobId": "resumable",
        "imageUrls": [URL],
        "outputs": [{"type": "LOCAL", "path": str(out)}],
        "imageProcessor": {"name": "tests.scale_models:make", "type": "PYTHON"},
        "imageProcessorParameters": {"log": str(log), "delay": delay, "batchSize": 2},
        "imageProcessorTileSize": tile,
        "imageProcessorTileOverlap": 32,
    }


class Crash(Exception):
    pass


def _crash_after(chunks: int):
    class Bar:
        done = 0

        def update(self, tiles: int) -> None:
            self.done += 1
            if self.done > chunks:
                raise Crash("client died")

        def close(self) -> None:
            pass

    return lambda total: Bar()


def _manifest_tiles(request: ImageRequest, manifest: Path) -> set[tuple[int, int]]:
    grid = plan_image(request, URL, CHUNK).grid
    lines = manifest.read_text().splitlines()[1:]
    tiles = set()
    for line in lines:
        row, col = json.loads(line)["chunk"]
        tiles |= {(int(x), int(y)) for x, y, _, _ in grid.chunk_tiles(row, col)}
    return tiles


def _wait_idle(client) -> None:
    gc.collect()
    for _ in range(300):
        if not any(client.processing().values()):
            return
        time.sleep(0.05)


def test_resume_redoes_only_unfinished_chunks(tmp_path, dask_client) -> None:
    log = tmp_path / "calls.log"
    request = ImageRequest.parse(_wire(tmp_path / "out", log))
    try:
        run_job(request, dask_client, chunk_target=CHUNK, progress=_crash_after(5))
    except Crash:
        pass
    _wait_idle(dask_client)
    manifest = tmp_path / "out" / "resumable.parts" / "manifest.jsonl"
    finished = _manifest_tiles(request, manifest)
    assert len(manifest.read_text().splitlines()) == 1 + 6  # header + the chunks done before the crash
    before = len(calls(str(log)))

    result = run_job(request, dask_client, chunk_target=CHUNK, resume=True)
    redone = [(x, y) for _, x, y in calls(str(log))[before:]]
    total = result.summary["images"][0]["tiles"]
    assert result.status == "SUCCESS" and result.summary["chunks"]["resumed"] == 6
    assert not set(redone) & finished  # no finished chunk's tile went to the model again
    assert len(redone) == len(set(redone)) == total - len(finished)
    assert not (tmp_path / "out" / "resumable.parts").exists()

    # the same output as a run that was never interrupted
    calm = run_job(ImageRequest.parse(_wire(tmp_path / "calm", log)), dask_client, chunk_target=CHUNK)
    assert set(result.features["id"]) == set(calm.features["id"])
    assert len(result.features) == result.summary["features"] == len(synthetic.truth(URL))
    assert result.summary["classes"] == calm.summary["classes"]  # resumed chunks' counts kept
    assert sum(result.summary["classes"].values()) == result.summary["features"]
    resumed = gpd.read_parquet(tmp_path / "out" / "resumable.parquet").sort_values("id")
    uninterrupted = gpd.read_parquet(tmp_path / "calm" / "resumable.parquet").sort_values("id")
    assert list(resumed["id"]) == list(uninterrupted["id"])
    assert resumed.geometry.reset_index(drop=True).geom_equals_exact(
        uninterrupted.geometry.reset_index(drop=True), 1e-12).all()
    geojson = json.loads((tmp_path / "out" / "resumable.geojson").read_text())
    assert sorted(f["id"] for f in geojson["features"]) == sorted(uninterrupted["id"])


def test_resume_of_a_different_request_is_refused(tmp_path, dask_client) -> None:
    log = tmp_path / "calls.log"
    try:
        run_job(ImageRequest.parse(_wire(tmp_path, log)), dask_client, chunk_target=CHUNK,
                progress=_crash_after(1))
    except Crash:
        pass
    _wait_idle(dask_client)
    other = ImageRequest.parse(_wire(tmp_path, log, tile=300))
    with pytest.raises(ResumeError) as err:
        run_job(other, dask_client, chunk_target=CHUNK, resume=True)
    assert "different request" in str(err.value) and "\n" not in str(err.value)


def test_cli_resume_after_the_client_process_is_killed(tmp_path, dask_client, capsys) -> None:
    log = tmp_path / "calls.log"
    request_file = tmp_path / "request.yaml"
    request_file.write_text(yaml.safe_dump(_wire(tmp_path / "out", log, delay=0.1)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    address = dask_client.scheduler.address
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "-q", "run", str(request_file), "--cluster", address,
         "--no-progress", "--chunk-size", str(CHUNK)], cwd=ROOT, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = tmp_path / "out" / "resumable.parts" / "manifest.jsonl"
    try:
        for _ in range(1200):
            if manifest.exists() and len(manifest.read_text().splitlines()) >= 1 + 3:
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the client dies; the cluster lives on
    finally:
        proc.wait(timeout=20)
    _wait_idle(dask_client)
    request = ImageRequest.parse(_wire(tmp_path / "out", log, delay=0.1))
    finished = _manifest_tiles(request, manifest)
    assert 3 <= len(manifest.read_text().splitlines()) - 1 < 12  # killed part-way
    before = len(calls(str(log)))

    code = main(["-q", "run", str(request_file), "--cluster", address, "--resume", "--no-progress",
                 "--chunk-size", str(CHUNK)])
    assert code == 0, capsys.readouterr().err
    redone = {(x, y) for _, x, y in calls(str(log))[before:]}
    assert not redone & finished
    assert len(redone) + len(finished) == plan_image(request, URL, CHUNK).grid.n_tiles
    features = gpd.read_parquet(tmp_path / "out" / "resumable.parquet")
    assert {tuple(int(v) for v in b) for b in features["imageBBox"]} == {
        tuple(b) for b in synthetic.truth(URL).tolist()}
