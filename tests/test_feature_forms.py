"""Model answers kept whole (shapes, all classes, other properties) and the two output forms,
RFC 7946 and OSML's, checked against the affine transform applied by hand."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
import rasterio
import shapely
from pyproj import CRS
from rasterio.transform import from_origin

import pipeline
from pipeline.detections import Detections
from pipeline.geolocate import to_features
from pipeline.merge import soft_nms
from pipeline.models.results import parse_feature_collection, to_feature_collection
from pipeline.nitf import source_metadata
from pipeline.request import ImageRequest, KinesisOutput, LocalOutput, RequestError, S3Output
from pipeline.sensor_models import AffineSensorModel
from pipeline.sinks import KinesisSink, LocalSink, S3Sink, make_sink, write_geojson, write_parquet

# 1e-4° pixels from (10°E, 50°N): lon = 10 + x·1e-4, lat = 50 − y·1e-4 (x, y: pixel corners)
LON0, LAT0, STEP = 10.0, 50.0, 1e-4
MARK_HEX, MARK_POINT, MARK_LINE = 200, 150, 100
# the markers (full-image pixels): each lies whole in at least one 256-pixel tile
HEX_AT, POINT_AT, LINE_AT = (300, 100), (120, 420), (430, 380)
META = {"modelName": "shapes", "ontologyVersion": "1.0.0"}


def lonlat(xy: Any) -> np.ndarray:
    """The affine transform by hand: pixel ``(x, y)`` rows → ``(lon, lat)`` rows."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    return np.column_stack([LON0 + xy[:, 0] * STEP, LAT0 - xy[:, 1] * STEP])


def hexagon(cx: float, cy: float) -> list[list[float]]:
    """A ring like OSML's centerpoint model answers: from the bottom, clockwise on screen, the
    first vertex repeated twice at the end."""
    ring = [[cx, cy + 8.0], [cx - 7.0, cy + 4.0], [cx - 7.0, cy - 4.0], [cx, cy - 8.0],
            [cx + 7.0, cy - 4.0], [cx + 7.0, cy + 4.0]]
    return [*ring, ring[0], ring[0]]


def shape_model() -> Any:
    """A PYTHON model factory: around each marker it answers a hexagon (with a box and three
    classes), a point or a line (no box), with more properties and ids."""
    def model(tiles: np.ndarray, offsets: np.ndarray) -> list[dict[str, Any]]:
        out = []
        for tile in tiles:
            answer: dict[str, list[Any]] = {k: [] for k in (
                "boxes", "geometries", "scores", "classes", "featureClasses", "properties", "ids")}
            for mark in (MARK_HEX, MARK_POINT, MARK_LINE):
                rows, cols = np.nonzero(tile[..., 0] == mark)
                if not len(rows) or rows.min() == 0 or cols.min() == 0 or \
                        rows.max() == tile.shape[0] - 1 or cols.max() == tile.shape[1] - 1:
                    continue  # not whole in this tile
                x0, y0, x1, y1 = float(cols.min()), float(rows.min()), cols.max() + 1.0, rows.max() + 1.0
                cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
                if mark == MARK_HEX:
                    answer["boxes"].append([cx - 10, cy - 10, cx + 10, cy + 10])
                    answer["geometries"].append({"type": "Polygon", "coordinates": [hexagon(cx, cy)]})
                    classes = [{"iri": "boat", "score": 0.6}, {"iri": "ship", "score": 0.8},
                               {"iri": "raft", "score": 0.1, "note": "unlikely"}]
                    answer["properties"].append({"modelMetadata": META})
                elif mark == MARK_POINT:
                    answer["boxes"].append(None)
                    answer["geometries"].append({"type": "Point", "coordinates": [cx, cy]})
                    classes = [{"iri": "buoy", "score": 0.7}]
                    answer["properties"].append({"depth": 3})
                else:
                    answer["boxes"].append(None)
                    answer["geometries"].append({"type": "LineString",
                                                 "coordinates": [[x0, y0], [x1, y1], [x1, y0]]})
                    classes = [{"iri": "pier", "score": 0.5}, {"iri": "wall", "score": 0.4}]
                    answer["properties"].append({})
                answer["featureClasses"].append(classes)
                top = max(classes, key=lambda c: c["score"])
                answer["classes"].append(top["iri"])
                answer["scores"].append(top["score"])
                answer["ids"].append(f"m{mark}")
            out.append(answer)
        return out
    return model


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("forms") / "shapes.tif"
    pixels = np.zeros((1, 600, 600), np.uint8)
    for mark, (x, y) in ((MARK_HEX, HEX_AT), (MARK_POINT, POINT_AT), (MARK_LINE, LINE_AT)):
        pixels[0, y:y + 12, x:x + 20] = mark
    with rasterio.open(path, "w", driver="GTiff", width=600, height=600, count=1, dtype="uint8",
                       crs="EPSG:4326", transform=from_origin(LON0, LAT0, STEP, STEP)) as dst:
        dst.write(pixels)
    return path


