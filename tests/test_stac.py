"""STAC in (Items and searches expanded to images, on disk, over HTTP and from a STAC API on
127.0.0.1) and STAC out (an Item per image, a Collection per job, validated offline)."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import pystac.validation
import pytest
import rasterio
import shapely
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, RasterBand, RasterExtension
from rasterio.warp import transform_bounds

import pipeline
from pipeline.demo import match_truth, write_scene
from pipeline.request import ImageRequest
from pipeline.security import AccessDenied, AllowList
from pipeline.stac import StacError, expand_request, item_array

TILE, OVERLAP = 256, 48
#: (item id, collection, x offset of the scene in metres, day, cloud cover)
SCENES = [("a1", "alpha", 0.0, 1, 10), ("a2", "alpha", 5000.0, 2, 60), ("b1", "beta", 10000.0, 3, 5)]


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A static, self-contained catalog: two collections, three scenes side by side (512², UTM),
    each Item with a thumbnail asset listed before its COG, proj: and raster: metadata."""
    root = tmp_path_factory.mktemp("stac")
    catalog = pystac.Catalog("scenes", "test scenes")
    collections = {name: pystac.Collection(name, name, pystac.Extent(
        pystac.SpatialExtent([[-180.0, -90.0, 180.0, 90.0]]),
        pystac.TemporalExtent([[datetime(2026, 1, 1, tzinfo=UTC), None]])))
        for name in ("alpha", "beta")}
    for item_id, collection, dx, day, cloud in SCENES:
        scene = write_scene(root / "data" / f"{item_id}.tif", size=512, count=8, tile_size=TILE,
                            overlap=OVERLAP, seed=day)
        with rasterio.open(scene.path, "r+") as dst:
            dst.transform = rasterio.Affine(0.5, 0, 404_000.0 + dx, 0, -0.5, 3_286_000.0)
            crs, transform, shape = dst.crs, dst.transform, dst.shape
            bounds = transform_bounds(crs, "EPSG:4326", *dst.bounds)
        np.save(root / "data" / f"{item_id}.truth.npy", scene.truth)
        item = pystac.Item(item_id, shapely.geometry.mapping(shapely.box(*bounds)), list(bounds),
                           datetime(2026, 3, day, 12, tzinfo=UTC), {"eo:cloud_cover": cloud})
        item.add_asset("thumbnail", pystac.Asset(str(root / "data" / f"{item_id}.png"),
                                                 media_type=pystac.MediaType.PNG, roles=["thumbnail"]))
        item.add_asset("image", pystac.Asset(str(scene.path), media_type=pystac.MediaType.COG,
                                             roles=["data"]))
        proj = ProjectionExtension.ext(item.assets["image"], add_if_missing=True)
        proj.code, proj.shape, proj.transform = crs.to_string(), list(shape), list(transform)[:6]
        raster = RasterExtension.ext(item.assets["image"], add_if_missing=True)
        raster.bands = [RasterBand.create(data_type=DataType.UINT8, nodata=0) for _ in range(3)]
        collections[collection].add_item(item)
    for child in collections.values():
        catalog.add_child(child)
    catalog.normalize_hrefs(str(root / "catalog"))
    catalog.make_all_asset_hrefs_relative()
    catalog.save(pystac.CatalogType.SELF_CONTAINED)
    return root


def item_path(root: Path, item_id: str) -> Path:
    collection = next(c for i, c, *_ in SCENES if i == item_id)
    return root / "catalog" / collection / item_id / f"{item_id}.json"


def image_path(root: Path, item_id: str) -> str:
    return str((root / "data" / f"{item_id}.tif").resolve())


def request(**extra: Any) -> ImageRequest:
    return ImageRequest.parse({"jobId": "stac", "imageUrls": [], "imageProcessorTileSize": TILE,
                               "imageProcessorTileOverlap": OVERLAP,
                               "imageProcessor": {"name": "bright-objects", "type": "BUILTIN"}, **extra})


