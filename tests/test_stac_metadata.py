"""STAC Items' ``proj:`` and ``raster:`` metadata in jobs (a GeoTIFF without georeferencing
placed by its Item, nodata and scale/offset from ``raster:bands``, the file winning where it
states otherwise), from a catalog on disk, over HTTP on 127.0.0.1 and in S3 (moto), and task
names that never carry a presigned query."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import shapely
from pyproj import Transformer

import pipeline
from pipeline.demo import match_truth, write_scene
from pipeline.request import ImageRequest
from pipeline.stac import AssetMetadata, expand_request, image_metadata, item_array, resolve
from tests.test_stac import served

TILE, OVERLAP, SIZE = 256, 48, 512
#: the scene's georeferencing (UTM 17N, 0.5 m), given only by the Items for the bare files
EPSG = 32617
TRANSFORM = (0.5, 0.0, 404_000.0, 0.0, -0.5, 3_286_000.0)
#: a bright value (above bright-objects' threshold 200, below every planted object's 225+)
#: that the "holes" image uses for its nodata region
NODATA = 201
HOLE_SIDE = 60
#: the "scaled" Item's raster:bands offset (scale 1): objects of 230 or more stay >= 200
OFFSET = -30.0

PROJ_V1 = "https://stac-extensions.github.io/projection/v1.1.0/schema.json"
RASTER_V1 = "https://stac-extensions.github.io/raster/v1.1.0/schema.json"


def _item(item_id: str, href: str, *, proj: dict[str, Any] | None = None,
          bands: list[dict[str, Any]] | None = None, proj_on_item: bool = False) -> dict[str, Any]:
    """A STAC Item written by hand (not by pystac): ``proj`` fields on the asset or the Item."""
    asset: dict[str, Any] = {"href": href, "type": "image/tiff; application=geotiff", "roles": ["data"]}
    properties: dict[str, Any] = {"datetime": "2026-03-01T12:00:00Z"}
    extensions = []
    if proj:
        (properties if proj_on_item else asset).update({f"proj:{k}": v for k, v in proj.items()})
        extensions.append(PROJ_V1)
    if bands:
        asset["raster:bands"] = bands
        extensions.append(RASTER_V1)
    return {"type": "Feature", "stac_version": "1.0.0", "stac_extensions": extensions, "id": item_id,
            "geometry": None, "properties": properties, "assets": {"image": asset},
            "links": [{"rel": "root", "href": "../catalog.json", "type": "application/json"},
                      {"rel": "parent", "href": "../catalog.json", "type": "application/json"}]}


#: item id → (asset file, its proj: fields, its raster:bands, proj: on the Item rather than the asset)
GEO = {"epsg": EPSG, "transform": list(TRANSFORM), "shape": [SIZE, SIZE]}
ITEMS: dict[str, tuple[str, dict[str, Any] | None, list[dict[str, Any]] | None, bool]] = {
    "bare": ("bare.tif", GEO, None, False),
    "bare-item-level": ("bare2.tif", GEO, None, True),
    "holes": ("holes.tif", GEO, [{"nodata": NODATA, "data_type": "uint8"}] * 3, False),
    "shifted": ("geo.tif", {**GEO, "transform": [0.5, 0.0, 405_000.0, 0.0, -0.5, 3_286_000.0]},
                [{"nodata": NODATA}] * 3, False),
    "scaled": ("bare.tif", GEO, [{"scale": 1.0, "offset": OFFSET}] * 3, False),
}


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A georeferenced scene (``geo.tif``), the same pixels without georeferencing
    (``bare.tif``), and those with a nodata region of bright pixels (``holes.tif``); a static
    catalog of hand-written Items over them (``catalog.json``, one folder per Item)."""
    root = tmp_path_factory.mktemp("stacmeta")
    made = write_scene(root / "data" / "geo.tif", size=SIZE, count=10, tile_size=TILE, overlap=OVERLAP,
                       seed=5)
    with rasterio.open(made.path, "r+") as dst:
        dst.crs, dst.transform = rasterio.CRS.from_epsg(EPSG), rasterio.Affine(*TRANSFORM)
    with rasterio.open(made.path) as src:
        pixels, profile = src.read(), src.profile
        values = [int(pixels[0, y0, x0:x1].max()) for x0, y0, x1, _ in made.truth.astype(int)]
    bare = {**profile, "crs": None, "transform": rasterio.Affine.identity()}
    bare.pop("nodata", None)
    for name in ("bare.tif", "bare2.tif"):
        with rasterio.open(root / "data" / name, "w", **bare) as dst:
            dst.write(pixels)
    holes = pixels.copy()
    objects = shapely.buffer(shapely.box(*made.truth.T), 2)  # the hole: a square clear of every object
    hole = next((x, y, x + HOLE_SIDE, y + HOLE_SIDE) for y in range(8, SIZE - HOLE_SIDE, 20)
                for x in range(8, SIZE - HOLE_SIDE, 20)
                if not shapely.intersects(shapely.box(x, y, x + HOLE_SIDE, y + HOLE_SIDE), objects).any())
    x0, y0, x1, y1 = hole
    holes[:, y0:y1, x0:x1] = NODATA
    with rasterio.open(root / "data" / "holes.tif", "w", **bare) as dst:
        dst.write(holes)
    for item_id, (name, proj, bands, on_item) in ITEMS.items():
        (root / item_id).mkdir()
        document = _item(item_id, f"../data/{name}", proj=proj, bands=bands, proj_on_item=on_item)
        (root / item_id / f"{item_id}.json").write_text(json.dumps(document))
    links = [{"rel": "item", "href": f"./{i}/{i}.json", "type": "application/geo+json"} for i in ITEMS]
    (root / "catalog.json").write_text(json.dumps({
        "type": "Catalog", "id": "meta", "stac_version": "1.0.0", "description": "proj: and raster: tests",
        "links": [{"rel": "root", "href": "./catalog.json", "type": "application/json"}, *links]}))
    return {"root": root, "truth": made.truth, "values": np.array(values), "hole": hole}


