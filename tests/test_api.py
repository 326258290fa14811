"""The Python API: open_image, detect, run, image_job, lazy_features, and the result's pictures."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from matplotlib.image import imread

import pipeline
from pipeline.api import as_model_spec, image_job, lazy_features, open_image
from pipeline.demo import match_truth, write_scene
from pipeline.models import ModelError, ModelSpec
from pipeline.plots import explore, stage_seconds, summary_chart, tile_rate
from pipeline.request import RequestError

TILE, OVERLAP = 256, 48


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return write_scene(tmp_path_factory.mktemp("scene") / "scene.tif", size=1024, count=25,
                       tile_size=TILE, overlap=OVERLAP)


def job(scene: Any, **extra: Any) -> dict[str, Any]:
    return {"jobId": "api", "imageUrls": [str(scene.path)],
            "imageProcessor": {"name": "bright-objects", "type": "BUILTIN"},
            "imageProcessorTileSize": TILE, "imageProcessorTileOverlap": OVERLAP, **extra}


def boxes_of(features: Any) -> np.ndarray:
    return np.array(features["imageBBox"].tolist(), dtype=float).reshape(-1, 4)


# ---------------------------------------------------------------------------- a Python model
def make_model(value: int = 250) -> Any:
    """A PYTHON model factory: one box around each tile's pixels equal to ``value``."""
    def model(tiles: np.ndarray, offsets: np.ndarray) -> list[dict[str, Any]]:
        out = []
        for tile in tiles:
            rows, cols = np.nonzero(tile[..., 0] == value)
            boxes = [[cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]] if len(rows) else []
            out.append({"boxes": boxes, "scores": [0.9] * len(boxes), "classes": "marker"})
        return out
    return model


# ---------------------------------------------------------------------------- open_image
def test_open_image_is_lazy_with_header_and_sensor_model(scene: Any) -> None:
    image = open_image(str(scene.path), chunks=512)
    assert image.shape == (3, 1024, 1024)
    assert image.chunks == ((3,), (512, 512), (512, 512))
    assert image.attrs["info"].width == 1024
    lon, lat = image.attrs["sensor_model"].pixel_to_lonlat(np.array([0.0]), np.array([0.0]))
    assert lon[0] == pytest.approx(-81.99237, abs=1e-5) and lat[0] == pytest.approx(29.70040, abs=1e-5)


def test_open_image_synthetic() -> None:
    pytest.importorskip("pipeline.synthetic")
    image = open_image("synthetic://3000x2000?bands=1&spacing=500&size=10", chunks=1000)
    assert image.shape == (1, 2000, 3000) and image.chunks[2] == (1000, 1000, 1000)
    assert int(image.max().compute()) == 255


# ---------------------------------------------------------------------------- detect
def test_detect_whole_image_finds_every_object(scene: Any) -> None:
    found = pipeline.detect(str(scene.path), tile_size=TILE, overlap=OVERLAP)
    assert match_truth(boxes_of(found), scene.truth) == (len(scene.truth), 0, 0)
    assert found.crs == "EPSG:4326"
    assert {"id", "imageBBox", "featureClasses", "center_longitude"} <= set(found.columns)


def test_detect_window_is_in_full_image_pixels(scene: Any) -> None:
    window = (512, 256, 1024, 768)
    found = pipeline.detect(str(scene.path), "bright-objects", window, tile_size=TILE, overlap=OVERLAP)
    b = boxes_of(found)
    assert len(b) and (b[:, 0] >= 512).all() and (b[:, 1] >= 256).all()
    assert (b[:, 2] <= 1024).all() and (b[:, 3] <= 768).all()
    t = scene.truth
    inside = t[(t[:, 0] >= 512) & (t[:, 1] >= 256) & (t[:, 2] <= 1024) & (t[:, 3] <= 768)]
    matched, duplicates, _ = match_truth(b, inside)
    assert matched == len(inside) > 0 and duplicates == 0


