"""Getting a Dask client: a LocalCluster, a running scheduler, or a cluster profile.

A *profile* is a YAML file (``configs/clusters/<name>.yaml``, or any path) whose ``kind`` is
``local`` (LocalCluster), ``address`` (connect to a running scheduler), ``ecs-fargate``
(``dask_cloudprovider.aws.FargateCluster``), ``ecs`` (``ECSCluster`` on an existing ECS
cluster, the one that can have GPUs) or ``ec2`` (``EC2Cluster``). :func:`cluster_arguments`
turns a cloud profile into the exact constructor arguments, so they can be checked without
starting anything; ``${VAR}`` and ``${VAR:-default}`` in string values are read from the
environment.

A client that connected to a running cluster never shuts it down; a cluster that
:func:`connect` started is closed when the ``with`` block ends.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

PROFILE_DIR = Path(__file__).resolve().parents[1] / "configs" / "clusters"
CLOUD_CLASSES = {
    "ecs-fargate": "dask_cloudprovider.aws:FargateCluster",
    "ecs": "dask_cloudprovider.aws:ECSCluster",
    "ec2": "dask_cloudprovider.aws:EC2Cluster",
}
KINDS = ("local", "address", *CLOUD_CLASSES)
_ADDRESS = re.compile(r"^(tcp|tls|ucx|inproc|ws|wss)://|^[\w.\-]+:\d+$")
_VARIABLE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


class ClusterError(ValueError):
    """A bad cluster profile or address; ``str()`` is one line naming the file and field."""


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def is_address(text: str) -> bool:
    """``tcp://host:port``, ``tls://...`` or ``host:port``: a scheduler to connect to."""
    return bool(_ADDRESS.match(text))


def _expand(value: Any, source: str) -> Any:
    if isinstance(value, str):
        def lookup(match: re.Match[str]) -> str:
            name, default = match[1], match[2]
            if name in os.environ:
                return os.environ[name]
            if default is None:
                raise ClusterError(f"{source}: environment variable {name} is not set")
            return default

        return _VARIABLE.sub(lookup, value)
    if isinstance(value, dict):
        return {k: _expand(v, source) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, source) for v in value]
    return value