@pytest.fixture(scope="module")
def http_root(scene: dict[str, Any]) -> Iterator[str]:
    with served(scene["root"]) as root:
        yield root


def request(**extra: Any) -> ImageRequest:
    return ImageRequest.parse({"jobId": "stacmeta", "imageUrls": [], "imageProcessorTileSize": TILE,
                               "imageProcessorTileOverlap": OVERLAP, "tilingStrategy": "FIXED_STRIDE",
                               "imageProcessor": {"name": "bright-objects", "type": "BUILTIN"}, **extra})


def expected_lonlat(boxes: np.ndarray) -> np.ndarray:
    """Each pixel box's lon/lat bounds, through the Items' affine and pyproj (not the runner)."""
    affine = rasterio.Affine(*TRANSFORM)
    to_wgs84 = Transformer.from_crs(EPSG, 4326, always_xy=True)
    out = []
    for x0, y0, x1, y1 in boxes:
        corners = [affine * (x, y) for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))]
        lon, lat = to_wgs84.transform([x for x, _ in corners], [y for _, y in corners])
        out.append([min(lon), min(lat), max(lon), max(lat)])
    return np.array(out)


def check_geolocated(features: Any, truth: np.ndarray) -> None:
    """The features are the planted objects, each where the Items' affine puts its box."""
    boxes = np.array(features["imageBBox"].tolist())
    assert match_truth(boxes, truth) == (len(truth), 0, 0)
    assert features.crs.to_epsg() == 4326
    np.testing.assert_allclose(shapely.bounds(features.geometry.values), expected_lonlat(boxes),
                               rtol=0, atol=1e-9)


