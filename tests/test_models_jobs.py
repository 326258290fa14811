"""Whole jobs through every model target on real Dask clusters, and the GPU resource path."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest

from graphs.image_job import run_job
from pipeline.models import ModelError, clear_cache
from pipeline.request import ImageRequest
from tests.model_servers import (
    MARKED_TILE,
    MARKER,
    OVERLAP,
    TILE,
    boxes_of,
    read_task_log,
    serving,
    task_log_plugin,
    truth_boxes,
    write_scene,
)

FAST = {"retryBaseDelay": 0.01, "retryMaxDelay": 0.05}


@pytest.fixture(scope="module")
def env(moto_endpoint: str) -> Iterator[str]:
    """AWS settings set before the cluster starts, so that its worker processes see them."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": moto_endpoint}.items():
            mp.setenv(key, value)
        for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            mp.delenv(name, raising=False)
        yield moto_endpoint


@pytest.fixture(scope="module")
def client(env: str) -> Iterator[Any]:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0", silence_logs=logging.WARNING) as cluster, \
            Client(cluster) as c:
        yield c


def request(tmp_path: Path, image: Path, processor: dict[str, Any], params: dict[str, Any],
            **extra: Any) -> ImageRequest:
    return ImageRequest.parse({
        "jobId": "job", "imageUrls": [str(image)], "outputs": [{"type": "LOCAL", "path": str(tmp_path)}],
        "imageProcessor": processor, "imageProcessorParameters": params,
        "imageProcessorTileSize": TILE, "imageProcessorTileOverlap": OVERLAP, **extra,
    })


def test_every_target_gives_the_same_features(client: Any, tmp_path: Path, monkeypatch) -> None:
    image = write_scene(tmp_path / "scene.tif")
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="job-in")
    s3.create_bucket(Bucket="job-out")
    with serving("bright-objects", async_output="s3://job-out/r") as server:
        monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", server.url)
        monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER", server.url)
        targets = {
            "BUILTIN": ({"type": "BUILTIN", "name": "bright-objects"}, {}),
            "SM_ENDPOINT": ({"type": "SM_ENDPOINT", "name": "detector"}, dict(FAST)),
            "HTTP_ENDPOINT": ({"type": "HTTP_ENDPOINT", "name": server.url + "/invocations"}, dict(FAST)),
            "TFSERVING_ENDPOINT": ({"type": "TFSERVING_ENDPOINT", "name": server.url + "/v1/models/d"},
                                   {"classNames": {"1": "bright-object"}, **FAST}),
            "SM_ASYNC_ENDPOINT": ({"type": "SM_ASYNC_ENDPOINT", "name": "detector"},
                                  {"s3InputLocation": "s3://job-in/t", "pollInterval": 0.05, **FAST}),
        }
        for name, (processor, params) in targets.items():
            out = tmp_path / name
            result = run_job(request(out, image, processor, params), client, progress=None)
            assert result.status == "SUCCESS", (name, result.summary["images"][0]["reason"])
            np.testing.assert_array_equal(boxes_of(result.features), truth_boxes(), err_msg=name)
            assert set(result.features["featureClasses"].map(lambda c: c[0]["iri"])) == {"bright-object"}
            if name != "BUILTIN":
                metrics = result.summary["modelMetrics"]
                operation = next(k for k in metrics if k.startswith(name))
                assert metrics[operation]["invocations"] >= 1 and "latencyMs" in metrics[operation]
        assert server.stats.tiles == 4 * 16  # 16 tiles through each of the four endpoint targets
    assert s3.list_objects_v2(Bucket="job-in")["KeyCount"] == 0  # immediate cleanup
    clear_cache()


def test_misbehaving_endpoint_partial_with_exactly_the_failed_tile(client: Any, tmp_path: Path) -> None:
    image = write_scene(tmp_path / "marked.tif", marker=MARKER)
    with serving("bright-objects", fail_marker=MARKER, error_rate=0.2, throttle_rate=0.2,
                 latency=0.01) as server:
        processor = {"type": "HTTP_ENDPOINT", "name": server.url + "/invocations"}
        params = {"maxRetries": 10, "maxConcurrency": 3, **FAST}
        result = run_job(request(tmp_path, image, processor, params), client, progress=None)
        peak = server.stats.peak_in_flight
    assert result.status == "PARTIAL"
    failed = result.summary["images"][0]["failedTiles"]
    assert [t["window"] for t in failed] == [[*MARKED_TILE, MARKED_TILE[0] + TILE, MARKED_TILE[1] + TILE]]
    assert "HTTP 500" in failed[0]["reason"] or "HTTP 429" in failed[0]["reason"]  # its last try
    np.testing.assert_array_equal(boxes_of(result.features), truth_boxes())  # no square in that tile
    counts = result.summary["modelMetrics"]["HTTP_ENDPOINT:invoke"]
    assert counts["retries"] >= 10 and counts["throttles"] > 0  # 10 for the marked tile alone
    assert 1 <= peak <= 3  # the cap holds across both worker processes
    clear_cache()


