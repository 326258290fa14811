"""Credentials are resolved where they are used, renewed before they expire, retried once after
an expiry, and never travel in tasks (issue #15).

A :class:`tests.fault_proxy.FaultProxy` in front of moto (S3 and STS) and another in front of a
serve-model server (SageMaker runtime) answer 403 ``ExpiredToken`` to any request signed with an
STS session token issued more than :data:`MAX_AGE` seconds earlier, as AWS does when a session
expires; ``MODEL_RUNNER_AWS_REFRESH_MARGIN`` makes the processes renew their sessions every
:data:`RENEW_AFTER` seconds instead of 15 minutes before the hour.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
import requests

from pipeline import aws
from pipeline.demo import match_truth, write_scene
from pipeline.request import ImageRequest
from tests.conftest import ROOT, WORKER_CREDENTIALS, free_port
from tests.fault_proxy import ProxyProcess, proxy_process
from tests.model_servers import serving

READ_ROLE = "arn:aws:iam::123456789012:role/image-reader"
MODEL_ROLE = "arn:aws:iam::123456789012:role/model-caller"
#: seconds after which the proxies refuse an STS session token
MAX_AGE = 3.0
#: seconds after which the processes renew a session (3600 s sessions, renewed that long before)
RENEW_AFTER = 1.0
RENEWING = {aws.REFRESH_MARGIN_ENV: str(3600 - RENEW_AFTER)}
#: the client's own keys: they must never reach a task
CLIENT_KEYS = {"AWS_ACCESS_KEY_ID": "client-key-0123456789",
               "AWS_SECRET_ACCESS_KEY": "client-secret-0123456789"}


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """The demo scene (512², 30 bright objects) stored so that reads keep going to S3: raw
    128-pixel blocks with a noisy background (nothing to compress, nothing near the model's
    threshold), and no overviews."""
    import rasterio

    folder = tmp_path_factory.mktemp("credscene")
    made = write_scene(folder / "demo.tif", size=512, count=30, tile_size=128, overlap=16, seed=11)
    with rasterio.open(made.path) as src:
        pixels, profile = src.read(), src.profile
    noise = np.random.default_rng(11).integers(0, 60, pixels.shape, dtype=np.uint8)
    pixels = np.where(pixels < 100, pixels + noise, pixels)
    profile.update(compress=None, blockxsize=128, blockysize=128)
    with rasterio.open(folder / "scene.tif", "w", **profile) as dst:
        dst.write(pixels)
    return replace(made, path=folder / "scene.tif")


@pytest.fixture
def proxies(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ProxyProcess, Any]]:
    """(a proxy process in front of moto for S3 and STS and of a serve-model server for the
    SageMaker runtime, that server); this process's AWS settings point at the proxy."""
    with serving("bright-objects") as model, \
            proxy_process(moto_endpoint, {"/endpoints/": f"json:{model.url}"}) as proxy:
        for name, value in {**CLIENT_KEYS, "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
                            "AWS_ENDPOINT_URL": proxy.url, "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME": proxy.url,
                            "AWS_ENDPOINT_URL_SAGEMAKER": model.url}.items():
            monkeypatch.setenv(name, value)
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            monkeypatch.delenv(name, raising=False)
        yield proxy, model


def _bucket(moto: str, scene, name: str) -> str:
    s3 = boto3.client("s3", endpoint_url=moto, region_name="us-east-1", aws_access_key_id="setup-key",
                      aws_secret_access_key="setup-secret")
    s3.create_bucket(Bucket=name)
    s3.upload_file(str(scene.path), name, "scene.tif")
    return f"s3://{name}/scene.tif"


def _request(url: str, out: Path, **extra) -> ImageRequest:
    return ImageRequest.parse({
        "jobId": "creds", "imageUrls": [url], "imageReadRole": READ_ROLE,
        "imageProcessor": {"name": "detector", "type": "SM_ENDPOINT", "assumedRole": MODEL_ROLE},
        "imageProcessorParameters": {"maxConcurrency": 2},
        "imageProcessorTileSize": 128, "imageProcessorTileOverlap": 16,
        "outputs": [{"type": "LOCAL", "path": str(out)}], **extra,
    })