@pytest.mark.parametrize("where", ["disk", "http"])
def test_item_georeferences_a_bare_geotiff_and_masks_its_nodata(scene: dict[str, Any], http_root: str,
                                                                dask_client: Any, where: str) -> None:
    base = str(scene["root"]) if where == "disk" else http_root
    ids = ["bare", "bare-item-level", "holes"]
    result = pipeline.run(request(imageUrls=[f"{base}/{i}/{i}.json" for i in ids]), client=dask_client)
    assert result.status == "SUCCESS"
    truth = scene["truth"]
    for image in result.summary["images"]:
        assert image["sensorModel"] == "AFFINE"
        assert image["stacMetadata"]["applied"][:2] == ["proj:crs", "proj:transform"]
        assert "fileWins" not in image["stacMetadata"]
    assert result.summary["images"][2]["stacMetadata"]["applied"][2:] == ["raster:bands.nodata"]
    for name in ("bare.tif", "bare2.tif", "holes.tif"):
        url = f"{Path(base, 'data', name)}" if where == "disk" else f"{base}/data/{name}"
        check_geolocated(result.features[result.features["image_url"] == url], truth)
    # the footprint is the Item's placement too
    footprint = shapely.geometry.shape(result.summary["images"][0]["footprint"])
    np.testing.assert_allclose(footprint.bounds, expected_lonlat(np.array([[0, 0, SIZE, SIZE]]))[0],
                               rtol=0, atol=1e-7)


def test_without_the_items_metadata_the_same_files_are_pixels_and_the_holes_an_object(
        scene: dict[str, Any], dask_client: Any) -> None:
    """The control: read by their own URLs, the bare files have no georeferencing and the
    nodata region is found as a bright object (so the tests above can fail)."""
    root = scene["root"]
    result = pipeline.run(request(imageUrls=[str(root / "data" / "holes.tif")]), client=dask_client)
    assert result.summary["images"][0]["sensorModel"] == "PIXEL"
    boxes = np.array(result.features["imageBBox"].tolist())
    assert match_truth(boxes, scene["truth"]) == (len(scene["truth"]), 0, 1)
    assert [list(scene["hole"])] == [b for b in boxes.tolist() if b not in scene["truth"].tolist()]


def test_the_file_wins_where_it_states_otherwise(scene: dict[str, Any], dask_client: Any) -> None:
    """A georeferenced file under an Item whose proj:transform is 1 km off: the features are
    where the file says, and the summary names what the file won."""
    root = scene["root"]
    result = pipeline.run(request(imageUrls=[str(root / "shifted" / "shifted.json")]), client=dask_client)
    check_geolocated(result.features, scene["truth"])
    facts = result.summary["images"][0]["stacMetadata"]
    assert facts["applied"] == ["raster:bands.nodata"]  # the file has no nodata of its own
    assert [w["field"] for w in facts["fileWins"]] == ["proj:transform"]
    assert facts["fileWins"][0]["file"] == list(TRANSFORM)


def test_item_scale_and_offset_are_what_the_model_sees(scene: dict[str, Any], dask_client: Any) -> None:
    """raster:bands offset −30 with rangeAdjustment NONE: only the objects whose value is 230 or
    more stay at bright-objects' threshold (200) and are found."""
    root = scene["root"]
    result = pipeline.run(request(imageUrls=[str(root / "scaled" / "scaled.json")], rangeAdjustment="NONE"),
                          client=dask_client)
    expected = scene["truth"][scene["values"] >= 200 - OFFSET]
    assert 0 < len(expected) < len(scene["truth"])
    boxes = np.array(result.features["imageBBox"].tolist())
    assert match_truth(boxes, expected) == (len(expected), 0, 0)
    adjustment = result.summary["images"][0]["rangeAdjustment"]
    assert adjustment["type"] == "NONE" and adjustment["offset"] == [OFFSET] * 3
    # the DataArray path gives the scaled values themselves
    array = item_array(pipeline_item(root / "scaled" / "scaled.json"), chunks=256)
    with rasterio.open(root / "data" / "bare.tif") as src:
        np.testing.assert_array_equal(array[:, :64, :64].values, src.read(window=((0, 64), (0, 64))) + OFFSET)
    assert array.rio.crs.to_epsg() == EPSG


def pipeline_item(path: Path) -> Any:
    import pystac

    return pystac.Item.from_file(str(path))


