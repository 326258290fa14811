"""The ONNX example of the PYTHON target: PP-OCRv4's DBNet text detector (weights from the
rapidocr-onnxruntime wheel) on a real NEON airborne scene with text rendered into it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from PIL import Image, ImageDraw, ImageFont
from pyproj import Transformer

import pipeline
from pipeline.models import ModelError, ModelSpec, check_model, load_model
from tests.conftest import shared_file


def installed(*modules: str) -> bool:
    try:
        return all(importlib.util.find_spec(m) is not None for m in modules)
    except ImportError:
        return False


HAVE_ONNX = installed("onnxruntime", "rapidocr_onnxruntime")
needs_onnx = pytest.mark.skipif(
    not HAVE_ONNX, reason="needs the onnx extra: pip install 'dask-model-runner[onnx]'"
)
if HAVE_ONNX:
    from pipeline.models.onnx import TextDetector, load_weights, providers

SCENE = "geotiff/neon_OSBS_029.tif"  # 400 x 400 RGB, 0.1 m, EPSG:32617
LABELS = [(20, 30, "RUNWAY 27"), (180, 200, "HANGAR B"), (60, 330, "GATE 14")]
MODEL = "pipeline.models.onnx:TextDetector"


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``n × 4`` and ``m × 4`` boxes."""
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """The real scene with three white, black-outlined labels: (GeoTIFF path, pixels, text boxes)."""
    source = shared_file(SCENE)
    with rasterio.open(source) as src:
        profile = src.profile
        image = Image.fromarray(src.read().transpose(1, 2, 0))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=28)
    truth = []
    for x, y, text in LABELS:
        draw.text((x, y), text, font=font, fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))
        truth.append(draw.textbbox((x, y), text, font=font, stroke_width=2))
    pixels = np.asarray(image)
    path = tmp_path_factory.mktemp("onnx") / "labelled.tif"
    profile.update(nodata=None)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels.transpose(2, 0, 1))
    return path, pixels, np.array(truth, float)


@pytest.fixture(scope="module")
def detector() -> Any:
    return TextDetector(threads=1)


@needs_onnx
def test_weights_come_from_the_wheel_and_run_on_cpu(detector: Any) -> None:
    assert detector.providers[0] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert providers("cpu") == ["CPUExecutionProvider"]
    assert detector.session.get_inputs()[0].shape[1] == 3  # DBNet: N x 3 x H x W
    assert len(load_weights()) > 1_000_000  # the PP-OCRv4 detector, about 4.7 MB
    with pytest.raises(RuntimeError, match=r"no_such_package/.*pip install 'dask-model-runner\[onnx\]'"):
        load_weights("no_such_package")


@needs_onnx
def test_boxes_land_on_the_text(scene: Any, detector: Any) -> None:
    _, pixels, truth = scene
    (found,) = detector(pixels[None], np.zeros((1, 2)))
    boxes = np.asarray(found["boxes"])
    assert len(boxes) == len(truth)
    overlap = iou(boxes, truth)
    assert (overlap.max(axis=1) > 0.5).all() and sorted(overlap.argmax(axis=1)) == [0, 1, 2]
    assert (np.asarray(found["scores"]) > 0.8).all() and found["classes"] == "text"


@needs_onnx
def test_no_text_in_the_untouched_scene(detector: Any) -> None:
    with rasterio.open(shared_file(SCENE)) as src:
        pixels = src.read().transpose(1, 2, 0)
    (found,) = detector(pixels[None], np.zeros((1, 2)))
    assert len(found["boxes"]) == 0


@needs_onnx
def test_batch_gives_the_same_boxes_as_one_by_one(scene: Any, detector: Any) -> None:
    """Eight 256-pixel tiles (grey and RGB bands, one blank) in one call vs one call each."""
    _, pixels, _ = scene
    corners = [(0, 0), (144, 0), (0, 144), (144, 144), (60, 120), (10, 140), (100, 100), (0, 0)]
    tiles = np.stack([pixels[y : y + 256, x : x + 256] for x, y in corners])
    tiles[7] = 0
    offsets = np.array(corners, float)
    batched = detector(tiles, offsets)
    single = [detector(tiles[k : k + 1], offsets[k : k + 1])[0] for k in range(len(tiles))]
    assert [len(b["boxes"]) for b in batched] == [len(s["boxes"]) for s in single]
    assert sum(len(b["boxes"]) for b in batched) >= 6 and len(batched[7]["boxes"]) == 0
    for b, s in zip(batched, single, strict=True):
        np.testing.assert_allclose(b["boxes"], s["boxes"], atol=1.0)
    grey = detector(tiles[:1, ..., :1], offsets[:1])[0]  # one band is repeated to three
    assert len(grey["boxes"]) == len(batched[0]["boxes"]) > 0