def _boxes(result) -> np.ndarray:
    return np.array(list(result.features["imageBBox"]), dtype=float)


# ------------------------------------------------------------------- expiry retried once
def test_expired_credentials_are_renewed_and_the_call_sent_again(proxies, scene, moto_endpoint) -> None:
    """Without renewal ahead of expiry (the default 15-minute margin on an hour's session), a
    read and a model call that AWS refuses as expired renew the session and succeed."""
    from pipeline.models import ModelSpec, clear_cache, load_model
    from pipeline.models.builtin import bright_objects
    from pipeline.models.endpoint import resolve_model
    from pipeline.reading import RasterSource, describe, read_options

    proxy, _ = proxies
    url = _bucket(moto_endpoint, scene, "expiry-retried")
    options = read_options(url, READ_ROLE)
    info = describe(url, options)
    source = RasterSource(url, (info.bands, info.height, info.width), np.dtype(info.dtype), options)
    first = source.read((0, 0, 128, 128))
    spec = resolve_model(ModelSpec("SM_ENDPOINT", "detector", {"maxRetries": 0}, "GTIFF", "NONE",
                                   assumed_role=MODEL_ROLE))
    model = load_model(spec)
    tiles = np.full((2, 64, 64, 3), 10, dtype=np.uint8)
    tiles[:, 10:20, 30:40] = 240
    assert all(not isinstance(r, BaseException) for r in model.predict(tiles, np.zeros((2, 2))))
    proxy.expire_tokens(1.0)
    time.sleep(1.5)  # every session token in use is now refused
    window = source.read((128, 128, 384, 384))  # the same (cached) dataset, then reopened
    results = model.predict(tiles, np.zeros((2, 2)))
    clear_cache()
    import rasterio

    with rasterio.open(scene.path) as local:
        np.testing.assert_array_equal(window, local.read(window=((128, 384), (128, 384))))
        np.testing.assert_array_equal(first, local.read(window=((0, 128), (0, 128))))
    for got in results:
        assert not isinstance(got, BaseException), got
        np.testing.assert_array_equal(got.boxes, bright_objects(tiles[0]).boxes)
    # both were refused once as expired, and sent again with a new session
    assert "expired" in proxy.outcomes("GET", r"/expiry-retried/scene\.tif")
    assert "expired" in proxy.outcomes("POST", r"/endpoints/detector/invocations")
    assert proxy.outcomes("POST", r"/endpoints/detector/invocations")[-1] == 200


# ------------------------------------------------------------------- renewed mid-job
@pytest.fixture(scope="module")
def renewing_cluster() -> Iterator[object]:
    """A LocalCluster whose workers have their own keys and renew sessions every few seconds."""
    import dask

    from graphs.cluster import connect

    with dask.config.set({"distributed.nanny.environ": {**WORKER_CREDENTIALS, **RENEWING}}), \
            connect("local", workers=2) as client:
        yield client


def test_a_job_outlives_its_sessions(proxies, scene, moto_endpoint, renewing_cluster, tmp_path,
                                     monkeypatch) -> None:
    """The read role's and the model role's sessions expire several times during the job; it
    succeeds with every detection, each worker renewing its own sessions."""
    from graphs.image_job import run_job

    proxy, model = proxies
    model.behaviour.latency = 0.6  # 25 tiles, 2 at a time: longer than two sessions
    monkeypatch.setenv(aws.REFRESH_MARGIN_ENV, RENEWING[aws.REFRESH_MARGIN_ENV])
    url = _bucket(moto_endpoint, scene, "expiring-job")
    proxy.expire_tokens(MAX_AGE)
    began = time.monotonic()
    result = run_job(_request(url, tmp_path), renewing_cluster, chunk_target=160)
    took = time.monotonic() - began
    assert result.status == "SUCCESS", result.summary["images"][0]
    assert match_truth(_boxes(result), scene.truth) == (len(scene.truth), 0, 0)
    assert took > 2 * MAX_AGE  # the job outlived its sessions
    # reads and model calls were signed with many sessions, each renewed before it expired
    state = proxy.state()
    assert len(state["token_uses"]) >= 6, state["token_uses"]
    assert state["expired_tokens"] == []
    reads = [p for m, p, o in state["log"] if m == "GET" and "expiring-job" in p and o == 206]
    calls = [p for m, p, o in state["log"] if m == "POST" and "/invocations" in p and o == 200]
    assert reads and len(calls) == result.summary["images"][0]["tiles"]


