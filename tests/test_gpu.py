"""The GPU worker path: local GPU worker groups, and the PyTorch example model.

The cluster tests run everywhere (a "GPU worker" here is a worker process that advertises the
resource). The PyTorch tests need torch (not a dependency: they skip without it) and use the
GPU where there is one, so the same tests check the CUDA path on a GPU machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from graphs.cluster import ClusterError, ClusterProfile, connect, local_gpu_workers
from graphs.image_job import run_job
from pipeline.demo import match_truth, write_scene
from pipeline.models.builtin import bright_objects
from pipeline.request import ImageRequest
from tests.model_servers import read_task_log, task_log_plugin

ROOT = Path(__file__).resolve().parents[1]
TILE, OVERLAP = 512, 64


def _request(tmp_path: Path, image: Path, processor: dict[str, Any], job: str,
             params: dict[str, Any] | None = None) -> ImageRequest:
    return ImageRequest.parse({
        "jobId": job, "imageUrls": [str(image)], "outputs": [{"type": "LOCAL", "path": str(tmp_path / job)}],
        "imageProcessor": processor, "imageProcessorParameters": params or {},
        "imageProcessorTileSize": TILE, "imageProcessorTileOverlap": OVERLAP,
    })


def _workers(client: Any) -> dict[str, dict[str, Any]]:
    info = client.scheduler_info(n_workers=-1)["workers"].values()
    return {str(w["name"]): w for w in info}


# ---------------------------------------------------------------------------- GPU worker groups
@pytest.mark.parametrize(("section", "expected"), [
    ({}, (0, 0)), ({"workers": 2}, (2, 2)), ({"workers": 1, "slots": 3}, (1, 3)),
])
def test_gpu_sections_give_workers_and_slots(section, expected) -> None:
    settings = {"gpu": section} if section else {}
    assert local_gpu_workers(ClusterProfile("local", "p.yaml", settings)) == expected


@pytest.mark.parametrize("section", [{"workers": 0}, {"slots": "many"}, {"workers": -1}])
def test_bad_gpu_sections_fail_in_one_line(section) -> None:
    with pytest.raises(ClusterError, match="gpu.workers and gpu.slots") as err:
        local_gpu_workers(ClusterProfile("local", "p.yaml", {"gpu": section}))
    assert "\n" not in str(err.value)


def test_gpu_local_profile_pins_model_tasks_to_its_gpu_worker(tmp_path: Path) -> None:
    scene = write_scene(tmp_path / "scene.tif", size=1536, count=40, tile_size=TILE, overlap=OVERLAP,
                        chunk_target=TILE - OVERLAP)
    with connect(str(ROOT / "configs" / "clusters" / "gpu-local.yaml"), workers=1) as client:
        client.register_plugin(task_log_plugin())
        workers = _workers(client)
        assert set(workers) == {"0", "gpu-0"}
        assert workers["gpu-0"]["resources"] == {"GPU": 2} and workers["gpu-0"]["nthreads"] == 2
        assert workers["0"]["resources"] == {} and workers["0"]["nthreads"] == 1
        env = client.run(lambda: __import__("os").environ.get("CUDA_VISIBLE_DEVICES"))
        assert sorted(map(str, env.values())) == ["0", "None"]  # the GPU worker sees GPU 0 only
        processor = {"type": "PYTHON", "name": "tests.model_servers:GpuProbe"}
        result = run_job(_request(tmp_path, scene.path, processor, "probe"), client, progress=None,
                         chunk_target=TILE - OVERLAP)
        log = client.run_on_scheduler(read_task_log)
    assert result.status == "SUCCESS"
    # the model tasks ran on the GPU worker only; their pixels were read by any worker
    model = [(worker, needs) for key, worker, needs in log if key.startswith("detect-")]
    reads = [(worker, needs) for key, worker, needs in log if key.startswith("read-")]
    assert len(model) == len(reads) == 16
    assert all(worker == "gpu-0" and needs == {"GPU": 1} for worker, needs in model)
    assert all(not needs for _, needs in reads) and "0" in {worker for worker, _ in reads}
    # GpuProbe names each feature's class after the worker that ran the model
    assert set(result.features["featureClasses"].map(lambda c: c[0]["iri"])) == {"gpu-0"}
    found = np.array(result.features["imageBBox"].tolist())
    assert match_truth(found, scene.truth) == (len(scene.truth), 0, 0)


# ---------------------------------------------------------------------------- the PyTorch model
def _torch() -> Any:
    return pytest.importorskip("torch", reason="PyTorch is not installed (the GPU example model needs it)")


@pytest.mark.parametrize("fill", [0.3, 0.5, 0.6])
def test_torch_components_equal_the_builtin_on_tangled_masks(fill) -> None:
    """Percolation-like masks near the threshold (long, branching components) on the GPU where
    there is one: the same boxes, in the same order, as scipy's labelling in ``bright-objects``."""
    torch = _torch()
    from pipeline.models.torch_bright import BrightObjects

    rng = np.random.default_rng(int(fill * 10))
    tiles = np.where(rng.random((6, 160, 128)) < fill, 240, 20).astype(np.uint8)[..., None].repeat(3, axis=-1)
    tiles[2, ..., 1] = 100  # mean of three bands below the threshold where band 2 is dim
    tiles[3] = 20           # nothing at all
    model = BrightObjects()
    assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    got = model(tiles, np.zeros((len(tiles), 2)))
    for tile, found in zip(tiles, got, strict=True):
        want = bright_objects(tile)
        np.testing.assert_array_equal(found.boxes, want.boxes)
        np.testing.assert_allclose(found.scores, want.scores, rtol=0, atol=1e-12)
        assert list(found.classes) == list(want.classes)
    assert len(got[0]) and len(got[3]) == 0
    extent = got[0].boxes[:, 2:] - got[0].boxes[:, :2]
    assert extent.max() >= 20, "some components are long and branching (labels travel far)"