#: a directory server with byte ranges (GDAL reads images by range), run as its own process:
#: GDAL holds the GIL while it waits for a server thread of the same process
RANGE_SERVER = """
import functools, sys
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

class Files(SimpleHTTPRequestHandler):
    def do_GET(self):
        path = Path(self.translate_path(self.path))
        if not self.headers.get("Range") or not path.is_file():
            return super().do_GET()
        data = path.read_bytes()
        low, high = self.headers["Range"].split("=")[1].split("-")
        first, last = int(low), min(int(high or len(data) - 1), len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
        self.send_header("Content-Length", str(last - first + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.wfile.write(data[first : last + 1])

    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Files, directory=sys.argv[1]))
print(server.server_address[1], flush=True)
server.serve_forever()
"""


@contextlib.contextmanager
def served(root: Path) -> Iterator[str]:
    """``root`` served over HTTP (with ranges) on 127.0.0.1, by a process of its own."""
    server = subprocess.Popen([sys.executable, "-c", RANGE_SERVER, str(root)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert server.stdout is not None
        yield f"http://127.0.0.1:{int(server.stdout.readline())}"
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture(scope="module")
def http_root(catalog_dir: Path) -> Iterator[str]:
    """The catalog directory served over HTTP on 127.0.0.1 (a process of its own)."""
    with served(catalog_dir) as root:
        yield root


@pytest.fixture(scope="module")
def stac_api(catalog_dir: Path, http_root: str) -> Iterator[str]:
    """A tiny STAC API on 127.0.0.1: a landing page and ``POST /search`` that filters the
    catalog's Items by ``collections`` and ``ids`` only, and ``GET /collections/<c>/items/<id>``
    (the Items on disk, their assets' hrefs on the HTTP file server)."""
    items = [pystac.Item.from_file(str(item_path(catalog_dir, i))).to_dict() for i, *_ in SCENES]
    for item in items:
        for asset in item["assets"].values():
            asset["href"] = f"{http_root}/data/{asset['href'].rsplit('/', 1)[-1]}"
    searches: list[dict[str, Any]] = []

    class Api(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/geo+json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            root = f"http://127.0.0.1:{self.server.server_address[1]}"  # type: ignore[index]
            if "/items/" in self.path:  # /collections/<c>/items/<id>
                self._send(next(i for i in items if i["id"] == self.path.rsplit("/", 1)[-1]))
                return
            self._send({"type": "Catalog", "id": "api", "description": "test API", "stac_version": "1.1.0",
                        "conformsTo": ["https://api.stacspec.org/v1.0.0/core",
                                       "https://api.stacspec.org/v1.0.0/item-search"],
                        "links": [{"rel": "self", "href": root + "/", "type": "application/json"},
                                  {"rel": "root", "href": root + "/", "type": "application/json"},
                                  {"rel": "search", "href": root + "/search", "method": "POST",
                                   "type": "application/geo+json"}]})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            searches.append(body)
            found = [i for i in items
                     if ("collections" not in body or i["collection"] in body["collections"])
                     and ("ids" not in body or i["id"] in body["ids"])]
            self._send({"type": "FeatureCollection", "features": found, "links": []})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.searches = searches  # type: ignore[attr-defined]
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


# ---------------------------------------------------------------------------- STAC in
def test_item_files_expand_to_their_data_asset(catalog_dir: Path) -> None:
    urls = [str(item_path(catalog_dir, "a2")), image_path(catalog_dir, "a1"),
            str(item_path(catalog_dir, "b1"))]
    expanded = expand_request(request(imageUrls=urls))
    assert expanded.image_urls == [image_path(catalog_dir, "a2"), image_path(catalog_dir, "a1"),
                                   image_path(catalog_dir, "b1")]  # the COG, not the thumbnail
    assert expanded.stac_sources == {image_path(catalog_dir, "a2"): str(item_path(catalog_dir, "a2")),
                                     image_path(catalog_dir, "b1"): str(item_path(catalog_dir, "b1"))}
    plain = request(imageUrls=[image_path(catalog_dir, "a1")])
    assert expand_request(plain) is plain
    # an expanded request is never expanded again (an asset that looks like STAC stays an image)
    again = expand_request(request(imageUrls=[str(item_path(catalog_dir, "a2"))], stacSearch={
        "catalog": str(catalog_dir / "catalog" / "catalog.json"), "ids": ["a1"], "assetKey": "thumbnail"}))
    looks_like_stac = again.model_copy(update={"image_urls": [*again.image_urls, "/elsewhere/item.json"]})
    assert expand_request(looks_like_stac) is looks_like_stac


@pytest.mark.parametrize(("search", "expected"), [
    ({}, ["a1", "a2", "b1"]),
    ({"collections": ["alpha"]}, ["a1", "a2"]),
    ({"ids": ["b1"]}, ["b1"]),
    ({"datetime": "2026-03-02/.."}, ["a2", "b1"]),
    ({"datetime": "2026-03-01"}, ["a1"]),
    ({"query": {"eo:cloud_cover": {"lt": 20}}}, ["a1", "b1"]),
    ({"collections": ["alpha"], "maxItems": 1}, ["a1"]),
])
def test_static_catalog_search_on_disk_and_over_http(catalog_dir: Path, http_root: str,
                                                     search: dict[str, Any], expected: list[str]) -> None:
    local = expand_request(request(stacSearch={"catalog": str(catalog_dir / "catalog" / "catalog.json"),
                                               **search}))
    assert sorted(local.image_urls) == [image_path(catalog_dir, i) for i in expected]
    served = expand_request(request(stacSearch={"catalog": f"{http_root}/catalog/catalog.json", **search}))
    assert sorted(served.image_urls) == [f"{http_root}/data/{i}.tif" for i in expected]


def test_bbox_search_against_the_scenes_footprints(catalog_dir: Path) -> None:
    """A bbox around the middle scene's centre (lon/lat from rasterio, not from the Items)."""
    with rasterio.open(image_path(catalog_dir, "a2")) as src:
        west, south, east, north = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    cx, cy = (west + east) / 2, (south + north) / 2
    found = expand_request(request(stacSearch={"catalog": str(catalog_dir / "catalog" / "catalog.json"),
                                               "bbox": [cx - 1e-4, cy - 1e-4, cx + 1e-4, cy + 1e-4]}))
    assert found.image_urls == [image_path(catalog_dir, "a2")]


def test_stac_api_search_and_asset_key(catalog_dir: Path, stac_api: str, http_root: str) -> None:
    found = expand_request(request(stacSearch={"url": stac_api, "collections": ["alpha"]}))
    assert sorted(found.image_urls) == [f"{http_root}/data/a1.tif", f"{http_root}/data/a2.tif"]
    thumbs = expand_request(request(stacSearch={"url": stac_api, "ids": ["b1"], "assetKey": "thumbnail"}))
    assert thumbs.image_urls == [f"{http_root}/data/b1.png"]
    with pytest.raises(StacError, match="no asset 'nope'"):
        expand_request(request(stacSearch={"url": stac_api, "assetKey": "nope"}))
    with pytest.raises(StacError, match="found no STAC Items"):
        expand_request(request(stacSearch={"url": stac_api, "ids": ["zzz"]}))
    api_item = f"{stac_api}/collections/beta/items/b1"
    by_url = expand_request(request(imageUrls=[api_item]))
    assert by_url.image_urls == [f"{http_root}/data/b1.tif"]
    assert by_url.stac_sources == {f"{http_root}/data/b1.tif": api_item}


def test_expansion_checks_every_stac_url_and_href_against_the_allow_list(catalog_dir: Path,
                                                                        http_root: str) -> None:
    catalog = f"{http_root}/catalog/catalog.json"
    with pytest.raises(AccessDenied, match="stacSearch.catalog"):
        expand_request(request(stacSearch={"catalog": catalog}), AllowList.from_strings(["s3://*"]))
    # the catalog may be read, its assets may not: the worker's check of the expanded hrefs refuses
    only_catalog = AllowList.from_strings([f"{http_root}/catalog"])
    expanded = expand_request(request(stacSearch={"catalog": catalog}), only_catalog)
    with pytest.raises(AccessDenied, match=r"imageUrls\[0\]"):
        only_catalog.check_request(expanded)
    AllowList.from_strings([http_root]).check_request(expanded)


def test_not_a_stac_item_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"type": "Catalog", "id": "x"}))
    with pytest.raises(StacError, match="not a STAC Item"):
        expand_request(request(imageUrls=[str(path)]))


