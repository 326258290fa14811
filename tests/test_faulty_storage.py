"""Faulty storage: a fault-injecting proxy in front of the moto server.

Transient S3 faults (503 SlowDown, 500, connection resets) on reads (GDAL ``/vsis3/``) and
writes (boto3) are retried and the job succeeds; permanent ones fail that image, or the write,
with one line, and never leave a partial object at a final key.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import geopandas as gpd
import numpy as np
import pytest
import shapely
from rasterio.io import MemoryFile
from rasterio.transform import from_origin

from graphs.image_job import run_job
from pipeline.request import ImageRequest
from pipeline.sinks import S3Sink
from tests.fault_proxy import FaultProxy, fault_proxy

SQUARES = [(20, 20), (100, 150), (150, 280)]


def _image_bytes() -> bytes:
    pixels = np.zeros((1, 200, 300), dtype=np.uint8)
    for row, col in SQUARES:
        pixels[0, row : row + 8, col : col + 8] = 255
    with MemoryFile() as memory:
        with memory.open(driver="GTiff", width=300, height=200, count=1, dtype="uint8", tiled=True,
                         blockxsize=128, blockysize=128, crs="EPSG:4326",
                         transform=from_origin(10, 50, 1e-4, 1e-4)) as dst:
            dst.write(pixels)
        return bytes(memory.read())


@pytest.fixture
def direct(aws: str) -> Any:
    """A boto3 client straight to moto (no faults), for setup and checks."""
    s3 = boto3.client("s3", endpoint_url=aws)
    for bucket in ("images", "results"):
        s3.create_bucket(Bucket=bucket)
    return s3


@pytest.fixture
def proxy(aws: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    with fault_proxy(aws) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)  # boto3 and GDAL both go through it
        yield proxy


def _put_image(direct: Any) -> tuple[str, str]:
    key = f"scenes/{uuid.uuid4().hex}.tif"  # a new name: GDAL caches /vsis3/ objects by name
    direct.put_object(Bucket="images", Key=key, Body=_image_bytes())
    return f"s3://images/{key}", f"/images/{key}"


def _request(urls: list[str], outputs: list[dict[str, Any]]) -> ImageRequest:
    return ImageRequest.parse({
        "jobId": f"storage-{uuid.uuid4().hex[:8]}",
        "imageUrls": urls,
        "outputs": outputs,
        "imageProcessor": {"name": "bright-objects", "type": "BUILTIN"},
        "imageProcessorTileSize": 128,
        "imageProcessorTileOverlap": 16,
    })


def test_transient_read_faults_are_retried(direct: Any, proxy: FaultProxy, dask_client: Any,
                                           tmp_path: Path) -> None:
    url, path = _put_image(direct)
    proxy.inject("GET", f"^{path}$", status=503, times=2)  # the header read: SlowDown twice
    proxy.inject("GET", f"^{path}$", status=500, times=1)
    proxy.inject("GET", f"^{path}$", status=None, times=1)  # then a connection reset
    result = run_job(_request([url], [{"type": "LOCAL", "path": str(tmp_path)}]), dask_client)
    assert result.status == "SUCCESS", result.summary["images"][0]["reason"]
    assert len(result.features) == len(SQUARES)
    outcomes = proxy.outcomes("GET", f"^{path}$")
    assert outcomes[:4] == [503, 503, 500, "reset"] and 206 in outcomes[4:]


def test_permanent_read_faults_fail_only_that_image(direct: Any, proxy: FaultProxy, dask_client: Any,
                                                    tmp_path: Path) -> None:
    good, _ = _put_image(direct)
    bad, bad_path = _put_image(direct)
    proxy.inject("GET", f"^{bad_path}", status=403, times=None)
    proxy.inject("HEAD", f"^{bad_path}", status=403, times=None)
    result = run_job(_request([good, bad], [{"type": "LOCAL", "path": str(tmp_path)}]), dask_client)
    assert result.status == "PARTIAL"
    first, second = result.summary["images"]
    assert first["status"] == "SUCCESS" and first["detections"]["afterMerge"] == len(SQUARES)
    assert second["status"] == "FAILED"
    assert bad in second["reason"] and "\n" not in second["reason"]
    assert len(proxy.outcomes("GET", f"^{bad_path}")) <= 2  # 403 is not retried


def test_transient_write_faults_are_retried(direct: Any, proxy: FaultProxy, dask_client: Any) -> None:
    url, _ = _put_image(direct)
    request = _request([url], [{"type": "S3", "bucket": "results", "prefix": "runs/a"}])
    job = request.job_id
    proxy.inject("PUT", f"^/results/runs/a/{job}.geojson", status=503, times=2)
    proxy.inject("PUT", f"^/results/runs/a/{job}.parquet", status=None, times=1)
    proxy.inject("PUT", f"^/results/runs/a/{job}.summary.json", status=500, times=1)
    result = run_job(request, dask_client)
    assert result.status == "SUCCESS"
    body = direct.get_object(Bucket="results", Key=f"runs/a/{job}.geojson")["Body"].read()
    assert len(json.loads(body)["features"]) == len(SQUARES)
    summary = json.loads(direct.get_object(Bucket="results", Key=f"runs/a/{job}.summary.json")["Body"].read())
    assert summary["status"] == "SUCCESS"
    assert proxy.outcomes("PUT", f"^/results/runs/a/{job}.geojson")[:3] == [503, 503, 200]


def test_a_permanent_write_fault_fails_in_one_line_and_leaves_no_object(
    direct: Any, proxy: FaultProxy, dask_client: Any
) -> None:
    url, _ = _put_image(direct)
    request = _request([url], [{"type": "S3", "bucket": "results", "prefix": "runs/b"}])
    proxy.inject("PUT", f"^/results/runs/b/{request.job_id}.geojson", status=500, times=None)
    with pytest.raises(OSError) as err:
        run_job(request, dask_client)
    message = str(err.value)
    assert message.startswith(f"cannot write s3://results/runs/b/{request.job_id}.geojson: ")
    assert "\n" not in message
    listed = direct.list_objects_v2(Bucket="results", Prefix="runs/b/").get("Contents", [])
    assert not [o["Key"] for o in listed if o["Key"].endswith(".geojson")]


def test_a_multipart_upload_fails_whole_and_is_aborted(direct: Any, proxy: FaultProxy,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A GeoJSON above boto3's 8 MiB multipart threshold; completing the upload fails for good:
    no object appears at the key and no upload is left open."""
    n = 70_000
    x = np.arange(n, dtype=float) % 1000
    features = gpd.GeoDataFrame({"id": [f"feature-{i}" for i in range(n)], "score": np.linspace(0, 1, n)},
                                geometry=shapely.box(x, x, x + 0.5, x + 0.5), crs="EPSG:4326")
    sink = S3Sink("results", "runs/c", ("geojson",))
    proxy.inject("POST", r"^/results/runs/c/big\.geojson\?uploadId=", status=500, times=None)
    with pytest.raises(OSError, match=r"^cannot write s3://results/runs/c/big.geojson: "):
        sink.write_features("big", features)
    assert proxy.outcomes("PUT", r"partNumber="), "expected a multipart upload"
    assert "Contents" not in direct.list_objects_v2(Bucket="results", Prefix="runs/c/")
    assert direct.list_multipart_uploads(Bucket="results").get("Uploads", []) == []
    proxy.clear()
    assert sink.write_features("big", features) == ["s3://results/runs/c/big.geojson"]
    head = direct.head_object(Bucket="results", Key="runs/c/big.geojson")
    assert head["ContentLength"] > 8 * 1024 * 1024