def test_torch_model_job_on_the_gpu_worker_equals_the_cpu_builtin(tmp_path: Path) -> None:
    _torch()
    scene = write_scene(tmp_path / "scene.tif", size=2048, count=80, tile_size=TILE, overlap=OVERLAP,
                        chunk_target=1024)
    with connect(str(ROOT / "configs" / "clusters" / "gpu-local.yaml"), workers=1) as client:
        gpu = run_job(_request(tmp_path, scene.path, {"type": "PYTHON",
                                                      "name": "pipeline.models.torch_bright:BrightObjects"},
                               "gpu"), client, progress=None, chunk_target=1024)
        cpu = run_job(_request(tmp_path, scene.path, {"type": "BUILTIN", "name": "bright-objects"}, "cpu"),
                      client, progress=None, chunk_target=1024)
    assert gpu.status == cpu.status == "SUCCESS"
    assert sorted(gpu.features["id"]) == sorted(cpu.features["id"])
    found = np.array(gpu.features["imageBBox"].tolist())
    assert match_truth(found, scene.truth) == (len(scene.truth), 0, 0)


@pytest.mark.parametrize("window", [3, None])
def test_pinned_models_keep_a_window_of_chunks_in_flight(tmp_path: Path, monkeypatch, window) -> None:
    """Pixels read for a pinned model wait for it: at most the window's chunks are in the
    cluster at once (every chunk without a window)."""
    import importlib

    module = importlib.import_module("graphs.image_job")  # the module (graphs.image_job is a function)
    if window is not None:
        monkeypatch.setattr(module, "submission_window", lambda client: window)
    else:
        monkeypatch.setattr(module, "submission_window", lambda client: 10**6)
    scene = write_scene(tmp_path / "scene.tif", size=1536, count=30, tile_size=TILE, overlap=OVERLAP,
                        chunk_target=TILE - OVERLAP)
    with connect(str(ROOT / "configs" / "clusters" / "gpu-local.yaml"), workers=1) as client:
        seen: list[int] = []

        def chunks_in_cluster(dask_scheduler: Any) -> int:
            # a chunk's model task is known to the scheduler from its submission until the
            # client releases it; its pixels exist only in between
            return sum(1 for key in dask_scheduler.tasks if str(key).startswith("('detect-"))

        class Probe:
            def __init__(self, total: int) -> None:
                seen.append(client.run_on_scheduler(chunks_in_cluster))

            def update(self, n: int) -> None:
                seen.append(client.run_on_scheduler(chunks_in_cluster))

            def close(self) -> None:
                pass

        processor = {"type": "PYTHON", "name": "tests.model_servers:GpuProbe"}
        result = run_job(_request(tmp_path, scene.path, processor, "window"), client, progress=Probe,
                         chunk_target=TILE - OVERLAP)
    assert result.status == "SUCCESS" and len(result.features) == len(scene.truth)
    if window:  # (plus one whose release the scheduler may not have handled yet)
        assert window <= max(seen) <= window + 1
    else:  # all 16 were submitted at once; the first update comes after one was released
        assert max(seen) >= 15


def test_a_cluster_without_gpus_names_both_ways_to_get_one() -> None:
    from pipeline.models.gpu import missing_resources

    reason = missing_resources({"GPU": 1}, [{}, {"MEM": 2}])
    assert reason is not None and "\n" not in reason
    assert "--resources GPU=1" in reason and "--cluster gpu-local" in reason and "MEM=2" in reason
    assert missing_resources({"GPU": 1}, [{}, {"GPU": 2}]) is None


def test_each_gpu_worker_sees_its_own_gpu(tmp_path: Path) -> None:
    profile = tmp_path / "two-gpus.yaml"
    profile.write_text("kind: local\nworkers: 1\ngpu:\n  workers: 2\n  slots: 1\n")
    with connect(str(profile)) as client:
        workers = _workers(client)
        seen = client.run(lambda: __import__("os").environ.get("CUDA_VISIBLE_DEVICES"))
        by_name = {str(workers_info["name"]): seen[address]
                   for address, workers_info in client.scheduler_info(n_workers=-1)["workers"].items()}
    resources = {name: w["resources"] for name, w in workers.items()}
    assert resources == {"0": {}, "gpu-0": {"GPU": 1}, "gpu-1": {"GPU": 1}}
    assert by_name == {"0": None, "gpu-0": "0", "gpu-1": "1"}