def test_job_on_a_stac_item_and_a_search(catalog_dir: Path, http_root: str, dask_client: Any) -> None:
    """A job over an Item file and one over a search of the served catalog: the features are
    each scene's planted truth, and name the asset they came from."""
    result = pipeline.run(request(imageUrls=[str(item_path(catalog_dir, "a1"))]), client=dask_client)
    truth = np.load(catalog_dir / "data" / "a1.truth.npy")
    boxes = np.array(result.features["imageBBox"].tolist())
    assert match_truth(boxes, truth) == (len(truth), 0, 0)
    assert set(result.features["image_url"]) == {image_path(catalog_dir, "a1")}
    served = pipeline.run(request(stacSearch={"catalog": f"{http_root}/catalog/catalog.json",
                                              "collections": ["beta"]}), client=dask_client)
    truth = np.load(catalog_dir / "data" / "b1.truth.npy")
    assert match_truth(np.array(served.features["imageBBox"].tolist()), truth) == (len(truth), 0, 0)
    assert set(served.features["image_url"]) == {f"{http_root}/data/b1.tif"}


def test_item_array_uses_proj_and_raster_metadata(catalog_dir: Path, tmp_path: Path) -> None:
    """An asset file without georeferencing gets the Item's proj: CRS and transform."""
    item = pystac.Item.from_file(str(item_path(catalog_dir, "b1")))
    bare = tmp_path / "bare.tif"
    with rasterio.open(image_path(catalog_dir, "b1")) as src:
        profile = {**src.profile, "crs": None, "transform": rasterio.Affine.identity()}
        with rasterio.open(bare, "w", **profile) as dst:
            dst.write(src.read())
    item.assets["image"].href = str(bare)
    array = item_array(item, chunks=256)
    assert array.rio.crs.to_epsg() == 32617
    assert tuple(array.rio.transform())[:6] == (0.5, 0.0, 414_000.0, 0.0, -0.5, 3_286_000.0)
    assert array.rio.nodata == 0
    found = pipeline.detect(array, tile_size=TILE, overlap=OVERLAP, compute=True)
    truth = np.load(catalog_dir / "data" / "b1.truth.npy")
    assert match_truth(np.array(found["imageBBox"].tolist()), truth) == (len(truth), 0, 0)
    assert found.crs.to_epsg() == 4326
    shutil.rmtree(tmp_path, ignore_errors=True)


