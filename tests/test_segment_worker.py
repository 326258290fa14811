"""Segmentation through the SQS queue worker (a real moto server and LocalCluster): the COG and
polygons land in S3 with the status events; a job whose chunks failed resumes from the parts
its workers left under the S3 output (no shared disk)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine

from graphs.segment_job import run_segmentation
from pipeline.request import ImageRequest
from pipeline.segmentation.models import threshold_answer
from tests.test_queue_worker import allow_list, counts, drain, queues, worker  # noqa: F401 - fixtures

WIDTH, HEIGHT = 1200, 900
TRANSFORM = Affine(0.5, 0.0, 400000.0, 0.0, -0.5, 3700000.0)  # EPSG:32617
SHAPES = [shapely.Point(300, 300).buffer(120, quad_segs=128),
          shapely.Point(820, 560).buffer(150, quad_segs=128),
          shapely.box(40, 800, 1160, 830)]  # the strip crosses every vertical seam


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH] + 0.5
    truth = np.zeros((HEIGHT, WIDTH), np.uint8)
    for shape in SHAPES:
        truth |= shapely.contains_xy(shape, xx, yy).astype(np.uint8)
    path = tmp_path_factory.mktemp("segworker") / "planted.tif"
    with rasterio.open(path, "w", driver="GTiff", width=WIDTH, height=HEIGHT, count=1, dtype="uint8",
                       crs="EPSG:32617", transform=TRANSFORM, tiled=True, blockxsize=256,
                       blockysize=256) as dst:
        dst.write(np.where(truth == 1, 220, 20).astype(np.uint8)[None])
    return path, truth


def failing_while_flagged(flag: str = "") -> Any:
    """``threshold`` per tile, but tiles at x >= 600 fail while the file ``flag`` exists."""

    def model(tiles: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
        if Path(flag).exists() and (offsets[:, 0] >= 600).any():
            raise RuntimeError("flagged tile")
        return [threshold_answer(tile) for tile in tiles]

    model.class_names = ("background", "bright")  # type: ignore[attr-defined]
    return model


def message(url: Path, job_id: str, bucket: str, **extra: Any) -> dict[str, Any]:
    return {"jobId": job_id, "imageUrls": [str(url)],
            "outputs": [{"type": "S3", "bucket": bucket, "prefix": "seg"}],
            "imageProcessor": {"name": "threshold", "type": "BUILTIN"},
            "imageProcessorTileSize": 256, "imageProcessorTileOverlap": 64,
            "segmentation": {"stitch": "BLEND"}, **extra}


def s3_keys(bucket: str) -> list[str]:
    import boto3

    listing = boto3.client("s3").list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def check_outputs(bucket: str, job_id: str, truth: np.ndarray, tmp_path: Path) -> None:
    """The COG in S3 is the truth, and the polygons are the planted shapes."""
    import boto3

    s3 = boto3.client("s3")
    local = tmp_path / f"{job_id}.tif"
    s3.download_file(bucket, f"seg/{job_id}.planted.classes.tif", str(local))
    with rasterio.open(local) as src:
        assert src.crs.to_epsg() == 32617 and src.transform == TRANSFORM
        np.testing.assert_array_equal(src.read(1), truth)
    collection = json.loads(s3.get_object(Bucket=bucket, Key=f"seg/{job_id}.geojson")["Body"].read())
    polygons = [shapely.Polygon(json.loads(f["properties"]["imageGeometry"])["coordinates"][0])
                if isinstance(f["properties"]["imageGeometry"], str)
                else shapely.geometry.shape(f["properties"]["imageGeometry"])
                for f in collection["features"]]
    assert len(polygons) == len(SHAPES)
    for shape in SHAPES:
        best = max(shapely.area(shapely.intersection(p, shape)) / shapely.area(shapely.union(p, shape))
                   for p in polygons)
        assert best >= 0.99


def test_queue_worker_runs_a_segmentation_job(planted: tuple[Path, np.ndarray], queues: Any,  # noqa: F811
                                              tmp_path: Path, dask_client: Any) -> None:
    url, truth = planted
    body = json.dumps(message(url, "seg-job", queues.bucket))
    queues.sqs.send_message(QueueUrl=queues.requests, MessageBody=body)
    queues.sqs.send_message(QueueUrl=queues.requests, MessageBody=body)  # a duplicate delivery
    stats = worker(queues, dask_client, progress_seconds=0, chunk_target=448).run()
    assert (stats.received, stats.succeeded, stats.duplicates) == (2, 1, 1)
    assert counts(queues.sqs, queues.requests) == (0, 0)
    keys = s3_keys(queues.bucket)
    assert keys == ["seg/seg-job.geojson", "seg/seg-job.parquet", "seg/seg-job.planted.classes.tif",
                    "seg/seg-job.summary.json"]  # the parts under seg/seg-job.parts/ removed
    check_outputs(queues.bucket, "seg-job", truth, tmp_path)
    statuses = [m["attributes"]["status"] for m in drain(queues.sqs, queues.status)]
    assert statuses[0] == "STARTED" and "IN_PROGRESS" in statuses
    assert statuses[-2:] == ["SUCCESS", "SUCCESS"]  # the run, then the acknowledged duplicate


def test_failed_chunks_resume_from_parts_in_s3(planted: tuple[Path, np.ndarray], aws: str,
                                               tmp_path: Path, dask_client: Any,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    from pipeline.parts import ResumeError
    from pipeline.segmentation import raster

    url, truth = planted
    boto3.client("s3").create_bucket(Bucket="seg-resume")
    flag = tmp_path / "flag"
    flag.touch()
    request = ImageRequest.parse(message(url, "resumed", "seg-resume", imageProcessor={
        "type": "PYTHON", "name": "tests.test_segment_worker:failing_while_flagged"},
        imageProcessorParameters={"flag": str(flag)}))
    first = run_segmentation(request, dask_client, chunk_target=448)
    assert first.status in ("PARTIAL", "FAILED") and first.images[0].failed_tiles
    computed = first.images[0].chunks_read
    parts = [k for k in s3_keys("seg-resume") if k.startswith("seg/resumed.parts/")]
    finished = [k for k in parts if k.startswith("seg/resumed.parts/manifest/")]  # chunk records
    assert "seg/resumed.parts/manifest.json" in parts and 0 < len(finished) < computed
    flag.unlink()
    with monkeypatch.context() as patched, pytest.raises(ResumeError, match="cannot resume"):
        patched.setattr(raster, "PART_FORMAT", raster.PART_FORMAT + 1)  # parts of another format
        run_segmentation(request, dask_client, chunk_target=448, resume=True)
    second = run_segmentation(request, dask_client, chunk_target=448, resume=True)
    assert second.status == "SUCCESS", second.summary
    image = second.images[0]
    assert image.chunks_resumed == len(finished)
    assert image.chunks_read == computed - len(finished)  # only the failed chunks again
    check_outputs("seg-resume", "resumed", truth, tmp_path)
    assert not [k for k in s3_keys("seg-resume") if ".parts/" in k]