@needs_onnx
def test_scale_returns_boxes_in_tile_pixels(scene: Any) -> None:
    _, pixels, truth = scene
    (found,) = TextDetector(scale=1.5, threads=1)(pixels[None], np.zeros((1, 2)))
    overlap = iou(np.asarray(found["boxes"]), truth)
    assert len(found["boxes"]) == 3 and (overlap.max(axis=1) > 0.5).all()


@needs_onnx
def test_through_the_python_adapter_with_parameters() -> None:
    spec = ModelSpec("PYTHON", MODEL, {"batchSize": 4, "threshold": 0.4, "className": "label", "threads": 1})
    check_model(spec)
    adapter = load_model(spec)
    assert adapter.resources == {}
    (found,) = adapter.predict(np.zeros((1, 64, 64, 3), np.uint8), np.zeros((1, 2)))
    assert len(found) == 0
    with pytest.raises(ValueError, match="device must be auto, cpu or cuda"):
        TextDetector(device="tpu")


@needs_onnx
def test_full_job_geolocates_the_text(scene: Any, dask_client: Any, tmp_path: Path) -> None:
    """256-pixel tiles with 192 overlap: every label whole in some tile, owned once, geolocated."""
    path, _, truth = scene
    request = {
        "jobId": "onnx-text", "imageUrls": [str(path)],
        "imageProcessor": {"type": "PYTHON", "name": MODEL},
        "imageProcessorParameters": {"batchSize": 8, "threads": 1},
        "imageProcessorTileSize": 256, "imageProcessorTileOverlap": 192,
    }
    result = pipeline.run(request, client=dask_client, output_dir=tmp_path)
    assert result.status == "SUCCESS"
    features = result.features
    assert len(features) == len(truth)
    boxes = np.array(features["imageBBox"].tolist(), float)
    assert (iou(boxes, truth).max(axis=1) > 0.5).all()
    assert all(fc[0]["iri"] == "text" for fc in features["featureClasses"])
    # centres in map coordinates: the box centre through the file's transform, within 1 m
    with rasterio.open(path) as src:
        transform, crs = src.transform, src.crs
    to_utm = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    lon, lat = features["center_longitude"].to_numpy(), features["center_latitude"].to_numpy()
    east, north = to_utm.transform(lon, lat)
    expected = np.array([transform * ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in boxes])
    assert np.hypot(east - expected[:, 0], north - expected[:, 1]).max() < 1.0
    truth_east, truth_north = transform * ((truth[:, 0] + truth[:, 2]) / 2, (truth[:, 1] + truth[:, 3]) / 2)
    nearest = np.hypot(east[:, None] - truth_east[None], north[:, None] - truth_north[None]).min(axis=1)
    assert nearest.max() < 1.5  # 15 pixels at 0.1 m
    assert sorted(Path(p).name for p in result.outputs)[0] == "onnx-text.geojson"


def test_without_onnxruntime_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs with or without the extra: the request fails in the client with one line."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import` sees when it is absent
    monkeypatch.delitem(sys.modules, "pipeline.models.onnx", raising=False)
    with pytest.raises(ModelError) as info:
        check_model(ModelSpec("PYTHON", MODEL))
    assert str(info.value) == (
        "cannot import PYTHON model module 'pipeline.models.onnx': onnxruntime is not installed; "
        "install the onnx extra: pip install 'dask-model-runner[onnx]'"
    )


@needs_onnx
def test_example_request_validates() -> None:
    from pipeline.api import as_request
    from tests.conftest import ROOT

    request = as_request(ROOT / "configs" / "requests" / "onnx-text.yaml")
    spec = ModelSpec("PYTHON", request.image_processor.name, dict(request.image_processor_parameters))
    check_model(spec)
    assert spec.batch_size == 8 and spec.model_parameters["threads"] == 1