@pytest.fixture(scope="module")
def found(image: Path) -> Any:
    return pipeline.detect(str(image), f"{__name__}:shape_model", tile_size=256, overlap=40)


def written(features: Any, tmp_path: Path, form: str) -> dict[str, dict[str, Any]]:
    """The features written in ``form``, by id; the same bytes from a GeoParquet part."""
    write_geojson(features, tmp_path / f"{form}.geojson", form)
    write_parquet(features, tmp_path / "part.parquet")
    write_geojson([tmp_path / "part.parquet"], tmp_path / f"{form}-part.geojson", form)
    text = (tmp_path / f"{form}.geojson").read_bytes()
    assert (tmp_path / f"{form}-part.geojson").read_bytes() == text
    return {f["id"]: f for f in json.loads(text)["features"]}


def _close(ring: Any, expected: np.ndarray) -> None:
    np.testing.assert_allclose(np.asarray(ring, dtype=float)[:, :2], expected, rtol=0, atol=1e-12)


def test_model_shapes_classes_and_properties_come_back_in_both_forms(found: Any, tmp_path: Path) -> None:
    assert sorted(found["id"]) == ["m100", "m150", "m200"]  # one each, the tiles' copies merged
    hx, hy = HEX_AT[0] + 10.0, HEX_AT[1] + 6.0
    ring = np.array(hexagon(hx, hy))
    px, py = POINT_AT[0] + 10.0, POINT_AT[1] + 6.0
    line = np.array([[LINE_AT[0], LINE_AT[1]], [LINE_AT[0] + 20, LINE_AT[1] + 12],
                     [LINE_AT[0] + 20, LINE_AT[1]]], dtype=float)

    rfc = written(found, tmp_path, "RFC7946")
    polygon = shapely.geometry.shape(rfc["m200"]["geometry"])
    assert polygon.geom_type == "Polygon" and polygon.exterior.is_ccw  # the model's ring was CW
    assert all(len(p) == 2 for p in rfc["m200"]["geometry"]["coordinates"][0])
    # the same vertices (duplicates too), reversed into counter-clockwise order
    _close(rfc["m200"]["geometry"]["coordinates"][0], lonlat(ring)[::-1])
    assert rfc["m150"]["geometry"]["type"] == "Point"
    _close([rfc["m150"]["geometry"]["coordinates"]], lonlat([px, py]))
    assert rfc["m100"]["geometry"]["type"] == "LineString"
    _close(rfc["m100"]["geometry"]["coordinates"], lonlat(line))
    props = rfc["m200"]["properties"]
    assert props["imageGeometry"] == {"type": "Polygon", "coordinates": [ring.tolist()]}
    assert props["imageBBox"] == [hx - 10, hy - 10, hx + 10, hy + 10]
    assert props["featureClasses"] == [{"iri": "boat", "score": 0.6}, {"iri": "ship", "score": 0.8},
                                       {"iri": "raft", "score": 0.1, "note": "unlikely"}]
    assert props["modelMetadata"] == META and rfc["m150"]["properties"]["depth"] == 3
    centroid = shapely.Polygon(ring).centroid  # the model's shape's centroid, not its box centre
    assert [props["center_longitude"], props["center_latitude"]] == pytest.approx(
        lonlat([centroid.x, centroid.y])[0].tolist(), abs=1e-10)
    assert "bbox" not in rfc["m200"] and "modelProperties" not in props

    osml = written(found, tmp_path, "OSML")
    hexagon_ground = [[round(lon, 6), round(lat, 6), 0.0] for lon, lat in lonlat(ring).tolist()]
    assert osml["m200"]["geometry"] == {"type": "Polygon", "coordinates": [hexagon_ground]}
    assert osml["m150"]["geometry"] == {
        "type": "Point", "coordinates": [*(round(v, 6) for v in lonlat([px, py])[0]), 0.0]}
    assert osml["m100"]["geometry"]["coordinates"] == [[round(lon, 6), round(lat, 6), 0.0]
                                                       for lon, lat in lonlat(line).tolist()]
    props = osml["m200"]["properties"]
    assert props["imageGeometry"] == {"type": "Polygon", "coordinates": [ring.tolist()]}
    assert props["featureClasses"] == rfc["m200"]["properties"]["featureClasses"]
    assert props["modelMetadata"] == META
    assert props["center_longitude"] == pytest.approx(centroid.x * STEP + LON0, abs=1e-10)
    corners = lonlat([[hx - 10, hy - 10], [hx + 10, hy + 10]])
    assert osml["m200"]["bbox"] == pytest.approx([*corners.min(axis=0), *corners.max(axis=0)], abs=1e-12)
    # the point and the line came without a box: OSML writes neither imageBBox nor bbox
    assert "imageBBox" not in osml["m150"]["properties"] and "bbox" not in osml["m150"]
    assert osml["m150"]["properties"]["imageGeometry"] == {"type": "Point", "coordinates": [px, py]}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", props["inferenceMetadata"]["inferenceDT"])
    assert not {"image_url", "sourceMetadata", "modelProperties"} & set(props)  # a GeoTIFF