def test_an_item_without_extensions_has_no_metadata(tmp_path: Path) -> None:
    path = tmp_path / "plain.json"
    path.write_text(json.dumps(_item("plain", "plain.tif")))
    expanded = expand_request(request(jobId="plain", imageUrls=[str(path)]))
    assert expanded.image_urls == [str(tmp_path / "plain.tif")]
    assert image_metadata("plain", expanded.image_urls[0]) is None


def test_resolve_rules() -> None:
    """The file wins; the Item fills what the file lacks, only for a file of its proj:shape."""
    from pipeline.reading import ImageInfo

    bare = ImageInfo("x.tif", 100, 50, 2, "uint16", 50, 50, None, None, None, None, "GTiff")
    item = AssetMetadata("item.json", "EPSG:32617", TRANSFORM, (50, 100), 0.0, (2.0, 2.0), (1.0, 1.0),
                         "uint16", 0.5)
    info, facts = resolve(bare, item)
    assert info.transform == TRANSFORM and info.nodata == 0.0 and info.scales == (2.0, 2.0)
    assert facts == {"item": "item.json", "applied": ["proj:crs", "proj:transform", "raster:bands.nodata",
                                                      "raster:bands.scale", "raster:bands.offset"]}
    other_size = AssetMetadata("item.json", "EPSG:32617", TRANSFORM, (100, 100))
    info, facts = resolve(bare, other_size)
    assert info.transform is None and facts["fileWins"][0]["field"] == "proj:shape"
    own = ImageInfo("x.tif", 100, 50, 2, "uint8", 50, 50, None, 7.0, None, None, "GTiff",
                    scales=(3.0, 3.0), offsets=(0.0, 0.0))
    info, facts = resolve(own, item)
    assert (info.nodata, info.scales) == (7.0, (3.0, 3.0))
    assert [w["field"] for w in facts["fileWins"]] == ["raster:bands.nodata", "raster:bands.scale/offset",
                                                       "raster:bands.data_type"]


# ---------------------------------------------------------------------------- STAC in S3
def test_items_and_a_catalog_in_s3(aws: str, scene: dict[str, Any], dask_client: Any) -> None:
    """An Item and a static catalog in S3 (moto), read with the project's S3 client; the Item's
    asset an s3:// GeoTIFF without georeferencing, placed by the Item's proj: fields."""
    import uuid

    import boto3

    root = scene["root"]
    bucket = f"stac-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    s3.upload_file(str(root / "data" / "bare.tif"), bucket, "data/bare.tif")
    s3.upload_file(str(root / "data" / "holes.tif"), bucket, "data/holes.tif")
    absolute = _item("bare", f"s3://{bucket}/data/bare.tif", proj=GEO)
    s3.put_object(Bucket=bucket, Key="items/bare.json", Body=json.dumps(absolute).encode())
    for item_id in ("holes", "bare"):  # relative asset and item hrefs, resolved against s3://
        s3.put_object(Bucket=bucket, Key=f"catalog/{item_id}/{item_id}.json",
                      Body=(root / item_id / f"{item_id}.json").read_bytes())
    s3.put_object(Bucket=bucket, Key="catalog/catalog.json", Body=json.dumps({
        "type": "Catalog", "id": "s3", "stac_version": "1.0.0", "description": "in S3",
        "links": [{"rel": "root", "href": "./catalog.json"},
                  {"rel": "item", "href": "./holes/holes.json"}, {"rel": "item", "href": "./bare/bare.json"}],
    }).encode())
    # relative asset hrefs: ../data/x.tif from catalog/<id>/ is catalog/data/x.tif in this bucket
    for name in ("holes.tif", "bare.tif"):
        source = {"Bucket": bucket, "Key": f"data/{name}"}
        s3.copy_object(Bucket=bucket, Key=f"catalog/data/{name}", CopySource=source)

    job = request(jobId="stacs3", imageUrls=[f"s3://{bucket}/items/bare.json"],
                  stacSearch={"catalog": f"s3://{bucket}/catalog/catalog.json", "ids": ["holes"]})
    expanded = expand_request(job)
    assert expanded.image_urls == [f"s3://{bucket}/data/bare.tif", f"s3://{bucket}/catalog/data/holes.tif"]
    assert image_metadata("stacs3", f"s3://{bucket}/catalog/data/holes.tif") == AssetMetadata(
        f"s3://{bucket}/catalog/holes/holes.json", "EPSG:32617", TRANSFORM, (SIZE, SIZE), float(NODATA),
        data_type="uint8")
    result = pipeline.run(job, client=dask_client)
    assert result.status == "SUCCESS", result.summary["reason"]
    for url in expanded.image_urls:
        check_geolocated(result.features[result.features["image_url"] == url], scene["truth"])
    assert [i["stacMetadata"]["item"] for i in result.summary["images"]] == [
        f"s3://{bucket}/items/bare.json", f"s3://{bucket}/catalog/holes/holes.json"]


