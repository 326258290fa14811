"""Every sample NITF that GDAL can read, end to end in one job on a real cluster: encodings,
bit depths, multi-segment files, sensor models, footprints, metadata; unreadable files fail
alone with one line."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import shapely

from graphs.image_job import image_urls, run_job
from pipeline.nitf import source_metadata
from pipeline.range_stats import dynamic_range, range_adjustment, sample_pixels
from pipeline.reading import describe
from pipeline.request import ImageRequest
from tests.conftest import shared_file

READABLE = [
    "jitc/i_3001a.ntf", "jitc/U_1001A.NTF", "jitc/i_3405a.ntf", "jitc/i_3430a.ntf",
    "jitc/005_007_1024x1024_s_8_1_multi_j2c.ntf", "jitc/ns3361c.nsf", "jitc/i_3004g.ntf",
    "jitc/ns3004f.nsf", "jitc/i_3309a.ntf", "jitc/ns3010a.nsf", "jitc/ns3301j.nsf",
    "rpc/geocal_qb02_rpc.ntf",
]
UNREADABLE = ["jitc/p0_02a.ntf", "jitc/GHSarNITF21_good.ntf"]


@pytest.fixture(scope="module")
def job(tmp_path_factory, dask_client):
    paths = {name: str(shared_file(f"nitf/{name}")) for name in READABLE + UNREADABLE}
    request = ImageRequest.parse({
        "jobId": "nitf-all",
        "imageUrls": list(paths.values()),
        "outputs": [{"type": "LOCAL", "path": str(tmp_path_factory.mktemp("nitf-out"))}],
        "imageProcessor": {"name": "centerpoint", "type": "BUILTIN"},
        "imageProcessorTileSize": 512,
        "imageProcessorTileOverlap": 32,
        "postProcessing": [],
    })
    result = run_job(request, dask_client)
    images = {image["url"]: image for image in result.summary["images"]}
    return paths, result, images


def test_every_readable_nitf_runs_and_unreadable_ones_fail_alone(job) -> None:
    paths, result, images = job
    assert result.status == "PARTIAL"
    assert len(images) == len(READABLE) - 1 + 4 + len(UNREADABLE)  # ns3361c → 4 segments
    for name in READABLE:
        if name.endswith("ns3361c.nsf"):
            continue
        image = images[paths[name]]
        assert image["status"] == "SUCCESS", (name, image["reason"])
        assert image["tiles"] >= 1 and image["failedTiles"] == []
        if min(image["width"], image["height"]) >= 512:  # centerpoint's box lies inside the image
            assert 1 <= image["detections"]["afterMerge"] <= image["tiles"]
    p0, ghsar = images[paths["jitc/p0_02a.ntf"]], images[paths["jitc/GHSarNITF21_good.ntf"]]
    assert p0["status"] == ghsar["status"] == "FAILED"
    assert p0["reason"].startswith(f"cannot open image {paths['jitc/p0_02a.ntf']}: Unable to open JPEG2000")
    assert ghsar["reason"].startswith(f"cannot read pixels of {paths['jitc/GHSarNITF21_good.ntf']}: ")
    assert "\n" not in p0["reason"] + ghsar["reason"]
    urls = set(result.features["image_url"])
    assert paths["jitc/p0_02a.ntf"] not in urls and paths["jitc/i_3309a.ntf"] in urls


def test_multi_segment_nitf_gives_one_image_per_segment_with_its_own_georeferencing(job) -> None:
    paths, result, images = job
    path = paths["jitc/ns3361c.nsf"]
    segments = [f"NITF_IM:{k}:{path}" for k in range(4)]
    request = ImageRequest.parse({"jobId": "x", "imageUrls": [path], "imageProcessor": {"name": "null"}})
    assert image_urls(request) == segments
    bounds = set()
    for k, url in enumerate(segments):
        image = images[url]
        assert image["status"] == "SUCCESS" and (image["width"], image["height"]) == (256, 256)
        assert image["sensorModel"] == "AFFINE"
        bounds.add(tuple(round(v, 3) for v in shapely.geometry.shape(image["footprint"]).bounds))
        rows = result.features[result.features["image_url"] == url]
        assert len(rows) == 1 and set(rows["imageSegment"]) == {k}
        meta = rows["sourceMetadata"].iloc[0]
        assert meta["imageId"] == "GRT BOSTON" and meta["fileFormat"] == "NSIF01.00"
    assert len(bounds) == 4  # each segment has its own IGEOLO
    union = shapely.union_all([shapely.geometry.shape(images[u]["footprint"]) for u in segments])
    assert union.bounds == pytest.approx((-71.167, 41.95, -70.933, 42.451), abs=0.01)


def test_deep_images_get_one_dra_per_image_recorded_in_the_summary(job) -> None:
    paths, _, images = job
    for name, bits in (("jitc/i_3405a.ntf", 11), ("jitc/i_3430a.ntf", 12)):
        adjustment = images[paths[name]]["rangeAdjustment"]
        assert adjustment["type"] == "DRA" and adjustment["requested"] is None
        with rasterio.open(paths[name]) as src:
            pixels = src.read(1).astype(float)
        assert pixels.max() < 2**bits
        assert adjustment["low"] == pytest.approx([np.percentile(pixels, 2)])
        assert adjustment["high"] == pytest.approx([np.percentile(pixels, 98)])
        assert adjustment["sample"] == "full" and adjustment["samplePixels"] == pixels.size
    assert images[paths["jitc/i_3001a.ntf"]]["rangeAdjustment"]["type"] == "NONE"


def test_sensor_model_choice_and_footprints_are_valid_rfc7946(job) -> None:
    paths, _, images = job
    kinds = {name: images[paths[name]]["sensorModel"] for name in READABLE if "ns3361c" not in name}
    assert kinds["rpc/geocal_qb02_rpc.ntf"] == "RPC"  # RPC00B wins over the IGEOLO GCPs
    assert kinds["jitc/i_3001a.ntf"] == kinds["jitc/U_1001A.NTF"] == "AFFINE"
    assert kinds["jitc/i_3309a.ntf"] == kinds["jitc/i_3405a.ntf"] == "PIXEL"
    assert "footprint" not in images[paths["jitc/i_3309a.ntf"]]
    crossing = shapely.geometry.shape(images[paths["jitc/i_3004g.ntf"]]["footprint"])
    assert crossing.geom_type == "MultiPolygon" and crossing.is_valid  # split at ±180
    assert crossing.bounds == pytest.approx((-180, -20.04, 180, 20.04), abs=0.01)
    assert crossing.area == pytest.approx(40.08 * 39.37, rel=0.01)  # 40° of latitude, ~39° of longitude
    origin = shapely.geometry.shape(images[paths["jitc/ns3004f.nsf"]]["footprint"])
    assert origin.geom_type == "Polygon" and origin.is_valid and origin.contains(shapely.Point(0, 0))
    for geometry in (crossing, origin):
        for polygon in shapely.get_parts(geometry):
            assert shapely.is_ccw(polygon.exterior)


def test_features_carry_nitf_source_metadata(job) -> None:
    paths, result, _ = job
    rows = result.features[result.features["image_url"] == paths["jitc/i_3001a.ntf"]]
    meta = rows["sourceMetadata"].iloc[0]
    assert meta["sourceDT"] == "1996-12-17T10:26:30+00:00"
    assert meta["imageTitle"] == "- BASE IMAGE -" and meta["originatingStation"] == "i_3001a"
    assert meta["imageId"] is None  # "Missing ID" is a placeholder
    info = describe(str(shared_file("jitc/GHSarNITF21_good.ntf".join(["nitf/", ""]))))
    assert set(source_metadata(info.tags, info.driver)["tres"].split(",")) >= {"ACFTB", "AIMIDB", "BLOCKA"}


def test_range_adjustment_choices_and_sampling_of_large_images() -> None:
    path = str(shared_file("nitf/jitc/i_3405a.ntf"))
    info = describe(path)
    assert range_adjustment("MINMAX", info)["type"] == "MINMAX"
    assert range_adjustment("NONE", info) == {"type": "NONE", "requested": "NONE"}
    samples, how = sample_pixels(path, info, target=200_000)  # 1M pixels > target: sparse blocks
    assert how == "blocks" and 100_000 <= samples.shape[1] <= 300_000
    low, high = dynamic_range(samples)
    with rasterio.open(path) as src:
        full_low, full_high = np.percentile(src.read(1), [2, 98])
    assert abs(low[0] - full_low) < 0.1 * (full_high - full_low)
    assert abs(high[0] - full_high) < 0.1 * (full_high - full_low)