def test_osml_form_of_a_box_detection(tmp_path: Path) -> None:
    model = AffineSensorModel(tuple(from_origin(LON0, LAT0, STEP, STEP))[:6], CRS.from_epsg(4326).to_wkt())
    box = [10.5, 20.25, 30.0, 40.75]
    tags = {"NITF_ICAT": "VIS", "NITF_FTITLE": "Airfield", "NITF_IDATIM": "19961217102630"}
    features = to_features(Detections([box], [0.875], ["car"]), model, image_url="s3://b/k.ntf",
                           job_id="j1", feature_properties={"mission": "m1"},
                           extra_columns={"sourceMetadata": source_metadata(tags)},
                           inference_time=datetime(2025, 10, 22, 16, 23, 55, 123456, tzinfo=UTC))
    (feature,) = written(features, tmp_path, "OSML").values()
    x0, y0, x1, y1 = box
    pixels = [[x1, y0], [x1, y1], [x0, y1], [x0, y0], [x1, y0]]  # NE, SE, SW, NW, NE
    corners = lonlat(pixels)
    expected = {
        "type": "Feature",
        "bbox": [*corners.min(axis=0).tolist(), *corners.max(axis=0).tolist()],
        "id": features["id"][0],
        "geometry": {"type": "Polygon",
                     "coordinates": [[[round(lon, 6), round(lat, 6), 0.0] for lon, lat in corners.tolist()]]},
        "properties": {
            "imageGeometry": {"type": "Polygon", "coordinates": [pixels]},
            "imageBBox": box,
            "featureClasses": [{"iri": "car", "score": 0.875}],
            "center_longitude": LON0 + (x0 + x1) / 2 * STEP,
            "center_latitude": LAT0 - (y0 + y1) / 2 * STEP,
            "inferenceMetadata": {"jobId": "j1", "inferenceDT": "2025-10-22T16:23:55Z"},
            "mission": "m1",
            "sourceMetadata": [{"location": "s3://b/k.ntf", "format": "NITF", "category": "VIS",
                                "sourceId": "Airfield", "sourceDT": "1996-12-17T10:26:30Z"}],
        },
    }
    assert feature["bbox"] == pytest.approx(expected.pop("bbox"), abs=1e-12)
    props = feature.pop("properties")
    for name in ("center_longitude", "center_latitude"):
        assert props.pop(name) == pytest.approx(expected["properties"].pop(name), abs=1e-10)
    assert props == expected.pop("properties")
    feature.pop("bbox")
    assert feature == expected
    ring = shapely.geometry.shape(feature["geometry"]).exterior
    assert not ring.is_ccw  # OSML's ring runs clockwise on the ground, from the north-east


