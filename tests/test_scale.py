"""Scale: the synthetic image source, planning a 200k × 200k job, and the streaming merge
(per-chunk settle + border pass) giving exactly the result of one global merge."""

from __future__ import annotations

import json

import dask
import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import pytest

from graphs.image_job import chunk_results, model_spec, plan_image, run_job
from pipeline import synthetic
from pipeline.detections import Detections
from pipeline.merge import distill
from pipeline.reading import ImageError
from pipeline.request import ImageRequest

URL = "synthetic://2600x2100?spacing=160&size=12&seed=3"


def _request(url: str, out, model: str = "bright-objects", params: dict | None = None,
             post: list | None = None, **extra) -> ImageRequest:
    data = {
        "jobId": "scale",
        "imageUrls": [url],
        "outputs": [{"type": "LOCAL", "path": str(out)}],
        "imageProcessor": {"name": model, "type": "BUILTIN"},
        "imageProcessorParameters": params or {},
        "imageProcessorTileSize": 256,
        "imageProcessorTileOverlap": 40,
        **extra,
    }
    if post is not None:
        data["postProcessing"] = post
    return ImageRequest.parse(data)


def _box_set(boxes) -> set[tuple[int, ...]]:
    return {tuple(int(v) for v in b) for b in np.asarray(list(boxes), dtype=np.float64).reshape(-1, 4)}


