"""Built-in models on hand-made arrays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import requests

from pipeline.models import ModelError, ModelSpec, check_model, load_model
from pipeline.models.builtin import bright_objects, centerpoint, centerpoint_answer, flood


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


def osml_expected() -> list[dict]:
    path = Path(__file__).parent / "data/osml/centerpoint.small.tif.geojson"
    return json.loads(path.read_text())["features"]


def test_centerpoint_answers_osml_centerpoint_polygon() -> None:
    # OSML's container: matplotlib's CirclePolygon(resolution=6) path, closed, moved to 0-1, scaled
    # by 10% of the tile and shifted by half of it (awslabs/osml-models centerpoint/app.py)
    from matplotlib.patches import CirclePolygon

    ring = CirclePolygon((0, 0), 0.1, resolution=6).get_path().vertices.tolist()
    ring.append(ring[0])
    want = [[round((x + 1) / 2 * 51.2 + 256, 4), round((y + 1) / 2 * 51.2 + 256, 4)] for x, y in ring]
    answer = centerpoint_answer(512, 512)
    (feature,) = answer["features"]
    props = feature["properties"]
    assert props["imageGeometry"] == {"type": "Polygon", "coordinates": [want]} and len(want) == 8
    assert props["imageBBox"] == [204.8, 204.8, 307.2, 307.2]
    assert props["featureClasses"] == [{"iri": "sample_object", "score": 1.0}]
    assert props["modelMetadata"] == {"modelName": "centerpoint", "ontologyName": "centerpoint",
                                      "ontologyVersion": "1.0.0"}
    assert feature["geometry"] is None and len(feature["id"]) == len(props["image_id"]) == 32
    # OSML's published results: every feature is this answer moved to its tile's origin
    for expected in osml_expected():
        ring = np.array(expected["properties"]["imageGeometry"]["coordinates"][0])
        bbox = np.array(expected["properties"]["imageBBox"])
        origin = bbox[:2] - [204.8, 204.8]
        assert np.allclose(ring - origin, want, atol=1e-9)
        assert expected["properties"]["featureClasses"] == props["featureClasses"]
        assert expected["properties"]["modelMetadata"] == props["modelMetadata"]
    # without segmentation: OSML's placeholder point and the box
    plain = centerpoint_answer(100, 200, segmentation=False)["features"][0]["properties"]
    assert plain["imageGeometry"] == {"type": "Point", "coordinates": [0.0, 0.0]}
    assert plain["imageBBox"] == [40.0, 80.0, 60.0, 120.0]


def test_builtin_centerpoint_reads_its_answer_as_an_endpoint_answer() -> None:
    model = load_model(ModelSpec("BUILTIN", "centerpoint"))
    tiles = np.zeros((2, 100, 200, 3), dtype=np.uint8)
    found = model.predict(tiles, np.array([[0, 0], [200, 0]]))
    assert [d.boxes.tolist() for d in found] == [[[80, 40, 120, 60]]] * 2
    assert [d.classes.tolist() for d in found] == [["sample_object"]] * 2
    # ids follow the tile's place: the same tile gives the same answer, another tile another id
    again = centerpoint(tiles[0], np.array([0, 0]))
    assert again == centerpoint(tiles[0], np.array([0, 0]))
    assert again["features"][0]["id"] != centerpoint(tiles[0], np.array([200, 0]))["features"][0]["id"]


def test_flood_answers_osml_flood_boxes() -> None:
    tile = np.zeros((512, 512, 3), dtype=np.uint8)
    answer = flood(tile, np.array([0, 0]))
    features = answer["features"]
    assert len(features) == 100  # OSML's FLOOD_VOLUME
    boxes = np.array([f["properties"]["imageBBox"] for f in features])
    assert np.all(boxes[:, 2] - boxes[:, 0] == 104) and np.all(boxes[:, 3] - boxes[:, 1] == 104)
    assert boxes.min() >= 0 and boxes.max() <= 512 and np.all(boxes == np.round(boxes))
    scores = [f["properties"]["featureClasses"][0]["score"] for f in features]
    assert all(0 <= s <= 1 for s in scores) and len(set(scores)) == 100
    assert {f["properties"]["featureClasses"][0]["iri"] for f in features} == {"sample_object"}
    assert {f["properties"]["modelMetadata"]["modelName"] for f in features} == {"flood"}
    assert {f["properties"]["imageGeometry"]["type"] for f in features} == {"Point"}
    assert answer == flood(tile, np.array([0, 0]))  # seeded by the tile's place
    assert answer != flood(tile, np.array([358, 0]))
    assert len(flood(tile, np.array([0, 0]), count=7, seed=3)["features"]) == 7
    assert flood(np.zeros((1, 1), np.uint8), np.array([0, 0]))["features"] == []  # no room
    found = load_model(ModelSpec("BUILTIN", "flood", {"count": 5})).predict(tile[None], np.zeros((1, 2)))
    assert len(found[0]) == 5 and set(found[0].classes) == {"sample_object"}


def test_serve_model_answers_what_osml_containers_answer() -> None:
    from pipeline.models.encoding import encode_tile
    from pipeline.models.server import start_server

    server = start_server("centerpoint")
    try:
        body = encode_tile(np.zeros((512, 512, 3), dtype=np.uint8), "GTIFF", "NONE")
        answers = [requests.post(server.url + "/invocations", data=body, timeout=10).json()
                   for _ in range(2)]
    finally:
        server.shutdown()
    ids = [a["features"][0]["id"] for a in answers]
    assert ids[0] != ids[1]  # random, as OSML's
    for answer in answers:
        feature = answer["features"][0]
        del feature["id"], feature["properties"]["image_id"]
    expected = centerpoint_answer(512, 512)["features"][0]
    del expected["id"], expected["properties"]["image_id"]
    assert answers[0] == answers[1] == {"type": "FeatureCollection", "features": [expected]}


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
