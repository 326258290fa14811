"""Cluster profiles: exact dask-cloudprovider arguments (nothing started in the cloud), and a
real ``dask scheduler`` + ``dask worker`` cluster on 127.0.0.1: connect by address or profile,
never shut it down, and survive a worker killed with SIGKILL in the middle of a job."""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from graphs.cluster import ClusterError, ClusterProfile, cluster_arguments, connect, load_profile
from graphs.image_job import run_job
from pipeline import synthetic
from pipeline.request import ImageRequest
from tests.scale_models import calls

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "123.dkr.ecr.eu-west-1.amazonaws.com/dask-model-runner:test"
#: the Dask settings that the cloud profiles give their workers (as local clusters have)
WORKER_DASK_ENV = {"DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "False",
                   "DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL": "500ms"}


@pytest.fixture
def cloud_env(monkeypatch):
    monkeypatch.setenv("MODEL_RUNNER_IMAGE", IMAGE)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")


# ---------------------------------------------------------------- profiles → constructor args
def test_fargate_profile_gives_exact_fargatecluster_arguments(cloud_env) -> None:
    reference, kwargs = cluster_arguments(load_profile("ecs-fargate"))
    assert reference == "dask_cloudprovider.aws:FargateCluster"
    assert kwargs == {
        "image": IMAGE,
        "region_name": "eu-west-1",
        "n_workers": 1,
        "worker_cpu": 4096,
        "worker_mem": 16384,
        "worker_nthreads": 1,
        "scheduler_cpu": 1024,
        "scheduler_mem": 4096,
        "scheduler_timeout": "15 minutes",
        "environment": {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", **WORKER_DASK_ENV},
        "tags": {"project": "dask-model-runner"},
        "fargate_spot": False,
    }


def test_ec2_profile_gives_exact_ec2cluster_arguments(cloud_env) -> None:
    reference, kwargs = cluster_arguments(load_profile("ec2"))
    assert reference == "dask_cloudprovider.aws:EC2Cluster"
    assert kwargs == {
        "region": "eu-west-1",
        "docker_image": IMAGE,
        "n_workers": 1,
        "worker_instance_type": "m6i.xlarge",
        "scheduler_instance_type": "t3.large",
        "worker_options": {"nthreads": 1},
        "env_vars": {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", **WORKER_DASK_ENV},
        "instance_tags": {"project": "dask-model-runner"},
    }


def test_gpu_worker_groups_advertise_the_gpu_resource(cloud_env) -> None:
    base = load_profile("ec2").settings
    ec2 = ClusterProfile.from_dict({"kind": "ec2", **base, "gpu": {"count": 1, "instance_type": "g5.xlarge"},
                                    "adaptive": {"minimum": 0, "maximum": 4}, "workers": 2})
    _, kwargs = cluster_arguments(ec2)
    assert kwargs["worker_instance_type"] == "g5.xlarge"
    assert kwargs["worker_options"] == {"nthreads": 1, "resources": {"GPU": 1}}
    assert kwargs["n_workers"] == 2
    ecs = ClusterProfile.from_dict({"kind": "ecs", "image": IMAGE,
                                    "cluster_arn": "arn:aws:ecs:x:1:cluster/gpu",
                                    "gpu": {"count": 1}, "extra": {"skip_cleanup": True}})
    reference, kwargs = cluster_arguments(ecs)
    assert reference == "dask_cloudprovider.aws:ECSCluster"
    assert kwargs["worker_gpu"] == 1 and kwargs["worker_extra_args"] == ["--resources", "GPU=1"]
    assert kwargs["cluster_arn"] == "arn:aws:ecs:x:1:cluster/gpu" and kwargs["skip_cleanup"] is True


def test_arguments_are_accepted_by_the_real_constructors(cloud_env) -> None:
    from dask_cloudprovider.aws import EC2Cluster, ECSCluster
    from dask_cloudprovider.generic.vmcluster import VMCluster

    _, fargate = cluster_arguments(load_profile("ecs-fargate"))
    inspect.signature(ECSCluster.__init__).bind(None, **fargate)  # FargateCluster forwards to it
    _, ec2 = cluster_arguments(load_profile("ec2"))
    names = set(inspect.signature(EC2Cluster.__init__).parameters) | set(
        inspect.signature(VMCluster.__init__).parameters)
    assert set(ec2) <= names


@pytest.mark.parametrize("data, words", [
    ({"kind": "ecs-fargate", "image": "x", "gpu": {"count": 1}}, "Fargate has no GPUs"),
    ({"kind": "ec2"}, "image is required"),
    ({"kind": "ecs", "image": "x"}, "cluster_arn"),
    ({"kind": "k8s"}, "kind must be one of"),
    ({"kind": "ec2", "image": "${NOT_SET_ANYWHERE_42}"}, "NOT_SET_ANYWHERE_42 is not set"),
    ({"kind": "ec2", "image": "x", "adaptive": {"minimum": 5, "maximum": 2}}, "adaptive"),
])
def test_bad_profiles_fail_in_one_line(data, words) -> None:
    with pytest.raises(ClusterError) as err:
        cluster_arguments(ClusterProfile.from_dict(data, "my.yaml"))
    assert words in str(err.value) and str(err.value).startswith("my.yaml") and "\n" not in str(err.value)


def test_unknown_cluster_name_lists_the_profiles() -> None:
    with pytest.raises(ClusterError) as err:
        with connect("nonsense"):
            pass
    assert "address" in str(err.value) and "ecs-fargate" in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- a real address cluster
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["DASK_DISTRIBUTED__WORKER__DAEMON"] = "False"
    return env


@pytest.fixture
def address_cluster(tmp_path):
    """``dask scheduler`` and two Nanny-less ``dask worker`` processes, all on 127.0.0.1."""
    dask = str(Path(sys.executable).with_name("dask"))
    scheduler_file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen(
        [dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0",
         "--scheduler-file", str(scheduler_file), "--no-show"],
        env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    for _ in range(200):
        if scheduler_file.exists() and scheduler_file.stat().st_size:
            break
        time.sleep(0.1)
    address = json.loads(scheduler_file.read_text())["address"]
    workers = [subprocess.Popen(
        [dask, "worker", address, "--no-nanny", "--nthreads", "1", "--host", "127.0.0.1",
         "--no-dashboard", "--name", f"w{k}"],
        env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for k in range(2)]
    procs += workers
    from distributed import Client

    with Client(address, timeout="30s") as client:
        client.wait_for_workers(2, timeout=60)
    try:
        yield address, procs[0], workers
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _request(tmp_path: Path, url: str, log: Path, delay: float = 0.0, job: str = "cl") -> ImageRequest:
    return ImageRequest.parse({
        "jobId": job,
        "imageUrls": [url],
        "outputs": [{"type": "LOCAL", "path": str(tmp_path / job)}],
        "imageProcessor": {"name": "tests.scale_models:make", "type": "PYTHON"},
        "imageProcessorParameters": {"log": str(log), "delay": delay, "batchSize": 2},
        "imageProcessorTileSize": 256,
        "imageProcessorTileOverlap": 32,
    })


def test_address_and_profile_connect_without_shutting_the_cluster_down(address_cluster, tmp_path) -> None:
    address, scheduler, workers = address_cluster
    url = "synthetic://900x700?spacing=128&size=10"
    with connect(address) as client:
        result = run_job(_request(tmp_path, url, tmp_path / "calls.log"), client, chunk_target=450)
    assert result.status == "SUCCESS" and result.summary["features"] == len(synthetic.truth(url))
    # the model ran in the worker processes that the test started
    assert {pid for pid, _, _ in calls(str(tmp_path / "calls.log"))} <= {w.pid for w in workers}
    profile = tmp_path / "mine.yaml"
    profile.write_text(f"kind: address\naddress: {address}\n")
    with connect(str(profile)) as client:
        assert len(client.scheduler_info(n_workers=-1)["workers"]) == 2
    assert scheduler.poll() is None and all(w.poll() is None for w in workers)
    from distributed import Client

    with Client(address, timeout="10s") as again:
        assert len(again.scheduler_info(n_workers=-1)["workers"]) == 2


def test_killing_a_worker_mid_job_gives_the_same_features(address_cluster, tmp_path) -> None:
    address, _, workers = address_cluster
    url = "synthetic://1800x1500?spacing=150&size=10&seed=9"
    log = tmp_path / "calls.log"
    victim = workers[0]
    killed = threading.Event()

    def kill_when_busy() -> None:
        # SIGKILL the first worker once it has run a few model calls (mid-job)
        deadline = time.time() + 60
        while time.time() < deadline and not killed.is_set():
            if sum(1 for pid, _, _ in calls(str(log)) if pid == victim.pid) >= 6:
                os.kill(victim.pid, signal.SIGKILL)
                killed.set()
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_when_busy, daemon=True)
    with connect(address) as client:
        killer.start()
        disturbed = run_job(_request(tmp_path, url, log, delay=0.03, job="disturbed"), client,
                            chunk_target=450)
        killer.join(timeout=5)
        assert killed.is_set() and victim.wait(timeout=10) == -signal.SIGKILL
        seen = calls(str(log))
        assert any(pid == workers[1].pid for pid, _, _ in seen)
        undisturbed = run_job(_request(tmp_path, url, tmp_path / "calm.log", job="calm"), client,
                              chunk_target=450)
    assert disturbed.status == undisturbed.status == "SUCCESS"
    assert set(disturbed.features["id"]) == set(undisturbed.features["id"])
    truth = {tuple(b) for b in synthetic.truth(url).tolist()}
    got = {tuple(int(v) for v in b) for b in disturbed.features["imageBBox"]}
    assert got == truth and len(disturbed.features) == len(truth)
    # every tile was done at least once; the victim's unfinished work was redone elsewhere
    tiles = {(x, y) for _, x, y in seen}
    assert len(tiles) == disturbed.summary["images"][0]["tiles"]


def test_local_workers_run_without_a_malloc_trim_threshold(monkeypatch) -> None:
    import os

    from graphs.cluster import connect

    # an in-process dask Worker of an earlier test may have set it in this process
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    with connect("local", workers=1) as client:
        environ = client.run(lambda: dict(os.environ))
    (worker_environ,) = environ.values()
    assert "MALLOC_TRIM_THRESHOLD_" not in worker_environ
    assert worker_environ.get("OMP_NUM_THREADS") == "1"  # dask's other settings are kept


def test_local_clusters_run_with_lighter_dask_settings_that_a_profile_overrides(tmp_path) -> None:
    import dask

    from graphs.cluster import connect

    def settings() -> tuple[bool, str]:
        return (dask.config.get("distributed.worker.profile.enabled"),
                dask.config.get("distributed.admin.tick.interval"))

    import distributed  # noqa: F401 - loads its config defaults

    before = settings()
    with connect("local", workers=1) as client:
        (worker,) = client.run(settings).values()
        scheduler = client.run_on_scheduler(settings)
    assert worker == (False, "500ms") and scheduler[1] == "500ms"
    profile = tmp_path / "profiled.yaml"
    profile.write_text("kind: local\nworkers: 1\n"
                       "dask_config:\n  distributed.worker.profile.enabled: true\n")
    with connect(str(profile)) as client:
        (worker,) = client.run(settings).values()
    assert worker == (True, "500ms")
    assert settings() == before  # set only inside connect


def test_results_gathered_before_their_worker_dies_still_count(address_cluster, tmp_path) -> None:
    """A chunk whose result the client already holds is done, even if the worker that computed
    it dies before the client reads it (its future then reads "lost"/"pending")."""
    address, _, workers = address_cluster
    url = "synthetic://1800x1500?spacing=150&size=10&seed=9"
    log = tmp_path / "calls.log"
    victim = workers[0]

    class KillOnFirstUpdate:
        """A progress bar that, at the first chunk, waits for every chunk to finish (so their
        results are gathered) and then kills a worker that holds some of them."""

        def __init__(self, total: int) -> None:
            self.total, self.updates = total, 0

        def update(self, n: int) -> None:
            self.updates += 1
            if self.updates == 1:
                deadline = time.time() + 60
                while time.time() < deadline and len({(x, y) for _, x, y in calls(str(log))}) < self.total:
                    time.sleep(0.05)
                time.sleep(0.5)
                os.kill(victim.pid, signal.SIGKILL)
                victim.wait(timeout=10)
                time.sleep(0.3)  # the scheduler notices and recomputes the victim's keys (slowly)

        def close(self) -> None:
            pass

    with connect(address) as client:
        result = run_job(_request(tmp_path, url, log, delay=0.1, job="race"), client, chunk_target=450,
                         progress=KillOnFirstUpdate)
    assert {pid for pid, _, _ in calls(str(log))} >= {victim.pid}, "the victim did some chunks"
    assert result.status == "SUCCESS", result.summary["images"][0].get("reason")
    truth = {tuple(b) for b in synthetic.truth(url).tolist()}
    assert {tuple(int(v) for v in b) for b in result.features["imageBBox"]} == truth


def test_failure_reasons_read_what_as_completed_gives_back() -> None:
    from concurrent.futures import CancelledError

    from graphs.image_job import _future_error

    try:
        raise ValueError("model said no\nsecond line")
    except ValueError as exc:
        cleaned = (ValueError, exc, exc.__traceback__)
    assert _future_error(cleaned) == "ValueError: model said no"
    assert _future_error(CancelledError("k")) == "CancelledError: k"
    assert _future_error(None) == "task gave no result: NoneType"


def test_readme_lists_every_permission_dask_cloudprovider_needs_for_ecs() -> None:
    """The README's ECS client permissions cover dask-cloudprovider's own minimal policy (kept
    in FargateCluster's docstring), so an upgrade that needs more shows up here."""
    import re

    from dask_cloudprovider.aws import FargateCluster

    doc = FargateCluster.__doc__ or ""
    policy = json.loads(doc[doc.index("minimal IAM policy"):].split(".. code-block:: json", 1)[1]
                        .split("\n\n    ", 2)[1])
    actions = policy["Statement"][0]["Action"]
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Running on AWS"):readme.index("### Troubleshooting")]
    listed = {(service, name) for service, names in re.findall(r"`(ec2|ecs|iam|logs):([^`]+)`", section)
              for name in re.split(r"[,\s]+", names) if name}
    assert len(actions) > 20
    missing = [a for a in actions if tuple(a.split(":")) not in listed]
    assert not missing, f"README 'Running on AWS' lacks {missing}"


def test_a_small_job_gets_a_cluster_in_this_process_and_a_larger_one_worker_processes() -> None:
    from graphs.cluster import SMALL_JOB_PIXELS, dashboard_link, default_workers

    with connect("local", job_pixels=SMALL_JOB_PIXELS) as client:
        (pid,) = client.run(os.getpid).values()
        (threads,) = client.nthreads().values()
        assert pid == os.getpid() and threads == default_workers()
        assert dashboard_link(client) is None
        assert client.submit(sum, [1, 2, 3]).result() == 6
    # more pixels, or workers asked for: worker processes, with a dashboard on 127.0.0.1
    for kwargs in ({"job_pixels": SMALL_JOB_PIXELS + 1},
                   {"job_pixels": 1, "workers": 1}):
        with connect("local", **kwargs) as client:
            pids = set(client.run(os.getpid).values())
            assert pids and os.getpid() not in pids
            assert str(dashboard_link(client)).startswith("http://127.0.0.1:")
