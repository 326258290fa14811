"""Many small images in one job: planned and computed a few images per task on the cluster
(``graphs.job_loop.timed_plans``), with the same features and summaries as a job per image
(planned here, each chunk its own task), and the planted objects found."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from affine import Affine

from graphs.image_job import run_job
from graphs.job_loop import plan_batch_size
from pipeline import synthetic
from pipeline.request import ImageRequest

URLS = [f"synthetic://{w}x{h}?bands=3&spacing=160&size=10&seed={k}&origin=10,50&gsd=0.0001"
        for k, (w, h) in enumerate([(700, 500), (520, 640), (900, 300), (600, 600), (480, 700)])]
#: summary keys that differ from run to run
TIMES = ("seconds",)


def _write(url: str, path: Path) -> Path:
    """The synthetic image ``url`` as a GeoTIFF (its pixels and georeferencing)."""
    info = synthetic.describe(url)
    pixels = synthetic.SyntheticSource(url).read((0, 0, info.width, info.height))
    assert info.transform is not None
    with rasterio.open(path, "w", driver="GTiff", width=info.width, height=info.height,
                       count=info.bands, dtype=pixels.dtype, crs=info.crs,
                       transform=Affine.from_gdal(*info.transform)) as dst:
        dst.write(pixels)
    return path


def _request(paths: list[str], job: str, out: Path) -> ImageRequest:
    return ImageRequest.parse({
        "jobId": job, "imageUrls": paths, "imageProcessorTileSize": 256, "imageProcessorTileOverlap": 32,
        "outputs": [{"type": "LOCAL", "path": str(out)}],
        "imageProcessor": {"name": "bright-objects", "type": "BUILTIN"}})


def _boxes(features: Any, url: str) -> list[tuple[float, ...]]:
    mine = features[features["image_url"] == url]
    return sorted(tuple(round(v, 3) for v in box) for box in mine["imageBBox"])


def _image(summary: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in summary.items() if key not in TIMES}


def test_batched_images_match_a_job_per_image(dask_client: Any, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("graphs.job_loop.plan_batch_size", lambda images, threads: 3)  # 6 → 2 tasks
    paths = [str(_write(url, tmp_path / f"image-{k}.tif")) for k, url in enumerate(URLS)]
    bad = tmp_path / "bad.tif"
    bad.write_bytes(Path(paths[0]).read_bytes()[:5000])  # a header, then nothing
    urls = [*paths[:2], str(bad), *paths[2:]]
    batched = run_job(_request(urls, "batched", tmp_path / "batched"), dask_client)
    assert batched.status == "PARTIAL"
    images = {s["url"]: s for s in batched.summary["images"]}
    assert [s["url"] for s in batched.summary["images"]] == urls
    for url in urls:
        alone = run_job(_request([url], f"alone-{Path(url).stem}", tmp_path / "alone"), dask_client)
        assert _image(images[url]) == _image(alone.summary["images"][0])
        assert _boxes(batched.features, url) == _boxes(alone.features, url)
    assert images[str(bad)]["status"] == "FAILED"
    for url, path in zip(URLS, paths, strict=True):  # every planted object, once
        truth = synthetic.truth(url)
        assert images[path]["status"] == "SUCCESS"
        assert images[path]["detections"]["afterMerge"] == len(truth) > 0
        found = np.array(_boxes(batched.features, path))
        assert np.allclose(np.sort(found, axis=0), np.sort(truth.astype(float), axis=0), atol=1)


def test_plan_batches_keep_every_thread_busy() -> None:
    assert plan_batch_size(500, 2) == 8
    assert plan_batch_size(20, 2) == 2
    assert plan_batch_size(3, 2) == 1
    assert plan_batch_size(5, 0) == 1