# ---------------------------------------------------------------------------- STAC out
SCHEMAS = Path(__file__).parent / "data" / "stac-schemas"


class OfflineValidator(pystac.validation.JsonSchemaSTACValidator):
    """pystac's JSON-schema validator on the schemas vendored in ``tests/data/stac-schemas``
    (each stored under its URI's path); any other schema is an error, never a download."""

    def __init__(self) -> None:
        super().__init__()
        from jsonschema_specifications import REGISTRY

        self.schema_cache = {f"https://{p.relative_to(SCHEMAS).as_posix()}": json.loads(p.read_text())
                             for p in SCHEMAS.rglob("*.json")}
        draft7 = "http://json-schema.org/draft-07/schema"
        self.schema_cache[draft7] = REGISTRY[draft7].contents

    def _get_schema(self, schema_uri: str) -> dict[str, Any]:
        if schema_uri not in self.schema_cache:
            raise pystac.validation.GetSchemaError(schema_uri, LookupError("not vendored"))
        return self.schema_cache[schema_uri]


@pytest.fixture
def offline_validation() -> Iterator[None]:
    pystac.validation.set_validator(OfflineValidator())
    try:
        yield
    finally:
        pystac.validation.set_validator(pystac.validation.JsonSchemaSTACValidator())


def test_job_writes_valid_stac_items_and_collection(catalog_dir: Path, tmp_path: Path, dask_client: Any,
                                                    offline_validation: None) -> None:
    out = tmp_path / "out"
    images = [str(item_path(catalog_dir, "a1")), image_path(catalog_dir, "b1")]
    job = request(jobId="stacout", imageUrls=images,
                  outputs=[{"type": "LOCAL", "path": str(out), "stac": True}])
    result = pipeline.run(job, client=dask_client)
    assert result.status == "SUCCESS"
    collection = pystac.Collection.from_file(str(out / "stacout.collection.json"))
    assert collection.validate()  # the schema URIs it was checked against
    items = [pystac.Item.from_file(str(out / f"stacout.{k}.item.json")) for k in range(2)]
    assert [link.get_absolute_href() for link in collection.get_links("item")] == [
        str(out / f"stacout.{k}.item.json") for k in range(2)]
    for item, item_id in zip(items, ["a1", "b1"], strict=True):
        assert any("item-spec" in uri for uri in item.validate())
        assert item.properties["dmr:imageUrl"] == image_path(catalog_dir, item_id)
        truth = np.load(catalog_dir / "data" / f"{item_id}.truth.npy")
        assert item.properties["dmr:features"] == len(truth)
        # the geometry is the processed footprint: the image's bounds, through rasterio here
        with rasterio.open(image_path(catalog_dir, item_id)) as src:
            bounds = transform_bounds(src.crs, "EPSG:4326", *src.bounds, densify_pts=64)
        assert item.bbox is not None
        np.testing.assert_allclose(item.bbox, bounds, atol=1e-9)
        assert shapely.geometry.shape(item.geometry).is_valid
        for key, suffix in (("geojson", ".geojson"), ("parquet", ".parquet"), ("summary", ".summary.json")):
            assert Path(str(item.assets[key].get_absolute_href())) == out / f"stacout{suffix}"
            assert (out / f"stacout{suffix}").is_file()
        assert item.assets["parquet"].media_type == "application/vnd.apache.parquet"
        link = item.get_single_link("collection")
        assert link is not None and link.get_absolute_href() == str(out / "stacout.collection.json")
    # derived_from: the source Item for the STAC image, none for the plain URL
    assert [link.get_absolute_href() for link in items[0].get_links("derived_from")] == [
        str(item_path(catalog_dir, "a1"))]
    assert items[1].get_links("derived_from") == []
    with rasterio.open(image_path(catalog_dir, "a1")) as first, \
            rasterio.open(image_path(catalog_dir, "b1")) as last:
        west = transform_bounds(first.crs, "EPSG:4326", *first.bounds)[0]
        east = transform_bounds(last.crs, "EPSG:4326", *last.bounds)[2]
    spatial = collection.extent.spatial.bboxes[0]
    assert spatial[0] == pytest.approx(west, abs=1e-9) and spatial[2] == pytest.approx(east, abs=1e-9)
    broken = items[0].to_dict()
    broken["geometry"] = {"type": "Polygon", "coordinates": "nope"}
    with pytest.raises(pystac.errors.STACValidationError):
        pystac.validation.validate_dict(broken)