def test_feature_collections_keep_shapes_classes_properties_and_ids() -> None:
    body = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "a1", "geometry": None, "properties": {
            "imageGeometry": {"type": "Polygon", "coordinates": [hexagon(20, 20)]},
            "imageBBox": [10, 10, 30, 30],
            "featureClasses": [{"iri": "x", "score": 0.2}, {"iri": "y", "score": 0.9}],
            "modelMetadata": META, "detection_score": 0.9, "image_id": "drop me"}},
        {"type": "Feature", "properties": {
            "imageGeometry": {"type": "MultiPolygon", "coordinates": [[hexagon(40, 40)], [hexagon(50, 20)]]},
            "featureClasses": [{"iri": "z", "score": 0.5}]}},
        {"type": "Feature", "properties": {"imageGeometry": {"type": "LineString",
                                                            "coordinates": [[1, 2], [3, 9]]}}},
    ]}
    parsed = parse_feature_collection(json.dumps(body), 64, 64)
    assert parsed.classes.tolist() == ["y", "z", "object"] and parsed.scores.tolist() == [0.9, 0.5, 1.0]
    assert parsed.boxes.tolist()[0] == [10, 10, 30, 30]
    assert parsed.boxes.tolist()[1] == list(shapely.bounds(parsed.shapes[1]))
    assert [s.geom_type for s in parsed.shapes] == ["Polygon", "MultiPolygon", "LineString"]
    assert np.asarray(parsed.shapes[0].exterior.coords).tolist() == hexagon(20, 20)  # as given
    assert parsed.extras[0] == {"featureClasses": body["features"][0]["properties"]["featureClasses"],
                                "properties": {"modelMetadata": META}, "id": "a1"}
    assert parsed.extras[1]["bbox"] is False
    moved = parsed.shifted(100, 1000)  # tile → image pixels: the shapes move with their boxes
    assert np.asarray(moved.shapes[2].coords).tolist() == [[101, 1002], [103, 1009]]
    again = parse_feature_collection(json.dumps(to_feature_collection(parsed)), 64, 64)
    assert [s.equals_exact(t, 0) for s, t in zip(again.shapes, parsed.shapes, strict=True)] == [True] * 3
    assert list(again.extras[:2]) == list(parsed.extras[:2])  # the third gets the default class
    merged = soft_nms(Detections.concat([parsed, parsed.select([0])]))
    assert merged.extras[0]["featureClasses"][1]["rawScore"] == 0.9  # Soft-NMS keeps it, as OSML