# ------------------------------------------------------------------- workers' own credentials
@pytest.fixture
def dask_processes(tmp_path) -> Iterator[str]:
    """``dask scheduler`` and one ``dask worker`` as subprocesses; the worker's environment has
    keys of its own, no endpoint; yields the scheduler address."""
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(WORKER_CREDENTIALS, AWS_EC2_METADATA_DISABLED="true", PYTHONPATH=str(ROOT))
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = subprocess.Popen(  # noqa: S603 - fixed argv
        [str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
         "--dashboard-address", "127.0.0.1:0"], env=env, cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = subprocess.Popen(  # noqa: S603 - fixed argv
        [str(bin_dir / "dask"), "worker", address, "--host", "127.0.0.1", "--nthreads", "2",
         "--nworkers", "1", "--dashboard-address", "127.0.0.1:0"], env=env, cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(1, timeout=60)
        yield address
    finally:
        for process in (worker, scheduler):
            process.terminate()
        for process in (worker, scheduler):
            process.wait(timeout=30)


def test_workers_read_a_private_bucket_with_their_own_credentials(
        moto_endpoint, scene, dask_processes, tmp_path) -> None:
    """The client (the CLI, in a process without any AWS credentials) runs a job on a private
    bucket: the workers read it with their own keys, the client never reads it unsigned."""
    with proxy_process(moto_endpoint) as s3:
        s3.reject_unsigned()  # anonymous requests are refused, as a private bucket does
        url = _bucket(moto_endpoint, scene, "private-imagery")
        assert requests.get(f"{s3.url}/private-imagery/scene.tif", timeout=5).status_code == 403
        request = {"jobId": "own-keys", "imageUrls": [url],
                   "imageProcessor": {"name": "bright-objects", "type": "BUILTIN"},
                   "imageProcessorTileSize": 128, "imageProcessorTileOverlap": 16}
        (tmp_path / "request.json").write_text(json.dumps(request))
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ENDPOINT_URL=s3.url, AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
                   AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
                   PYTHONPATH=str(ROOT))
        out = tmp_path / "out"
        run = subprocess.run(  # noqa: S603 - fixed argv
            [sys.executable, "-m", "pipeline", "run", str(tmp_path / "request.json"), "--cluster",
             dask_processes, "--output-dir", str(out)], env=env, capture_output=True, text=True, timeout=240)
        assert run.returncode == 0, run.stderr[-2000:]
        outcomes = s3.outcomes("GET", r"/private-imagery/") + s3.outcomes("HEAD", r"/private-imagery/")
    summary = json.loads((out / "own-keys.summary.json").read_text())
    assert summary["status"] == "SUCCESS", summary["images"][0]
    import geopandas as gpd

    boxes = np.array(list(gpd.read_parquet(out / "own-keys.parquet")["imageBBox"]), dtype=float)
    assert match_truth(boxes, scene.truth) == (len(scene.truth), 0, 0)
    assert outcomes.count("unsigned") == 1  # only this test's own anonymous probe above
    assert 206 in outcomes or 200 in outcomes


# ------------------------------------------------------------------- nothing secret in tasks
def _sessions_secrets() -> list[str]:
    """The keys, secrets and tokens of every AWS session this process has made."""
    found = []
    for owner in list(aws._sessions.values()):
        credentials = owner.get_credentials()
        if credentials is not None:
            frozen = credentials.get_frozen_credentials()
            found += [v for v in (frozen.access_key, frozen.secret_key, frozen.token) if v]
    return found


def _role_secrets() -> tuple[int, list[str]]:
    """(how many roles this process has assumed, their secrets that its log redaction would
    not mask)."""
    from pipeline.redact import redact

    roles, unmasked = 0, []
    for (role, *_), owner in list(aws._sessions.items()):
        if role:
            roles += 1
            frozen = owner.get_credentials().get_frozen_credentials()
            unmasked += [v for v in (frozen.access_key, frozen.secret_key, frozen.token) if v in redact(v)]
    return roles, unmasked


def _scheduler_specs(dask_scheduler=None) -> bytes:  # noqa: ANN001 - run_on_scheduler injects it
    """Every task the scheduler knows, its run_spec pickled."""
    import cloudpickle

    return b"".join(cloudpickle.dumps(state.run_spec) for state in list(dask_scheduler.tasks.values()))


def test_no_secret_in_the_scheduler_or_the_graph(proxies, scene, moto_endpoint, dask_client,
                                                 tmp_path) -> None:
    """While a job with an imageReadRole and a model assumedRole runs on an S3 image and on a
    presigned URL, no task on the scheduler and no pickle of the job's graph holds the client's
    keys, the roles' credentials (the client's sessions or the workers'), the workers' keys or
    the presigned URL's signature and key id."""
    import cloudpickle

    from graphs.image_job import chunk_results, model_spec, plan_image
    from graphs.model_targets import prepare_model

    proxy, _ = proxies
    url = _bucket(moto_endpoint, scene, "graph-secrets")
    from botocore.config import Config

    signer = boto3.client("s3", endpoint_url=proxy.url, config=Config(signature_version="s3v4"))
    presigned = signer.generate_presigned_url(
        "get_object", Params={"Bucket": "graph-secrets", "Key": "scene.tif"}, ExpiresIn=600)
    query = dict(part.split("=", 1) for part in presigned.split("?", 1)[1].split("&"))
    request = _request(url, tmp_path)
    spec = prepare_model(dask_client, model_spec(request))
    plans = [plan_image(request, url, 160), plan_image(request, presigned, 160)]
    results = [chunk_results(plan, request, spec, dask_client) for plan in plans]
    futures = dask_client.compute([d for r in results for d in r.to_delayed().ravel()])
    found = dask_client.gather(futures)  # the workers have assumed both roles by now
    assert len(found) == 2 * results[0].npartitions
    dumped = dask_client.run_on_scheduler(_scheduler_specs)
    graph = b"".join(cloudpickle.dumps(dict(r.__dask_graph__())) for r in results) + pickle.dumps(spec)
    secrets = {*CLIENT_KEYS.values(), *_sessions_secrets(), *WORKER_CREDENTIALS.values(),
               query["X-Amz-Signature"], query["X-Amz-Credential"]}
    for worker_secrets in dask_client.run(_sessions_secrets).values():
        secrets.update(worker_secrets)
    # each worker assumed the roles itself and registered their secrets for redaction there
    assert sum(roles for roles, _ in dask_client.run(_role_secrets).values()) >= 2
    assert all(unmasked == [] for _, unmasked in [*dask_client.run(_role_secrets).values(), _role_secrets()])
    secrets = {s for s in secrets if len(s) >= 8} - {"us-east-1"}  # other tests' "k"/"s" keys
    assert len(secrets) >= 2 + 6 + 2 + 2  # client keys, two roles here, worker keys, presigned
    assert len(dumped) > 1000 and b"detect" in dumped and READ_ROLE.encode() in dumped
    for secret in secrets:
        assert secret.encode() not in dumped, "a secret in the scheduler's tasks"
        assert secret.encode() not in graph, "a secret in the job's graph"
    del futures