# ---------------------------------------------------------------- synthetic source
def test_synthetic_header_pixels_and_truth_agree() -> None:
    info = synthetic.describe(URL)
    assert (info.width, info.height, info.bands, info.dtype) == (2600, 2100, 3, "uint8")
    assert info.transform == (1e-5, 0.0, 10.0, 0.0, -1e-5, 50.0)
    image = synthetic.open_image(URL, chunks=1000)
    assert image.shape == (3, 2100, 2600) and image.data.chunks[1] == (1000, 1000, 100)
    pixels = image.data.compute()
    truth = synthetic.truth(URL)
    # one 12 px object per 160 px cell (every whole cell, some edge cells), inside the image
    cells = {(x // 160, y // 160) for x, y in truth[:, :2].tolist()}
    assert len(cells) == len(truth) and 16 * 13 <= len(truth) <= 17 * 14
    assert (truth[:, 2:] - truth[:, :2] == 12).all() and (truth[:, 2:] <= [2600, 2100]).all()
    assert (pixels == 255).sum() == len(truth) * 144 * 3
    for x0, y0, x1, y1 in truth[:5]:
        assert (pixels[:, y0:y1, x0:x1] == 255).all()
    # any window renders the same pixels as the whole image, wherever chunks fall
    window = (777, 333, 1911, 1500)
    part = synthetic.SyntheticImage.parse(URL).render(window)
    np.testing.assert_array_equal(part, pixels[:, 333:1500, 777:1911])


def test_synthetic_url_errors_are_one_line() -> None:
    for url, words in [("synthetic://abc", "WIDTHxHEIGHT"), ("synthetic://10x10?bogus=1", "bogus"),
                       ("synthetic://10x10?size=20&spacing=10", "size < spacing"),
                       ("synthetic://10x10?dtype=nope", "dtype")]:
        with pytest.raises(ImageError) as err:
            synthetic.describe(url)
        assert words in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- planning at scale
def test_planning_200k_square_job_reads_no_pixels(tmp_path) -> None:
    url = "synthetic://200000x200000"
    request = ImageRequest.parse({
        "jobId": "big", "imageUrls": [url], "outputs": [{"type": "LOCAL", "path": str(tmp_path)}],
        "imageProcessor": {"name": "null", "type": "BUILTIN"},
    })
    plan = plan_image(request, url)
    grid = plan.grid
    assert (grid.tiles_x, grid.tiles_y) == (206, 206) and grid.n_tiles == 42436
    # 206 tiles, 4 to a chunk: 51 chunks, the last one taking the 2 tiles left over
    assert grid.chunk == 3896 and (grid.chunks_x, grid.chunks_y) == (51, 51)
    results = chunk_results(plan, request, model_spec(request))
    assert results.shape == (51, 51)
    delayed = results.to_delayed()
    assert delayed.shape == (51, 51)
    graph = dict(dask.base.collections_to_expr([results]).__dask_graph__()) if hasattr(
        dask.base, "collections_to_expr") else dict(results.__dask_graph__())
    detect_tasks = [k for k in graph if isinstance(k, tuple) and str(k[0]).startswith("detect-")]
    assert len(detect_tasks) == 51 * 51


# ---------------------------------------------------------------- streaming merge
def test_streamed_job_finds_exactly_the_synthetic_objects(tmp_path, dask_client) -> None:
    result = run_job(_request(URL, tmp_path), dask_client, chunk_target=500)
    truth = synthetic.truth(URL)
    assert result.status == "SUCCESS"
    assert result.summary["features"] == len(truth) == len(result.features)
    assert _box_set(result.features["imageBBox"]) == _box_set(truth)
    assert result.summary["chunks"] == {"computed": 6 * 5, "resumed": 0}
    assert set(result.summary["seconds"]["stages"]) >= {"plan", "model", "merge", "geolocate", "write"}
    workers = result.summary["seconds"]["workers"]
    assert set(workers) == {"read", "encode", "model"}
    assert workers["model"] > 0 and workers["read"] > 0
    # the parquet was assembled from per-chunk parts: many row groups, one geo bbox for all
    parquet = pq.ParquetFile(tmp_path / "scale.parquet")
    assert parquet.metadata.num_rows == len(truth) and parquet.metadata.num_row_groups > 10
    bbox = json.loads(parquet.schema_arrow.metadata[b"geo"])["columns"]["geometry"]["bbox"]
    bounds = gpd.read_parquet(tmp_path / "scale.parquet").total_bounds
    np.testing.assert_allclose(bbox, bounds)
    collection = json.loads((tmp_path / "scale.geojson").read_text())
    assert len(collection["features"]) == len(truth)
    assert {f["id"] for f in collection["features"]} == set(result.features["id"])
    assert not (tmp_path / "scale.parts").exists()  # parts are removed after a success


def _global_merge(request: ImageRequest, client, chunk_target: int) -> Detections:
    """The reference: every chunk's detections gathered, then one merge over all of them."""
    plan = plan_image(request, request.image_urls[0], chunk_target)
    chunks = client.compute(chunk_results(plan, request, model_spec(request))).result()
    return distill(Detections.concat(c.detections for c in chunks.ravel()), request.distillation)


@pytest.mark.parametrize("post", [
    [{"step": "FEATURE_DISTILLATION", "algorithm": {"algorithmType": "NMS", "iouThreshold": 0.05}}],
    [{"step": "FEATURE_DISTILLATION",
      "algorithm": {"algorithmType": "SOFT_NMS", "sigma": 0.2, "skipBoxThreshold": 0.3}}],
])
def test_streaming_merge_equals_one_global_merge(tmp_path, dask_client, post) -> None:
    # flood: 40 random overlapping 52 px boxes per 256 px tile, so suppression chains cross
    # chunk borders; the streamed result must be the global merge, box for box and score
    request = _request("synthetic://1500x1300?spacing=0", tmp_path, "flood",
                       {"count": 40, "seed": 5}, post)
    reference = _global_merge(request, dask_client, 400)
    result = run_job(request, dask_client, chunk_target=400, collect_features=True)
    image = result.summary["images"][0]
    assert image["detections"]["afterMerge"] == len(reference) == len(result.features)
    assert image["detections"]["afterMerge"] < image["detections"]["beforeMerge"]
    got = sorted((tuple(np.round(b, 6)), round(c[0]["score"], 9))
                 for b, c in zip(result.features["imageBBox"], result.features["featureClasses"]))
    want = sorted((tuple(np.round(b, 6)), round(float(s), 9))
                  for b, s in zip(reference.boxes, reference.scores))
    assert got == want


def test_without_collect_features_the_result_frame_is_empty(tmp_path, dask_client) -> None:
    result = run_job(_request(URL, tmp_path), dask_client, chunk_target=500, collect_features=False)
    assert len(result.features) == 0 and result.summary["features"] == len(synthetic.truth(URL))
    written = gpd.read_parquet(tmp_path / "scale.parquet")
    assert len(written) == result.summary["features"]
    # the per-class counts are kept as chunks are written, so the summary has them anyway
    classes = written["featureClasses"].map(lambda c: c[0]["iri"]).value_counts().to_dict()
    assert result.summary["classes"] == classes and sum(classes.values()) == len(written)


def test_vectorised_nms_equals_the_sequential_greedy_pass(monkeypatch) -> None:
    import pipeline.merge as merge

    def sequential(boxes, scores, threshold):
        i, j, iou = merge.overlapping_pairs(boxes)
        above = iou > threshold
        table = merge._neighbours(len(boxes), i[above], j[above], iou[above])
        suppressed, keep = np.zeros(len(boxes), dtype=bool), []
        # descending score, equal scores by the box (xmin, ymin, xmax, ymax), then by index
        by_box = (np.arange(len(scores)), *boxes[:, ::-1].T, -scores)
        for k in np.lexsort(by_box).tolist():
            if not suppressed[k]:
                keep.append(k)
                for other, _ in table[k]:
                    suppressed[other] = True
        return np.sort(np.array(keep, dtype=np.int64))

    rng = np.random.default_rng(7)
    for trial in range(120):
        n = int(rng.integers(1, 250))
        corner = rng.uniform(0, rng.uniform(20, 300), (n, 2))
        boxes = np.concatenate([corner, corner + rng.uniform(1, 50, (n, 2))], axis=1)
        scores = rng.choice([0.5, 0.7, 0.9], n) if trial % 2 else rng.uniform(0, 1, n)  # ties too
        threshold = float(rng.choice([0.0, 0.1, 0.5, 0.75]))
        for rounds in (64, 1, 0):  # 0 and 1: the sequential finish does (most of) the work
            monkeypatch.setattr(merge, "_NMS_ROUNDS", rounds)
            np.testing.assert_array_equal(merge.nms_indices(boxes, scores, threshold),
                                          sequential(boxes, scores, threshold))
    # a long chain of overlapping boxes, each a little weaker than the one before
    x = np.arange(3000, dtype=np.float64)
    chain = np.stack([x, np.zeros_like(x), x + 10, np.full_like(x, 10)], axis=1)
    monkeypatch.setattr(merge, "_NMS_ROUNDS", 64)
    np.testing.assert_array_equal(merge.nms_indices(chain, np.linspace(1, 0, 3000), 0.5),
                                  sequential(chain, np.linspace(1, 0, 3000), 0.5))


# ---------------------------------------------------------------- one per-chunk read path
def _graph(results) -> dict:
    return dict(dask.base.collections_to_expr([results]).__dask_graph__()) if hasattr(
        dask.base, "collections_to_expr") else dict(results.__dask_graph__())


def test_synthetic_and_file_images_share_the_per_chunk_path(tmp_path) -> None:
    """No map_overlap, no halo exchange: the graph is one layout block and one read+detect
    task per chunk, for generated pixels as for a file; each task holds its window alone."""
    import rasterio

    file = tmp_path / "scene.tif"
    with rasterio.open(file, "w", driver="GTiff", width=1300, height=1000, count=3, dtype="uint8",
                       tiled=True, blockxsize=256, blockysize=256) as dst:
        dst.write(synthetic.SyntheticImage.parse("synthetic://1300x1000?spacing=160&seed=3")
                  .render((0, 0, 1300, 1000)))
    for url in ("synthetic://1300x1000?spacing=160&seed=3", str(file)):
        request = _request(url, tmp_path)
        plan = plan_image(request, url, chunk_target=500)
        results = chunk_results(plan, request, model_spec(request))
        graph = _graph(results)
        names = {str(k[0] if isinstance(k, tuple) else k).rsplit("-", 1)[0] for k in graph}
        # task names drop a URL's query (a presigned one would carry secrets)
        assert names <= {"zeros", "zeros_like", "detect-" + url.split("?")[0].rsplit("/", 1)[-1]}, names
        detect = [k for k in graph if str(k[0]).startswith("detect-")]
        assert len(detect) == plan.grid.chunks_x * plan.grid.chunks_y == 3 * 2
        assert len(graph) <= 2 * len(detect)  # at most a layout block beside each chunk task


def test_synthetic_windows_are_band_last_and_equal_to_the_whole_image() -> None:
    source = synthetic.SyntheticSource(URL)
    window = (400, 300, 1400, 900)
    pixels = source.read(window)
    whole = synthetic.SyntheticImage.parse(URL).render((0, 0, 2600, 2100))
    assert pixels.shape == (3, 600, 1000) and np.moveaxis(pixels, 0, -1).flags.c_contiguous
    np.testing.assert_array_equal(pixels, whole[:, 300:900, 400:1400])


def test_file_reads_are_band_last_cached_and_see_a_replaced_file(tmp_path) -> None:
    import os

    import rasterio

    from pipeline.reading import RasterSource, read_options

    path = tmp_path / "image.tif"

    def write(offset: int) -> np.ndarray:
        pixels = (np.arange(3 * 300 * 400, dtype=np.uint32).reshape(3, 300, 400) % 251 + offset)
        staged = tmp_path / "staged.tif"
        with rasterio.open(staged, "w", driver="GTiff", width=400, height=300, count=3,
                           dtype="uint8", tiled=True, blockxsize=128, blockysize=128) as dst:
            dst.write(pixels.astype(np.uint8))
        os.replace(staged, path)  # a new file under the same name
        return pixels.astype(np.uint8)

    first = write(0)
    source = RasterSource(str(path), (3, 300, 400), np.dtype("uint8"), read_options(str(path)))
    window = source.read((50, 20, 350, 280))
    assert window.shape == (3, 260, 300) and np.moveaxis(window, 0, -1).flags.c_contiguous
    np.testing.assert_array_equal(window, first[:, 20:280, 50:350])
    np.testing.assert_array_equal(source[:, 0:10, 0:10], first[:, :10, :10])
    second = write(3)
    np.testing.assert_array_equal(source.read((0, 0, 400, 300)), second)


def test_workers_cap_gdal_block_cache(tmp_path, dask_client) -> None:
    """A worker that reads a window runs with GDAL's block cache capped (GDAL's default is
    5% of RAM per process, which grows every worker by the blocks of a big image)."""
    import os

    import rasterio

    from pipeline.reading import BLOCK_CACHE_BYTES, RasterSource, read_options

    if "GDAL_CACHEMAX" in os.environ:
        pytest.skip("GDAL_CACHEMAX is set by the environment")
    path = tmp_path / "small.tif"
    with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=1, dtype="uint8") as dst:
        dst.write(np.full((1, 64, 64), 7, dtype=np.uint8))
    source = RasterSource(str(path), (1, 64, 64), np.dtype("uint8"), read_options(str(path)))

    def read_then_cache_max() -> tuple[int, int]:
        from rasterio.env import get_gdal_config

        pixels = source.read((0, 0, 8, 8))
        return int(pixels.sum()), int(get_gdal_config("GDAL_CACHEMAX"))

    assert set(dask_client.run(read_then_cache_max).values()) == {(7 * 64, BLOCK_CACHE_BYTES)}