def test_border_detections_round_trip_the_part_files(tmp_path: Path) -> None:
    from pipeline.parts import _load_detections, _save_detections

    body = {"features": [{"properties": {"imageGeometry": {"type": "Point", "coordinates": [3, 4]},
                                         "featureClasses": [{"iri": "p", "score": 0.5}], "k": [1]}}]}
    parsed = Detections.concat([parse_feature_collection(json.dumps(body), 64, 64),
                                Detections([[1, 1, 2, 2]], [1.0], ["box"])])
    _save_detections(parsed, tmp_path / "b.npz")
    with np.load(tmp_path / "b.npz", allow_pickle=False) as data:
        loaded = _load_detections(data)
    assert loaded.shapes[0].equals(parsed.shapes[0]) and loaded.shapes[1] is None
    assert list(loaded.extras) == list(parsed.extras)


def _box_features(n: int = 30) -> Any:
    rng = np.random.default_rng(5)
    xy = rng.uniform(0, 500, size=(n, 2))
    boxes = np.hstack([xy, xy + rng.uniform(3, 20, size=(n, 2))])
    model = AffineSensorModel(tuple(from_origin(LON0, LAT0, STEP, STEP))[:6], CRS.from_epsg(4326).to_wkt())
    return to_features(Detections(boxes, rng.uniform(0, 1, n), ["car"] * n), model,
                       image_url="s3://b/k.tif", job_id="job-f")