def test_detect_with_a_python_model_and_parameters(tmp_path: Path) -> None:
    pixels = np.zeros((1, 300, 300), np.uint8)
    pixels[0, 10:20, 30:50] = 7
    path = tmp_path / "marks.tif"
    import rasterio

    with rasterio.open(path, "w", driver="GTiff", width=300, height=300, count=1, dtype="uint8") as dst:
        dst.write(pixels)
    found = pipeline.detect(str(path), f"{__name__}:make_model", parameters={"value": 7})
    assert boxes_of(found).tolist() == [[30.0, 10.0, 50.0, 20.0]]
    assert found.crs is None  # not georeferenced: pixel coordinates
    assert found["featureClasses"][0] == [{"iri": "marker", "score": 0.9}]


def test_detect_errors_are_one_line(scene: Any) -> None:
    with pytest.raises(ModelError, match="unknown BUILTIN model 'nope'"):
        pipeline.detect(str(scene.path), "nope")
    with pytest.raises(ValueError, match="outside the 1024x1024 image"):
        pipeline.detect(str(scene.path), window=(2000, 0, 3000, 10))


def test_model_spec_forms() -> None:
    assert as_model_spec("centerpoint") == ModelSpec("BUILTIN", "centerpoint")
    assert as_model_spec("pkg.mod:make").type == "PYTHON"
    spec = as_model_spec({"name": "flood", "parameters": {"count": 3}}, {"seed": 1})
    assert (spec.type, spec.parameters) == ("BUILTIN", {"count": 3, "seed": 1})
    with pytest.raises(ValueError, match="'name'"):
        as_model_spec({"type": "BUILTIN", "model": "x"})


# ---------------------------------------------------------------------------- run
def test_run_writes_outputs_and_summary_chart(scene: Any, dask_client: Any, tmp_path: Path) -> None:
    result = pipeline.run(job(scene), client=dask_client, output_dir=tmp_path)
    assert result.status == "SUCCESS"
    assert match_truth(boxes_of(result.features), scene.truth) == (len(scene.truth), 0, 0)
    names = sorted(Path(p).name for p in result.outputs)
    assert names == ["api.geojson", "api.parquet", "api.summary.json", "api.summary.png"]
    png = imread(tmp_path / "api.summary.png")
    assert png.shape[0] == 380 and png.shape[1] == 1300  # 13 x 3.8 in at 100 dpi
    summary = json.loads((tmp_path / "api.summary.json").read_text())
    timeline = summary["timeline"]
    assert timeline["tiles"][0] == 0 and timeline["tiles"][-1] == summary["images"][0]["tiles"]
    assert timeline["seconds"] == sorted(timeline["seconds"])


def test_run_from_a_yaml_file_without_outputs(scene: Any, dask_client: Any, tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job(scene, jobId="from-yaml")))
    result = pipeline.run(path, client=dask_client)
    assert result.outputs == [] and len(result.features) == len(scene.truth)
    assert list(tmp_path.iterdir()) == [path]


def test_run_rejects_a_bad_request_in_one_line(scene: Any) -> None:
    with pytest.raises(RequestError, match="imageProcessor: unknown BUILTIN model"):
        pipeline.run(job(scene, imageProcessor={"name": "nope", "type": "BUILTIN"}))
    with pytest.raises(RequestError, match="request file not found"):
        pipeline.run("no-such-job.yaml")


# ---------------------------------------------------------------------------- lazy collections
def test_image_job_is_lazy_and_computes_the_chunks(scene: Any, dask_client: Any) -> None:
    graphs = image_job(job(scene))
    chunks = graphs[str(scene.path)]
    assert chunks.dtype == object and chunks.ndim == 2
    results = dask_client.compute(chunks).result()
    total = sum(len(r.detections) for r in results.ravel())
    tiles = sum(r.tiles for r in results.ravel())
    assert total == len(scene.truth) and tiles == 25  # 1024 px with stride 208: 5 x 5 tiles