def test_queue_worker_expands_stac_before_its_allow_list(aws: str, catalog_dir: Path, http_root: str,
                                                         dask_client: Any) -> None:
    """On the queue worker a STAC catalog off the allow-list, or one whose assets are off it, is
    refused (poison, dead-lettered with the reason); an allowed one runs, and its S3 output with
    ``stac: true`` holds the Items and the Collection beside the features."""
    import uuid

    import boto3

    from graphs.queue_worker import QueueWorker, WorkerConfig

    sqs, s3 = boto3.client("sqs"), boto3.client("s3")
    tag = uuid.uuid4().hex[:8]
    dlq = sqs.create_queue(QueueName=f"dlq-{tag}")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    queue = sqs.create_queue(QueueName=f"stac-{tag}", Attributes={"RedrivePolicy": json.dumps(
        {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "3"})})["QueueUrl"]
    s3.create_bucket(Bucket=f"results-{tag}")
    catalog = f"{http_root}/catalog/catalog.json"
    base = {"imageUrls": [], "imageProcessor": {"name": "bright-objects", "type": "BUILTIN"},
            "imageProcessorTileSize": TILE, "imageProcessorTileOverlap": OVERLAP,
            "tilingStrategy": "FIXED_STRIDE",
            "outputs": [{"type": "S3", "bucket": f"results-{tag}", "prefix": "jobs", "stac": True}]}
    jobs: dict[str, dict[str, Any]] = {"catalog-refused": {"stacSearch": {"catalog": "http://127.0.0.1:9/catalog.json"}},
            "asset-refused": {"stacSearch": {"catalog": catalog, "ids": ["a1"], "assetKey": "thumbnail"}},
            "not-stac": {"imageUrls": [f"{http_root}/catalog/alpha/collection.json"]},
            "allowed": {"stacSearch": {"catalog": catalog, "ids": ["a2"]}}}
    for job_id, fields in jobs.items():
        sqs.send_message(QueueUrl=queue, MessageBody=json.dumps({**base, "jobId": job_id, **fields}))
    # the catalog and the COGs are allowed, the thumbnails' folder is not
    allow = AllowList.from_strings([f"{http_root}/catalog", f"{http_root}/data/a2.tif"],
                                   [f"s3://results-{tag}/jobs"])
    config = WorkerConfig(queue_url=queue, exit_when_idle=True, wait_seconds=0)
    stats = QueueWorker(config, dask_client, allow=allow).run()
    assert stats.received == 4 and stats.poison == 3
    dead = {json.loads(m["Body"])["jobId"]: m["MessageAttributes"]["failure_reason"]["StringValue"]
            for m in sqs.receive_message(QueueUrl=dlq, MaxNumberOfMessages=10, WaitTimeSeconds=0,
                                         MessageAttributeNames=["All"]).get("Messages", [])}
    assert "stacSearch.catalog: http://127.0.0.1:9/catalog.json is not on the allow-list" in \
        dead["catalog-refused"]
    assert f"imageUrls[0]: {http_root}/data/a1.png is not on the allow-list" in dead["asset-refused"]
    assert "not a STAC Item" in dead["not-stac"]
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=f"results-{tag}")["Contents"])
    assert {"jobs/allowed.0.item.json", "jobs/allowed.collection.json", "jobs/allowed.parquet"} <= set(keys)
    item = json.loads(s3.get_object(Bucket=f"results-{tag}", Key="jobs/allowed.0.item.json")["Body"].read())
    assert item["properties"]["dmr:imageUrl"] == f"{http_root}/data/a2.tif"
    assert [link["href"] for link in item["links"] if link["rel"] == "derived_from"] == [
        f"{http_root}/catalog/alpha/a2/a2.json"]
    truth = np.load(catalog_dir / "data" / "a2.truth.npy")
    assert item["properties"]["dmr:features"] == len(truth)


def test_an_item_collection_file_expands_to_each_item(catalog_dir: Path, tmp_path: Path) -> None:
    items = [pystac.Item.from_file(str(item_path(catalog_dir, i))) for i in ("b1", "a1")]
    for item in items:
        item.make_asset_hrefs_absolute()
    path = tmp_path / "found.json"
    path.write_text(json.dumps(pystac.ItemCollection(items).to_dict()))
    expanded = expand_request(request(imageUrls=[str(path)]))
    assert expanded.image_urls == [image_path(catalog_dir, "b1"), image_path(catalog_dir, "a1")]
