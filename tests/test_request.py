"""The request model: OSML wire format, strictness, defaults and one-line errors."""

from __future__ import annotations

import json

import pytest

from pipeline.request import ImageRequest, RequestError, S3Output

OSML_MESSAGE = {
    "jobName": "test-job",
    "jobId": "job-1",
    "imageUrls": ["s3://bucket/image.ntf"],
    "outputs": [
        {"type": "S3", "bucket": "out", "prefix": "results/"},
        {"type": "Kinesis", "stream": "features", "batchSize": 500},
    ],
    "imageProcessor": {"name": "aircraft", "type": "SM_ENDPOINT"},
    "imageProcessorTileSize": 2048,
    "imageProcessorTileOverlap": 100,
    "imageProcessorTileFormat": "NITF",
    "imageProcessorTileCompression": "NONE",
    "imageProcessorParameters": {"CustomAttributes": "a=b"},
    "rangeAdjustment": "DRA",
    "regionOfInterest": "POLYGON((8 50, 8.1 50, 8.1 50.1, 8 50.1, 8 50))",
    "featureProperties": [{"modelName": "aircraft"}, {"team": "x"}],
    "postProcessing": [
        {"step": "FEATURE_DISTILLATION",
         "algorithm": {"algorithmType": "SOFT_NMS", "iouThreshold": 0.5, "skipBoxThreshold": 0.1,
                       "sigma": 0.2}}
    ],
}


def test_real_osml_message_validates_unchanged() -> None:
    request = ImageRequest.parse(OSML_MESSAGE)
    assert request.job_id == "job-1"
    assert request.tile_size == 2048 and request.tile_overlap == 100
    assert request.tile_format == "NITF"
    assert request.outputs[1].type == "KINESIS" and request.outputs[1].batch_size == 500
    assert request.distillation is not None
    assert request.distillation.algorithm_type == "SOFT_NMS"
    assert request.distillation.sigma == 0.2
    assert request.merged_feature_properties == {"modelName": "aircraft", "team": "x"}
    # round trip through the wire format
    again = ImageRequest.parse(json.loads(json.dumps(request.to_wire())))
    assert again == request


def test_defaults_and_snake_case_api() -> None:
    request = ImageRequest(job_id="j", image_urls=["a.tif"],
                           image_processor={"name": "null", "type": "builtin"})
    assert request.tile_size == 1024 and request.tile_overlap == 50
    assert request.image_processor.type == "BUILTIN"
    assert request.distillation is not None
    assert request.distillation.algorithm_type == "NMS"
    assert request.distillation.iou_threshold == 0.75


def test_legacy_output_bucket_is_one_s3_output() -> None:
    request = ImageRequest.parse({**OSML_MESSAGE, "outputs": [], "outputBucket": "b",
                                  "outputPrefix": "p"})
    assert request.all_outputs == [S3Output(bucket="b", prefix="p")]


def test_empty_post_processing_disables_distillation() -> None:
    assert ImageRequest.parse({**OSML_MESSAGE, "postProcessing": []}).distillation is None


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"imageProcessorTilesize": 512}, "imageProcessorTilesize: unknown field"),
        ({"jobId": None}, "jobId"),
        ({"imageProcessorTileOverlap": 2048}, "must be smaller than imageProcessorTileSize"),
        ({"regionOfInterest": "POLYGON((garbage"}, "regionOfInterest: Value error, not valid WKT"),
        ({"imageUrls": []}, "imageUrls"),
        ({"outputs": [{"type": "FTP", "path": "x"}]}, "unknown output type"),
        ({"imageProcessor": {"type": "BUILTIN"}}, "imageProcessor.name: required field is missing"),
        ({"imageProcessorTileSize": -5}, "imageProcessorTileSize"),
    ],
)
def test_bad_requests_give_one_line_naming_the_field(change: dict, expected: str) -> None:
    with pytest.raises(RequestError) as info:
        ImageRequest.parse({**OSML_MESSAGE, **change})
    message = str(info.value)
    assert "\n" not in message
    assert expected in message


def test_missing_job_id() -> None:
    data = dict(OSML_MESSAGE)
    del data["jobId"]
    with pytest.raises(RequestError, match="jobId: required field is missing"):
        ImageRequest.parse(data)


def test_queue_traffic_is_lenient_and_reports_unknown_fields() -> None:
    request, unknown = ImageRequest.from_message(json.dumps({**OSML_MESSAGE, "newOsmlField": 1}))
    assert unknown == ["newOsmlField"]
    assert request.job_id == "job-1"


def test_yaml_and_json_files(tmp_path) -> None:
    import yaml

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(OSML_MESSAGE))
    (tmp_path / "r.json").write_text(json.dumps(OSML_MESSAGE))
    assert ImageRequest.from_file(tmp_path / "r.yaml") == ImageRequest.from_file(tmp_path / "r.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(RequestError, match="bad.json: not valid JSON"):
        ImageRequest.from_file(tmp_path / "bad.json")
    with pytest.raises(RequestError, match="request file not found"):
        ImageRequest.from_file(tmp_path / "missing.json")