def test_each_sink_writes_each_form(aws: str, tmp_path: Path) -> None:
    features = _box_features()
    for form in ("RFC7946", "OSML"):
        (tmp_path / form).mkdir()
    expected = {form: written(features, tmp_path / form, form) for form in ("RFC7946", "OSML")}
    assert expected["OSML"] != expected["RFC7946"]
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="forms")
    kinesis = boto3.client("kinesis")
    for form in ("RFC7946", "OSML"):
        local = LocalSink(tmp_path / f"local-{form}", ("geojson",), form)
        (path,) = local.write_features("job-f", features)
        assert {f["id"]: f for f in json.loads(Path(path).read_text())["features"]} == expected[form]

        S3Sink("forms", form, ("geojson", "parquet"), form=form).write_features("job-f", features)
        body = s3.get_object(Bucket="forms", Key=f"{form}/job-f.geojson")["Body"].read()
        assert {f["id"]: f for f in json.loads(body)["features"]} == expected[form]

        stream = f"forms-{form.lower()}"
        kinesis.create_stream(StreamName=stream, ShardCount=1)
        KinesisSink(stream, batch_size=8, form=form).write_features("job-f", features)
        (shard,) = kinesis.list_shards(StreamName=stream)["Shards"]
        iterator = kinesis.get_shard_iterator(StreamName=stream, ShardId=shard["ShardId"],
                                              ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        records = kinesis.get_records(ShardIterator=iterator, Limit=1000)["Records"]
        assert {r["PartitionKey"] for r in records} == {"job-f"}
        collections = [json.loads(r["Data"]) for r in records]
        assert all(c["type"] == "FeatureCollection" for c in collections)
        # OSML puts one feature per record; RFC 7946 batches batchSize features
        assert [len(c["features"]) for c in collections] == ([1] * 30 if form == "OSML" else [8, 8, 8, 6])
        assert {f["id"]: f for c in collections for f in c["features"]} == expected[form]


def test_the_output_field_and_the_run_modes_default(tmp_path: Path) -> None:
    request = ImageRequest.parse({
        "jobId": "j", "imageUrls": ["a.tif"], "imageProcessor": {"name": "m"},
        "outputs": [{"type": "LOCAL", "path": str(tmp_path), "featureForm": "osml"},
                    {"type": "S3", "bucket": "b"}, {"type": "Kinesis", "stream": "s"}]})
    local, s3, kinesis = request.outputs
    assert local.feature_form == "OSML" and s3.feature_form is None
    assert make_sink(local).form == "OSML"  # the output's own choice
    assert make_sink(s3).form == "RFC7946"  # CLI/API default
    assert make_sink(s3, form="OSML").form == make_sink(kinesis, form="OSML").form == "OSML"  # queue
    assert make_sink(LocalOutput(path=str(tmp_path), featureForm="RFC7946"), form="OSML").form == "RFC7946"
    assert isinstance(make_sink(S3Output(bucket="b")), S3Sink)
    assert make_sink(KinesisOutput(stream="s", batchSize=9), form="OSML").batch_size == 1
    with pytest.raises(RequestError, match="featureForm"):
        ImageRequest.parse({"jobId": "j", "imageUrls": ["a.tif"], "imageProcessor": {"name": "m"},
                            "outputs": [{"type": "LOCAL", "path": "x", "featureForm": "WKT"}]})


def test_model_shapes_across_the_antimeridian(tmp_path: Path) -> None:
    # 0.01° pixels from 179.5°E: pixel column 50 lies on the antimeridian
    model = AffineSensorModel((0.01, 0.0, 179.5, 0.0, -0.01, 10.0), CRS.from_epsg(4326).to_wkt())
    found = Detections.coerce({"geometries": [{"type": "LineString", "coordinates": [[40, 5], [60, 5]]},
                                              {"type": "Polygon", "coordinates": [[[40, 0], [60, 0],
                                                                                   [60, 10], [40, 0]]]}],
                               "classes": ["cable", "zone"]})
    features = written(to_features(found, model, image_url="a", job_id="j"), tmp_path, "RFC7946")
    line, zone = (shapely.geometry.shape(f["geometry"]) for f in features.values())
    assert line.geom_type == "MultiLineString" and line.length == pytest.approx(0.2)
    assert zone.geom_type == "MultiPolygon" and zone.area == pytest.approx(0.2 * 0.1 / 2)
    assert sorted(round(p.bounds[0], 6) for p in zone.geoms) == [-180.0, 179.9]
    osml = written(to_features(found, model, image_url="a", job_id="j"), tmp_path, "OSML")
    lines = [f for f in osml.values() if f["geometry"]["type"] == "LineString"]
    assert lines[0]["geometry"]["coordinates"] == [[179.9, 9.95, 0.0], [-179.9, 9.95, 0.0]]  # as OSML


def test_parts_of_different_shapes_concatenate_into_one_output_parquet(found: Any, tmp_path: Path) -> None:
    import geopandas as gpd

    from pipeline.sinks import concat_parquet

    boxes = _box_features(5)
    parts = []
    for k, frame in enumerate([found.iloc[:1], found.iloc[1:], boxes]):  # shapes of one type each
        write_parquet(frame, tmp_path / f"p{k}.parquet")
        parts.append(tmp_path / f"p{k}.parquet")
    concat_parquet(parts, tmp_path / "all.parquet")
    table = gpd.read_parquet(tmp_path / "all.parquet")
    assert len(table) == len(found) + 5 and not {"_ground", "_bbox", "_shape"} & set(table.columns)
    assert set(table["imageGeometry"].geom_type) == {"Polygon", "Point", "LineString"}
    assert table["imageGeometry"].iloc[-1].equals(shapely.box(*boxes["imageBBox"].iloc[-1]))
    write_geojson(parts, tmp_path / "parts.geojson", "OSML")
    assert len(json.loads((tmp_path / "parts.geojson").read_text())["features"]) == len(found) + 5


def test_osml_heights_follow_the_sensor_model() -> None:
    from pipeline.geolocate import ground_height
    from pipeline.sensor_models import PixelSensorModel, RPCSensorModel

    assert ground_height(RPCSensorModel({"height_off": 1104.25})) == 1104.25  # OSML: HEIGHT_OFF
    assert ground_height(RPCSensorModel({"height_off": 1104.25}, height=12.5)) == 12.5
    affine = AffineSensorModel(tuple(from_origin(LON0, LAT0, STEP, STEP))[:6], CRS.from_epsg(4326).to_wkt())
    assert ground_height(affine) == ground_height(PixelSensorModel()) == 0.0
