"""End to end on a real LocalCluster: CLI and API, files written and read back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import pytest

from graphs.image_job import run_job
from pipeline.demo import match_truth, write_scene
from pipeline.request import ImageRequest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    # 1500 px, tiles 256/48 → chunks of 4096/208 ≈ 20 strides; use a small chunk target below
    return write_scene(tmp_path_factory.mktemp("scene") / "scene.tif", size=1500, count=60,
                       tile_size=256, overlap=48, seed=11)


def _request(scene, out: Path, **extra) -> ImageRequest:
    return ImageRequest.parse({
        "jobId": "e2e",
        "imageUrls": [str(scene.path)],
        "outputs": [{"type": "LOCAL", "path": str(out)}],
        "imageProcessor": {"name": "bright-objects", "type": "BUILTIN"},
        "imageProcessorTileSize": 256,
        "imageProcessorTileOverlap": 48,
        "featureProperties": [{"campaign": "test"}],
        **extra,
    })


def test_api_job_finds_every_planted_object_once(scene, tmp_path, dask_client) -> None:
    result = run_job(_request(scene, tmp_path), dask_client, chunk_target=600)
    assert result.status == "SUCCESS"
    boxes = np.array(list(result.features["imageBBox"]), dtype=float)
    matched, duplicates, extra = match_truth(boxes, scene.truth)
    assert (matched, duplicates, extra) == (len(scene.truth), 0, 0)
    image = result.summary["images"][0]
    assert image["tiles"] == 49 and image["failedTiles"] == []
    assert image["detections"]["afterMerge"] == len(scene.truth)
    assert result.features["campaign"].eq("test").all()


def test_cli_run_writes_readable_geojson_and_geoparquet(scene, tmp_path) -> None:
    request = tmp_path / "request.json"
    request.write_text(json.dumps({
        "jobId": "cli-job",
        "imageUrls": [str(scene.path)],
        "imageProcessor": {"name": "bright-objects", "type": "BUILTIN"},
        "imageProcessorTileSize": 512,
        "imageProcessorTileOverlap": 48,
    }))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(request), "--output-dir", str(out),
         "--workers", "2", "--no-progress", "--quicklook", str(tmp_path / "ql.png")],
        capture_output=True, text=True, cwd=ROOT, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    assert "job cli-job: SUCCESS" in proc.stdout
    files = sorted(p.name for p in out.iterdir())
    assert files == ["cli-job.geojson", "cli-job.parquet", "cli-job.summary.json", "cli-job.summary.png"]

    collection = json.loads((out / "cli-job.geojson").read_text())
    assert collection["type"] == "FeatureCollection"
    assert len(collection["features"]) == len(scene.truth)
    feature = collection["features"][0]
    assert feature["geometry"]["type"] == "Polygon"
    props = feature["properties"]
    assert set(props) >= {"imageBBox", "imageGeometry", "featureClasses", "center_longitude",
                          "center_latitude", "inferenceMetadata", "image_url"}
    assert props["inferenceMetadata"]["jobId"] == "cli-job"
    # lon/lat near the demo scene (UTM 17N, Florida), rings closed and counter-clockwise
    ring = np.array(feature["geometry"]["coordinates"][0])
    assert -82.1 < ring[:, 0].mean() < -81.9 and 29.6 < ring[:, 1].mean() < 29.8
    assert (ring[0] == ring[-1]).all()
    signed_area = np.sum(ring[:-1, 0] * ring[1:, 1] - ring[1:, 0] * ring[:-1, 1])
    assert signed_area > 0

    frame = gpd.read_parquet(out / "cli-job.parquet")
    assert len(frame) == len(scene.truth) and frame.crs.to_epsg() == 4326
    table = pq.read_table(out / "cli-job.parquet")
    geo = json.loads(table.schema.metadata[b"geo"])
    assert geo["version"] == "1.1.0" and "covering" in geo["columns"]["geometry"]
    assert "bbox" in table.column_names

    summary = json.loads((out / "cli-job.summary.json").read_text())
    assert summary["status"] == "SUCCESS" and summary["features"] == len(scene.truth)
    assert (tmp_path / "ql.png").stat().st_size > 1000


def test_missing_image_fails_that_image_only(scene, tmp_path, dask_client) -> None:
    request = _request(scene, tmp_path)
    request = request.model_copy(update={"image_urls": [str(tmp_path / "nope.tif"), str(scene.path)]})
    result = run_job(request, dask_client, chunk_target=600)
    assert result.status == "PARTIAL"
    first, second = result.summary["images"]
    assert first["status"] == "FAILED" and first["reason"].startswith("image not found")
    assert second["status"] == "SUCCESS"
    assert len(result.features) == len(scene.truth)


def test_all_images_missing_is_failed_and_writes_no_features(tmp_path, dask_client, scene) -> None:
    request = _request(scene, tmp_path)
    request = request.model_copy(update={"image_urls": [str(tmp_path / "nope.tif")]})
    result = run_job(request, dask_client)
    assert result.status == "FAILED"
    assert not list(tmp_path.glob("e2e.geojson")) and not list(tmp_path.glob("e2e.parquet"))
    assert (tmp_path / "e2e.summary.json").exists()


def test_failing_model_tiles_make_a_partial_job(scene, tmp_path, dask_client) -> None:
    request = _request(scene, tmp_path).model_copy(update={
        "image_processor": {"name": "tests.flaky_model:make", "type": "PYTHON"},
        "image_processor_parameters": {"fail_x": 416},
    })
    request = ImageRequest.parse(request.to_wire())
    result = run_job(request, dask_client, chunk_target=600)
    assert result.status == "PARTIAL"
    failed = result.summary["images"][0]["failedTiles"]
    # tiles whose x offset is 416 fail: one column of 7 tiles
    assert len(failed) == 7 and all(t["window"][0] == 416 for t in failed)
    assert "RuntimeError: tile at x=416 refused" in failed[0]["reason"]
    assert (tmp_path / "e2e.geojson").exists()


def test_mixed_georeferenced_and_pixel_images_keep_one_crs(scene, tmp_path, dask_client) -> None:
    # the same pixels without georeferencing: its features keep their pixel boxes, no geometry
    import rasterio

    with rasterio.open(scene.path) as src:
        pixels = src.read()
    plain = tmp_path / "plain.tif"
    with rasterio.open(plain, "w", driver="GTiff", width=pixels.shape[2], height=pixels.shape[1],
                       count=pixels.shape[0], dtype=pixels.dtype) as dst:
        dst.write(pixels)
    out = tmp_path / "out"
    request = _request(scene, out, imageUrls=[str(scene.path), str(plain)])
    result = run_job(request, dask_client, chunk_target=600)
    assert result.status == "SUCCESS"
    images = {i["url"]: i for i in result.summary["images"]}
    n = len(scene.truth)
    assert images[str(scene.path)]["detections"]["afterMerge"] == n
    assert images[str(plain)]["detections"]["afterMerge"] == n
    for written in (gpd.read_parquet(out / "e2e.parquet"), gpd.read_file(out / "e2e.geojson")):
        assert written.crs.to_epsg() == 4326 and len(written) == 2 * n
        ground = written[written["image_url"] == str(scene.path)]
        pixel = written[written["image_url"] == str(plain)]
        assert ground.geometry.notna().all() and ground.geometry.is_valid.all()
        assert pixel.geometry.isna().all()  # no lon/lat made up from pixel coordinates
    table = gpd.read_parquet(out / "e2e.parquet")
    boxes = {url: {tuple(b) for b in table[table["image_url"] == url]["imageBBox"]}
             for url in (str(scene.path), str(plain))}
    assert boxes[str(plain)] == boxes[str(scene.path)]  # same pixels, same boxes
    text = json.loads((out / "e2e.geojson").read_text())
    assert sum(f["geometry"] is None for f in text["features"]) == n
