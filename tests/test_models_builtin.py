"""Built-in models on hand-made arrays."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.models import ModelError, ModelSpec, check_model, load_model
from pipeline.models.builtin import bright_objects, centerpoint, flood


def test_bright_objects_exact_boxes_areas_and_scores() -> None:
    tile = np.zeros((20, 30), dtype=np.uint8)
    tile[2:5, 3:7] = 210  # 3x4 rectangle
    tile[10, 10] = tile[11, 11] = tile[12, 12] = tile[13, 13] = 255  # diagonal: 8-connected, 4 px
    tile[18, 28] = 255  # single pixel: below minArea
    tile[0:2, 20:22] = 199  # below threshold
    found = bright_objects(tile, threshold=200, min_area=4)
    order = np.argsort(found.boxes[:, 0])
    assert found.boxes[order].tolist() == [[3, 2, 7, 5], [10, 10, 14, 14]]
    assert np.allclose(found.scores[order], [210 / 255, 1.0])
    assert set(found.classes) == {"bright-object"}


def test_bright_objects_uses_mean_of_first_three_bands() -> None:
    tile = np.zeros((8, 8, 4), dtype=np.uint8)
    tile[1:4, 1:4, :3] = [255, 255, 90]  # mean 200 → detected
    tile[5:8, 5:8, :3] = [255, 255, 80]  # mean 196.7 → not
    tile[5:8, 0:3, 3] = 255  # band 4 ignored
    found = bright_objects(tile)
    assert found.boxes.tolist() == [[1, 1, 4, 4]]
    assert found.scores[0] == pytest.approx(200 / 255)


def test_centerpoint_and_flood() -> None:
    tile = np.zeros((100, 200, 3), dtype=np.uint8)
    assert centerpoint(tile).boxes.tolist() == [[80, 40, 120, 60]]
    a = flood(tile, np.array([0, 0]), count=7, seed=3)
    b = flood(tile, np.array([0, 0]), count=7, seed=3)
    c = flood(tile, np.array([100, 0]), count=7, seed=3)
    assert len(a) == 7 and np.array_equal(a.boxes, b.boxes) and not np.array_equal(a.boxes, c.boxes)


def test_adapter_parameters_and_errors() -> None:
    model = load_model(ModelSpec("BUILTIN", "bright-objects", {"threshold": 100, "minArea": 1}))
    tiles = np.zeros((2, 10, 10, 1), dtype=np.uint8)
    tiles[1, 4, 4, 0] = 120
    results = model.predict(tiles, np.zeros((2, 2), dtype=int))
    assert [len(r) for r in results] == [0, 1]
    with pytest.raises(ModelError, match="unknown BUILTIN model 'nope'"):
        check_model(ModelSpec("BUILTIN", "nope"))
    with pytest.raises(ModelError, match="unknown imageProcessor.type 'FOO'"):
        check_model(ModelSpec("FOO", "x"))
    with pytest.raises(ModelError, match="cannot import PYTHON model module"):
        check_model(ModelSpec("PYTHON", "no_such_module_xyz:factory"))