@dataclass(frozen=True)
class ClusterProfile:
    """A parsed cluster profile (see ``configs/clusters/*.yaml`` for every field)."""

    kind: str
    source: str = "<profile>"
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<profile>") -> ClusterProfile:
        if not isinstance(data, dict):
            raise ClusterError(f"{source}: a cluster profile must be a mapping")
        kind = data.get("kind")
        if kind not in KINDS:
            raise ClusterError(f"{source}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
        return cls(kind, source, _expand({k: v for k, v in data.items() if k != "kind"}, source))

    def get(self, key: str, default: Any = None) -> Any:
        return self.settings.get(key, default)

    def section(self, key: str) -> dict[str, Any]:
        value = self.settings.get(key) or {}
        if not isinstance(value, dict):
            raise ClusterError(f"{self.source}: {key} must be a mapping")
        return value


def load_profile(name_or_path: str | Path) -> ClusterProfile:
    """A profile by name (``configs/clusters/<name>.yaml``) or by path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PROFILE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")))
        raise ClusterError(
            f"unknown cluster {str(name_or_path)!r}: not a scheduler address (tcp://HOST:PORT), "
            f"a profile ({known}) or a profile file"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ClusterError(f"{path}: not valid YAML{f' at line {mark.line + 1}' if mark else ''}") from None
    return ClusterProfile.from_dict(data, str(path))


def _adaptive(profile: ClusterProfile) -> tuple[int, int] | None:
    adaptive = profile.section("adaptive")
    if not adaptive:
        return None
    low, high = int(adaptive.get("minimum", 0)), int(adaptive.get("maximum", 1))
    if not 0 <= low <= high or high < 1:
        raise ClusterError(f"{profile.source}: adaptive needs 0 <= minimum <= maximum, maximum >= 1")
    return low, high


def _gpu(profile: ClusterProfile) -> int:
    gpu = profile.section("gpu")
    return int(gpu.get("count", 1)) if gpu else 0


def cluster_arguments(profile: ClusterProfile) -> tuple[str, dict[str, Any]]:
    """``("module:Class", kwargs)`` that :func:`connect` passes to the dask-cloudprovider
    class of a cloud profile. ``extra`` entries are passed through as they are."""
    if profile.kind not in CLOUD_CLASSES:
        raise ClusterError(f"{profile.source}: kind {profile.kind} is not a cloud cluster")
    worker = profile.section("worker")
    scheduler = profile.section("scheduler")
    gpus = _gpu(profile)
    adaptive = _adaptive(profile)
    n_workers = int(profile.get("workers", adaptive[0] if adaptive else 1))
    image = profile.get("image")
    if not image:
        raise ClusterError(f"{profile.source}: image is required (the worker image; see Dockerfile)")
    kwargs: dict[str, Any]
    if profile.kind in ("ecs-fargate", "ecs"):
        if profile.kind == "ecs-fargate" and gpus:
            raise ClusterError(f"{profile.source}: Fargate has no GPUs; use kind: ecs with a GPU "
                               "cluster_arn, or kind: ec2")
        if profile.kind == "ecs" and not profile.get("cluster_arn"):
            raise ClusterError(f"{profile.source}: kind ecs needs cluster_arn (an existing ECS cluster)")
        extra_args = list(worker.get("extra_args", []))
        if gpus:
            extra_args += ["--resources", f"GPU={gpus}"]
        kwargs = {
            "image": image,
            "region_name": profile.get("region"),
            "n_workers": n_workers,
            "worker_cpu": int(worker.get("cpu", 4096)),
            "worker_mem": int(worker.get("memory", 16384)),
            "worker_nthreads": int(worker.get("threads", 1)),
            "scheduler_cpu": int(scheduler.get("cpu", 1024)),
            "scheduler_mem": int(scheduler.get("memory", 4096)),
            "scheduler_timeout": str(scheduler.get("idle_timeout", "15 minutes")),
            "environment": dict(profile.section("environment")),
            "tags": dict(profile.section("tags")),
        }
        if extra_args:
            kwargs["worker_extra_args"] = extra_args
        if gpus:
            kwargs["worker_gpu"] = gpus
        if profile.kind == "ecs":
            kwargs["cluster_arn"] = profile.get("cluster_arn")
        else:
            kwargs["fargate_spot"] = bool(profile.get("spot", False))
        for key in ("vpc", "subnets", "security_groups", "execution_role_arn", "task_role_arn",
                    "task_role_policies", "cloudwatch_logs_group"):
            if profile.get(key) is not None:
                kwargs[key] = profile.get(key)
    else:
        worker_options: dict[str, Any] = {"nthreads": int(worker.get("threads", 1))}
        if gpus:
            worker_options["resources"] = {"GPU": gpus}
        kwargs = {
            "region": profile.get("region"),
            "docker_image": image,
            "n_workers": n_workers,
            "worker_instance_type": (profile.section("gpu").get("instance_type") if gpus else None)
            or worker.get("instance_type", "m6i.xlarge"),
            "scheduler_instance_type": scheduler.get("instance_type", "t3.large"),
            "worker_options": worker_options,
            "env_vars": dict(profile.section("environment")),
            "instance_tags": dict(profile.section("tags")),
        }
        for key in ("vpc", "subnet_id", "security_groups", "iam_instance_profile", "ami",
                    "filesystem_size", "key_name", "bootstrap", "use_private_ip"):
            if profile.get(key) is not None:
                kwargs[key] = profile.get(key)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    kwargs.update(profile.section("extra"))
    return CLOUD_CLASSES[profile.kind], kwargs


def _worker_environ() -> dict[str, Any]:
    """Dask's worker environment without ``MALLOC_TRIM_THRESHOLD_``: setting it turns off glibc's
    dynamic mmap threshold, so every chunk buffer is mapped and page-faulted anew (about 20 % of
    a worker's CPU on the read path); peak RSS measured flat without it (benchmarks/bench_scale)."""
    import dask

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    return environ


#: Dask settings of the LocalClusters :func:`connect` starts, over Dask's defaults: no
#: statistical profiler sampling every worker thread each 10 ms (the summary times every
#: stage itself), and the event-loop tick and system monitor every 500 ms and 1 s instead of
#: 20 ms and 500 ms. Together 6 % of the CPU of a job on 2 cores (benchmarks/bench_throughput);
#: a local profile's ``dask_config`` overrides them.
LOCAL_DASK_CONFIG: dict[str, Any] = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "500ms",
    "distributed.admin.system-monitor.interval": "1s",
}


def local_gpu_workers(profile: ClusterProfile) -> tuple[int, int]:
    """A local profile's ``gpu`` section as ``(GPU worker processes, slots per GPU)``: each GPU
    worker sees one GPU (``CUDA_VISIBLE_DEVICES``), runs ``slots`` threads and advertises
    ``resources: {GPU: slots}``, so that up to ``slots`` chunk tasks of a model needing
    ``GPU=1`` share the GPU (one reads and decodes pixels while another runs the model).
    ``(0, 0)`` without the section."""
    gpu = profile.section("gpu")
    if not gpu:
        return 0, 0
    try:
        count, slots = int(gpu.get("workers", 1)), int(gpu.get("slots", 2))
    except (TypeError, ValueError):
        raise ClusterError(f"{profile.source}: gpu.workers and gpu.slots must be integers") from None
    if count < 1 or slots < 1:
        raise ClusterError(f"{profile.source}: gpu.workers and gpu.slots must be at least 1")
    return count, slots


def _add_gpu_workers(cluster: Any, count: int, slots: int) -> list[str]:
    """Add ``count`` GPU worker processes to a running LocalCluster (see
    :func:`local_gpu_workers`); returns their names."""
    spec = cluster.new_spec
    names = [f"gpu-{k}" for k in range(count)]
    for k, name in enumerate(names):
        options = dict(spec["options"])
        options.update(nthreads=slots, resources={"GPU": slots},
                       env={**options.get("env", {}), "CUDA_VISIBLE_DEVICES": str(k)})
        cluster.worker_spec[name] = {"cls": spec["cls"], "options": options}
    cluster.scale(len(cluster.worker_spec))  # starts the workers of the spec not yet running
    return names


#: a default local cluster (``connect("local")``, no ``workers``) for a job that reads at most
#: this many pixels (one chunk of the default chunk target) runs in this process: its worker
#: processes would take longer to start (2-3 s on 2 cores: each imports Dask, GDAL and
#: geopandas anew) and to stop than such a job takes to compute
SMALL_JOB_PIXELS = 4096 * 4096


def in_process_settings() -> dict[str, Any]:
    """LocalCluster arguments of an in-process cluster: one worker of a thread per core in this
    process, on TCP (tasks and results are serialised as with worker processes) and without a
    dashboard (the job ends before anyone could open it)."""
    return {"n_workers": 1, "threads_per_worker": default_workers(), "processes": False,
            "protocol": "tcp://", "host": "127.0.0.1", "dashboard_address": None,
            "scheduler_kwargs": {"dashboard_address": "127.0.0.1:0"},  # its health routes only
            "silence_logs": logging.WARNING}


def dashboard_link(client: Any) -> str | None:
    """The dashboard of ``client``'s cluster; None for a scheduler in this process that serves
    no dashboard (:func:`in_process_settings`)."""
    scheduler = getattr(getattr(client, "cluster", None), "scheduler", None)
    http = getattr(scheduler, "http_application", None)
    if http is not None and not getattr(http, "applications", True):
        return None
    return str(client.dashboard_link)


@contextmanager
def _local(workers: int | None, options: dict[str, Any] | None = None,
           dask_config: dict[str, Any] | None = None, gpu: tuple[int, int] = (0, 0),
           in_process: bool = False) -> Iterator[Any]:
    import dask
    from distributed import Client, LocalCluster

    n = workers or (options or {}).get("workers") or default_workers()
    settings: dict[str, Any] = {
        "threads_per_worker": 1, "processes": True, "host": "127.0.0.1",
        "dashboard_address": "127.0.0.1:0", "silence_logs": logging.WARNING,
    }
    settings.update({k: v for k, v in (options or {}).items() if k not in ("workers",)})
    if in_process:
        settings = in_process_settings()
        n = settings.pop("n_workers")
    config = {**LOCAL_DASK_CONFIG, "distributed.nanny.pre-spawn-environ": _worker_environ(),
              **(dask_config or {})}
    with dask.config.set(config), \
            LocalCluster(n_workers=n, **settings) as local, Client(local) as client:
        if gpu[0]:
            _add_gpu_workers(local, *gpu)
            client.wait_for_workers(n + gpu[0], timeout=120)
        size = f"{settings['threads_per_worker']} threads in this process" if in_process else f"{n} workers"
        log.info("LocalCluster with %s%s, dashboard %s", size,
                 f" and {gpu[0]} GPU worker(s) of {gpu[1]} slots" if gpu[0] else "", dashboard_link(client))
        yield client
        if settings.get("processes", True):
            # the worker processes end next: spare them the collections of their interpreters'
            # shutdown, which walk every object of Dask, GDAL and geopandas once more (the
            # cluster closed in 0.1-0.2 s instead of 0.35-0.7 s on 2 cores)
            client.run(gc.freeze, on_error="ignore")


@contextmanager
def _attach(address: str) -> Iterator[Any]:
    from distributed import Client

    with Client(address, timeout="20s") as client:  # closes the client only, never the cluster
        log.info("connected to %s, dashboard %s", address, client.dashboard_link)
        yield client


@contextmanager
def connect(cluster: str | None = "local", workers: int | None = None, *,
            job_pixels: int | None = None) -> Iterator[Any]:
    """A ``distributed.Client`` for ``cluster``: ``local`` (a LocalCluster of ``workers``
    single-threaded processes, on 127.0.0.1), a scheduler address (``tcp://host:port``), or a
    profile name or file (see :func:`load_profile`).

    ``job_pixels``: the pixels the job will read, where known; ``local`` without ``workers``
    for a job of at most :data:`SMALL_JOB_PIXELS` is a cluster in this process
    (:func:`in_process_settings`). A client that connected to a running cluster never shuts the
    cluster down.
    """
    if cluster in (None, "", "local"):
        small = workers is None and job_pixels is not None and job_pixels <= SMALL_JOB_PIXELS
        with _local(workers, in_process=small) as client:
            yield client
        return
    assert cluster is not None
    if is_address(cluster):
        with _attach(cluster) as client:
            yield client
        return
    profile = load_profile(cluster)
    if profile.kind == "local":
        with _local(workers, profile.section("options") | (
                {"workers": profile.get("workers")} if profile.get("workers") else {}),
                profile.section("dask_config"), local_gpu_workers(profile)) as client:
            yield client
        return
    if profile.kind == "address":
        address = profile.get("address")
        if not address:
            raise ClusterError(f"{profile.source}: address is required for kind address")
        with _attach(str(address)) as client:
            yield client
        return
    with _cloud(profile) as client:
        yield client


@contextmanager
def _cloud(profile: ClusterProfile) -> Iterator[Any]:
    from distributed import Client

    reference, kwargs = cluster_arguments(profile)
    module_name, _, name = reference.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except ImportError as exc:
        raise ClusterError(f"{profile.source}: needs dask-cloudprovider[aws] ({exc})") from None
    log.info("starting %s from %s", name, profile.source)
    with cls(**kwargs) as cluster:
        adaptive = _adaptive(profile)
        if adaptive:
            cluster.adapt(minimum=adaptive[0], maximum=adaptive[1])
        with Client(cluster) as client:
            log.info("%s up, dashboard %s", name, client.dashboard_link)
            yield client