def test_s3_stac_reads_check_the_allow_list(aws: str) -> None:
    from pipeline.security import AccessDenied, AllowList
    from pipeline.stac import stac_reader

    allow = AllowList.from_strings(["s3://mine"])
    with pytest.raises(AccessDenied, match=r"imageUrls\[0\]: .*elsewhere.* is not on the allow-list"):
        expand_request(request(imageUrls=["s3://elsewhere/item.json"]), allow)
    with pytest.raises(AccessDenied, match=r"stacSearch.catalog: .*other.* is not on the allow-list"):
        stac_reader(allow, "stacSearch.catalog").read_text("s3://other/catalog/catalog.json")


# ---------------------------------------------------------------------------- task names
def test_task_names_never_carry_a_presigned_query(scene: dict[str, Any], http_root: str) -> None:
    """open_image (and lazy_pixels) of a presigned-looking URL: its pixels read, and no key or
    layer name of the graph holds the query's secrets."""
    from pipeline.reading import open_image

    secret, key_id = "c2VjcmV0LXNpZ25hdHVyZS12YWx1ZQ", "AKIAIOSFODNN7EXAMPLE"
    url = (f"{http_root}/data/geo.tif?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={key_id}%2F20261205"
           f"&X-Amz-Signature={secret}")
    array = open_image(url, chunks=256)
    graph = array.data.__dask_graph__()
    names = [str(k) for k in graph] + [str(name) for name in graph.layers] + [array.data.name]
    assert len(names) > 4
    for name in names:
        assert secret not in name and key_id not in name and "X-Amz" not in name, name
    with rasterio.open(scene["root"] / "data" / "geo.tif") as src:
        expected = src.read(window=((200, 300), (250, 300)))
    np.testing.assert_array_equal(array[:, 200:300, 250:300].values, expected)


# ---------------------------------------------------------------------------- redirects
@pytest.fixture
def redirector() -> Iterator[str]:
    """An HTTP server on 127.0.0.1 that serves ``/bare.json`` (the bare Item, its asset
    ``bare.tif`` beside it) and redirects ``/here.json`` to it and ``/away.json`` to port 9."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    item = _item("bare", "bare.tif", proj=GEO)

    class Redirects(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            moves = {"/here.json": "/bare.json", "/away.json": "http://127.0.0.1:9/bare.json"}
            if self.path in moves:
                self.send_response(302)
                self.send_header("Location", moves[self.path])
                self.end_headers()
                return
            body = json.dumps(item).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirects)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_stac_redirects_are_checked_hop_by_hop(redirector: str) -> None:
    from pipeline.security import AccessDenied, AllowList

    allow = AllowList.from_strings([redirector])
    expanded = expand_request(request(jobId="redirects", imageUrls=[f"{redirector}/here.json"]), allow)
    assert expanded.image_urls == [f"{redirector}/bare.tif"]
    assert image_metadata("redirects", expanded.image_urls[0]) is not None
    with pytest.raises(AccessDenied, match=r"imageUrls\[0\]: redirected to http://127.0.0.1:9/bare.json, "
                                           r"which is refused"):
        expand_request(request(imageUrls=[f"{redirector}/away.json"]), allow)