def test_image_processor_max_concurrency_caps_a_sagemaker_job(client: Any, tmp_path: Path,
                                                              monkeypatch) -> None:
    image = write_scene(tmp_path / "scene.tif")
    with serving("bright-objects", instances=4, latency=0.05) as server:
        monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", server.url)
        monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER", server.url)
        processor = {"type": "SM_ENDPOINT", "name": "detector", "maxConcurrency": 2}
        result = run_job(request(tmp_path, image, processor, dict(FAST)), client, progress=None)
        peak, tiles = server.stats.peak_in_flight, server.stats.tiles
    assert result.status == "SUCCESS"
    np.testing.assert_array_equal(boxes_of(result.features), truth_boxes())
    assert tiles == 16 and peak == 2  # describe_endpoint alone would allow 4 instances x 2
    clear_cache()


def _exercise_slots(cap: int, calls: int) -> dict[str, int]:
    """Many threads of one worker through a cluster-wide Slots; what is left afterwards."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.models.retry import Slots

    slots = Slots("test-handoff", cap)
    slots.bind()
    lock, state = threading.Lock(), {"now": 0, "peak": 0}

    def call(_: int) -> None:
        with slots.slot():
            with lock:
                state["now"] += 1
                state["peak"] = max(state["peak"], state["now"])
            time.sleep(0.005)
            with lock:
                state["now"] -= 1

    with ThreadPoolExecutor(3 * cap) as threads:
        list(threads.map(call, range(calls)))
    return {"peak": state["peak"], "spare": slots._spare, "waiting": slots._waiting}


def test_cluster_leases_are_handed_on_and_all_given_back(client: Any) -> None:
    workers = list(client.scheduler_info()["workers"])
    futures = [client.submit(_exercise_slots, 3, 60, workers=[w], pure=False) for w in workers]
    for outcome in client.gather(futures):
        assert 1 <= outcome.pop("peak") <= 3 and outcome == {"spare": 0, "waiting": 0}
    from distributed import Semaphore

    leases = Semaphore(max_leases=3, name="model-runner:test-handoff:3")
    assert leases.get_value() == 0  # every lease given back once the workers went idle


def test_retries_that_recover_every_tile_give_success(client: Any, tmp_path: Path) -> None:
    image = write_scene(tmp_path / "scene.tif")
    with serving("bright-objects", error_rate=0.3) as server:
        processor = {"type": "HTTP_ENDPOINT", "name": server.url + "/invocations"}
        result = run_job(request(tmp_path, image, processor, {"maxRetries": 15, **FAST}), client,
                         progress=None)
    assert result.status == "SUCCESS"
    assert result.summary["modelMetrics"]["HTTP_ENDPOINT:invoke"]["retries"] > 0
    np.testing.assert_array_equal(boxes_of(result.features), truth_boxes())
    clear_cache()


# ---------------------------------------------------------------------------- GPU resources
@pytest.fixture(scope="module")
def mixed_client() -> Iterator[Any]:
    """One plain worker and one with ``resources={"GPU": 1}`` (both CPU, on 127.0.0.1)."""
    from distributed import Client, Scheduler, SpecCluster, Worker

    workers = {
        "cpu-0": {"cls": Worker, "options": {"nthreads": 1}},
        "gpu-0": {"cls": Worker, "options": {"nthreads": 1, "resources": {"GPU": 1}}},
    }
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}}
    with SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.WARNING) as cluster, \
            Client(cluster) as c:
        c.register_plugin(task_log_plugin())
        yield c


def test_gpu_model_tasks_run_only_on_gpu_workers(mixed_client: Any, tmp_path: Path) -> None:
    image = write_scene(tmp_path / "scene.tif")
    processor = {"type": "PYTHON", "name": "tests.model_servers:GpuProbe"}
    result = run_job(request(tmp_path, image, processor, {}), mixed_client, progress=None,
                     chunk_target=TILE - OVERLAP)  # one tile stride per chunk: 16 model tasks
    assert result.status == "SUCCESS"
    np.testing.assert_array_equal(boxes_of(result.features), truth_boxes())
    assert set(result.features["featureClasses"].map(lambda c: c[0]["iri"])) == {"gpu-0"}
    log = mixed_client.run_on_scheduler(read_task_log)
    model = [entry for entry in log if entry[0].startswith("detect-")]
    assert len(model) == 16
    assert all(worker == "gpu-0" and restrictions == {"GPU": 1} for _, worker, restrictions in model)
    others = [entry for entry in log if not entry[0].startswith("detect-")]
    assert others and all(not restrictions for _, _, restrictions in others)
    assert {worker for _, worker, _ in others} == {"cpu-0", "gpu-0"}  # reading is not pinned
    loads = mixed_client.run(lambda: __import__("tests.model_servers").model_servers.GpuProbe.loads)
    assert list(loads.values()) == [1, 1]  # in-process workers: one load for 16 model tasks


def test_gpu_job_on_a_cluster_without_gpus_fails_fast(client: Any, tmp_path: Path) -> None:
    image = write_scene(tmp_path / "scene.tif")
    processor = {"type": "PYTHON", "name": "tests.model_servers:GpuProbe"}
    with pytest.raises(ModelError, match="needs Dask worker resources GPU=1, but no worker"):
        run_job(request(tmp_path, image, processor, {}), client, progress=None)