def test_lazy_features_equal_the_job(scene: Any, dask_client: Any) -> None:
    delayed = lazy_features(job(scene, featureProperties=[{"team": "blue"}]))
    features = dask_client.compute(delayed).result()
    assert match_truth(boxes_of(features), scene.truth) == (len(scene.truth), 0, 0)
    assert set(features["team"]) == {"blue"} and features.crs == "EPSG:4326"


@pytest.fixture(scope="module")
def nitf_scene(scene: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The scene as a NITF with header fields (its features carry sourceMetadata)."""
    import rasterio.shutil

    path = tmp_path_factory.mktemp("nitf") / "scene.ntf"
    rasterio.shutil.copy(str(scene.path), str(path), driver="NITF", BLOCKXSIZE=256, BLOCKYSIZE=256,
                         FTITLE="AIRFIELD", ICAT="VIS", IDATIM="19961217102630")
    return path


def plain(value: Any) -> Any:
    """``value`` as plain Python (a GeoParquet round trip gives arrays for lists; NaN → None)."""
    if isinstance(value, (np.ndarray, list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, float) and np.isnan(value):
        return None
    return value.item() if isinstance(value, np.generic) else value


def test_lazy_features_equal_runs_with_source_metadata_and_failed_tiles(
        scene: Any, nitf_scene: Path, dask_client: Any) -> None:
    """One reduction: lazy_features gives run's features (every column, sourceMetadata
    included) and lists the tiles that failed (the tiles at x = 416, as the model refuses)."""
    request = job(scene, imageUrls=[str(nitf_scene), str(scene.path)],
                  imageProcessor={"name": "tests.flaky_model:make", "type": "PYTHON"},
                  imageProcessorParameters={"fail_x": 416}, featureProperties=[{"team": "blue"}])
    ran = pipeline.run(request, client=dask_client)
    lazy = dask_client.compute(lazy_features(request)).result()
    assert ran.status == "PARTIAL" and len(lazy) == len(ran.features) > 0
    assert list(lazy.columns) == list(ran.features.columns)
    assert "sourceMetadata" in lazy.columns and lazy.crs == ran.features.crs
    by_id = ran.features.set_index("id")
    for _, row in lazy.iterrows():
        other = by_id.loc[row["id"]]
        assert row["geometry"].equals(other["geometry"])
        for column in lazy.columns.drop(["id", "geometry", "inferenceMetadata"]):
            assert plain(row[column]) == plain(other[column]), column
    meta = [m for m in lazy["sourceMetadata"] if isinstance(m, dict)]
    assert len(meta) == len(lazy[lazy["image_url"] == str(nitf_scene)]) > 0
    assert {(m["fileTitle"], m["imageCategory"], m["sourceDT"]) for m in meta} == {
        ("AIRFIELD", "VIS", "1996-12-17T10:26:30+00:00")}
    ran_failed = [(image["url"], t["window"], t["reason"]) for image in ran.summary["images"]
                  for t in image["failedTiles"]]
    lazy_failed = [(t["url"], t["window"], t["reason"]) for t in lazy.attrs["failedTiles"]]
    assert sorted(lazy_failed) == sorted(ran_failed)
    # 1024 px, tiles of 256 every 208 px: 5 rows of tiles at x = 416 in each image
    assert len(lazy_failed) == 10 and {w[0] for _, w, _ in lazy_failed} == {416}
    assert {r for *_, r in lazy_failed} == {"RuntimeError: tile at x=416 refused"}


def test_run_plans_several_images_on_the_cluster_and_one_here(scene: Any, nitf_scene: Path,
                                                               dask_client: Any) -> None:
    from distributed import get_task_stream

    for urls, on_cluster in (([str(scene.path)], 0), ([str(scene.path), str(nitf_scene)], 2)):
        with get_task_stream(dask_client) as stream:
            result = pipeline.run(job(scene, imageUrls=urls), client=dask_client)
        plans = [t for t in stream.data if str(t["key"]).startswith("plan-")]
        assert len(plans) == on_cluster and result.status == "SUCCESS"
        assert len(result.features) == len(urls) * len(scene.truth)
        assert [image["url"] for image in result.summary["images"]] == urls  # request order


def test_lazy_features_plan_each_image_once(scene: Any, nitf_scene: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    module = importlib.import_module("graphs.image_job")  # graphs.image_job is also a function
    planned: list[str] = []
    real = module.plan_image

    def counting(request: Any, url: str, *args: Any, **kwargs: Any) -> Any:
        planned.append(url)
        return real(request, url, *args, **kwargs)

    monkeypatch.setattr(module, "plan_image", counting)
    lazy_features(job(scene, imageUrls=[str(scene.path), str(nitf_scene)]))
    assert sorted(planned) == sorted([str(scene.path), str(nitf_scene)])


# ---------------------------------------------------------------------------- pictures
def test_plot_and_summary_figure(scene: Any, dask_client: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    result = pipeline.run(job(scene), client=dask_client)
    ax = result.plot(truth=scene.truth)
    assert ax.get_title() == f"scene.tif: {len(scene.truth)} features"
    drawn = {c.get_label(): len(c.get_paths()) for c in ax.collections}
    assert drawn == {f"truth ({len(scene.truth)})": len(scene.truth),
                     f"bright-object ({len(scene.truth)})": len(scene.truth)}
    fig = result.plot_summary()
    titles = [a.get_title() for a in fig.axes]
    assert titles[2] == f"features per class ({len(scene.truth)})"
    assert result.summary["classes"] == {"bright-object": len(scene.truth)}
    assert result.summary["images"][0]["classes"] == {"bright-object": len(scene.truth)}
    assert titles[1].startswith("tiles/s over time (25 tiles)")


def test_stage_seconds_and_tile_rate() -> None:
    summary = {
        "images": [{"seconds": {"plan": 0.5, "model": 4.0}}, {"seconds": {"model": 2.0, "merge": 1.0}}],
        "seconds": {"total": 5.0, "write": 0.25, "workers": {"read": 3.0, "encode": 0.5, "model": 6.0}},
        "timeline": {"seconds": [0.0, 1.0, 2.0, 4.0], "tiles": [0, 10, 30, 30]},
    }
    assert stage_seconds(summary) == {"plan": 0.5, "read": 3.0, "encode": 0.5, "model": 6.0, "merge": 1.0,
                                      "write": 0.25, "total": 5.0}
    assert list(stage_seconds(summary)) == ["plan", "read", "encode", "model", "merge", "write", "total"]
    edges, rate = tile_rate(summary, bins=4)
    assert edges.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert rate.tolist() == [10.0, 20.0, 0.0, 0.0]
    fig = summary_chart({"jobId": "x", "status": "SUCCESS", "images": []})
    assert "no timeline" in fig.axes[1].texts[0].get_text()


def test_explore_map(scene: Any) -> None:
    pytest.importorskip("folium")
    pytest.importorskip("mapclassify")
    found = pipeline.detect(str(scene.path), tile_size=TILE, overlap=OVERLAP)
    html = explore(found).get_root().render()
    assert found["id"].iloc[0] in html and "bright-object" in html


def test_explore_refuses_pixel_features_and_missing_folium(monkeypatch: pytest.MonkeyPatch) -> None:
    import geopandas as gpd

    pixels = gpd.GeoDataFrame({"featureClasses": []}, geometry=gpd.GeoSeries([]))
    with pytest.raises(ValueError, match="pixel coordinates"):
        explore(pixels)
    monkeypatch.setitem(sys.modules, "folium", None)
    with pytest.raises(ImportError, match="explore\\(\\) needs folium: pip install folium mapclassify"):
        explore(pixels)


def test_run_without_a_client_runs_a_small_job_in_this_process(scene: Any, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="graphs.cluster")
    result = pipeline.run(job(scene), output_dir=tmp_path)  # one image of at most 4096², as the CLI's
    assert result.status == "SUCCESS"
    assert match_truth(boxes_of(result.features), scene.truth) == (len(scene.truth), 0, 0)
    started = [r.getMessage() for r in caplog.records if r.getMessage().startswith("LocalCluster")]
    assert len(started) == 1 and "threads in this process" in started[0], started
