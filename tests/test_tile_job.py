"""The XYZ tile-list job against a real tile server on 127.0.0.1 serving web-mercator tiles cut
from a real Landsat GeoTIFF, with missing (404), slow and flaky (503 once) tiles, on a real
LocalCluster."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import geopandas as gpd
import mercantile
import numpy as np
import pytest

from graphs.tile_job import TileRequest, parse_tiles, run_tile_job
from pipeline.models.builtin import centerpoint_polygon
from pipeline.request import RequestError
from tests.conftest import shared_file

ROOT = Path(__file__).resolve().parents[1]
ZOOM = 8


def two_classes():
    """A PYTHON model: per tile, a 'ship' (score 0.9) at the centre and a 'boat' (0.3) in the
    upper-left corner."""

    def model(tiles: np.ndarray, offsets: np.ndarray) -> list[dict[str, Any]]:
        size = tiles.shape[1]
        return [{"boxes": [[size / 2 - 8, size / 2 - 8, size / 2 + 8, size / 2 + 8],
                           [0, 0, 16, 16]],
                 "scores": [0.9, 0.3], "classes": ["ship", "boat"]} for _ in tiles]

    return model


def cut_tiles(path: Path) -> dict[str, bytes]:
    """256 px PNG tiles of zoom 8 over the image, reprojected to EPSG:3857."""
    import rasterio
    from PIL import Image
    from rasterio.transform import from_bounds
    from rasterio.warp import Resampling, reproject, transform_bounds

    tiles = {}
    with rasterio.open(path) as src:
        bounds = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
        for tile in mercantile.tiles(*bounds, zooms=ZOOM):
            pixels = np.zeros((3, 256, 256), dtype=np.uint8)
            reproject(rasterio.band(src, [1, 2, 3]), pixels,
                      dst_transform=from_bounds(*mercantile.xy_bounds(tile), 256, 256),
                      dst_crs="EPSG:3857", resampling=Resampling.bilinear)
            png = io.BytesIO()
            Image.fromarray(np.moveaxis(pixels, 0, -1)).save(png, format="PNG")
            tiles[f"/{tile.z}/{tile.x}/{tile.y}.png"] = png.getvalue()
    return tiles


@pytest.fixture(scope="module")
def server():
    """A tile server; ``slow`` paths wait 0.5 s, ``flaky`` paths answer 503 once,
    ``down`` paths always 500; ``hits`` counts requests per path."""
    tiles = cut_tiles(shared_file("geotiff/rasterio_RGB.byte.tif"))
    state = SimpleNamespace(tiles=tiles, slow=set(), flaky=set(), down=set(), hits=Counter(),
                            lock=threading.Lock())

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            with state.lock:
                state.hits[self.path] += 1
                hits = state.hits[self.path]
            if self.path in state.slow:
                time.sleep(0.5)
            if self.path in state.down or (self.path in state.flaky and hits == 1):
                self.send_error(503 if self.path in state.flaky else 500)
                return
            body = state.tiles.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_port}/{{z}}/{{x}}/{{y}}.png"
    state.ids = sorted(p[1:-4] for p in tiles)
    try:
        yield state
    finally:
        httpd.shutdown()


def tile_request(server, out: Path, **extra: Any) -> TileRequest:
    data: dict[str, Any] = {
        "jobId": "tiles",
        "imageryUrl": server.url,
        "imageProcessor": {"type": "BUILTIN", "name": "centerpoint"},
        "outputs": [{"type": "LOCAL", "path": str(out)}],
        "retries": 2,
        **extra,
    }
    if not any(k in data for k in ("tiles", "tileFile", "bbox")):
        data["tiles"] = server.ids
    return TileRequest.parse(data)


def test_tile_lists_parse_both_forms_and_name_bad_lines(tmp_path) -> None:
    assert parse_tiles(["8/70/110", "71-110-8", "# comment", ""]) == [
        mercantile.Tile(70, 110, 8), mercantile.Tile(71, 110, 8)]
    with pytest.raises(RequestError, match="line 2: expected z/x/y or x-y-z"):
        parse_tiles(["8/70/110", "8,70,110"])
    with pytest.raises(RequestError, match="outside zoom 2"):
        parse_tiles(["2/4/0"])
    with pytest.raises(RequestError, match="imageryUrl: .*must contain \\{y\\}"):
        TileRequest.parse({"jobId": "j", "imageryUrl": "http://x/{z}/{x}.png", "tiles": ["1/0/0"],
                           "imageProcessor": {"type": "BUILTIN", "name": "null"}})
    with pytest.raises(RequestError, match="exactly one of tiles, tileFile or bbox"):
        TileRequest.parse({"jobId": "j", "imageryUrl": "http://x/{z}/{x}/{y}", "bbox": [0, 0, 1, 1],
                           "zoom": 3, "tiles": ["1/0/0"],
                           "imageProcessor": {"type": "BUILTIN", "name": "null"}})


def test_centerpoint_features_sit_at_the_tile_centres(server, tmp_path, dask_client) -> None:
    result = run_tile_job(tile_request(server, tmp_path, defaultThreshold=0.0), dask_client)
    assert result.status == "SUCCESS" and result.summary["tiles"] == len(server.ids) == 6
    features = gpd.read_parquet(tmp_path / "tiles.parquet")
    assert sorted(features["tile"]) == server.ids
    # OSML centerpoint's hexagon (its geometry) lies to the lower right of the tile's centre
    hexagon = np.array(centerpoint_polygon(256, 256))
    (left, top), (right, bottom) = hexagon.min(axis=0), hexagon.max(axis=0)
    for row in features.itertuples():
        z, x, y = map(int, row.tile.split("/"))
        # Web Mercator metres are linear in the tile's pixels
        x0, y0, x1, y1 = mercantile.xy_bounds(x, y, z)
        centre = mercantile.lnglat(x0 + (left + right) / 2 / 256 * (x1 - x0),
                                   y1 - (top + bottom) / 2 / 256 * (y1 - y0))
        assert row.center_longitude == pytest.approx(centre.lng, abs=1e-9)
        assert row.center_latitude == pytest.approx(centre.lat, abs=1e-9)
        west, south, east, north = mercantile.bounds(x, y, z)
        box = row.geometry.bounds  # the hexagon's columns, in lon
        assert box[0] == pytest.approx(west + left / 256 * (east - west), abs=1e-9)
        assert box[2] == pytest.approx(west + right / 256 * (east - west), abs=1e-9)
        assert south < box[1] < box[3] < north
        assert row.imageBBox.tolist() == [102.4, 102.4, 153.6, 153.6]  # the tile's centre ± 10%
        assert row.image_url == server.url.format(z=z, x=x, y=y)
    collection = json.loads((tmp_path / "tiles.geojson").read_text())
    assert len(collection["features"]) == 6
    assert {f["properties"]["class"] for f in collection["features"]} == {"sample_object"}


def test_missing_slow_and_flaky_tiles_with_class_thresholds(server, tmp_path, dask_client) -> None:
    ids = server.ids
    server.slow.add(f"/{ids[0]}.png")
    server.flaky.add(f"/{ids[1]}.png")
    missing = "8/0/0"
    result = run_tile_job(tile_request(
        server, tmp_path, tiles=[*ids, missing], concurrency=4, tilesPerTask=4,
        imageProcessor={"type": "PYTHON", "name": "tests.test_tile_job:two_classes"},
        thresholds={"ship": 0.95, "boat": 0.2}), dask_client)
    assert result.status == "PARTIAL"
    assert server.hits[f"/{ids[1]}.png"] == 2  # retried after the 503
    summary = json.loads((tmp_path / "tiles.summary.json").read_text())
    assert summary["failedTiles"] == [
        {"tile": missing, "reason": f"HTTP 404 Not Found: {server.url.format(z=8, x=0, y=0)}"}]
    assert (summary["tiles"], summary["features"], summary["exported"]) == (7, 12, 6)
    everything = gpd.read_parquet(tmp_path / "tiles.parquet")
    assert Counter(everything["class"]) == {"ship": 6, "boat": 6}
    assert sorted(everything["score"].round(3).unique()) == [0.3, 0.9]
    exported = json.loads((tmp_path / "tiles.geojson").read_text())["features"]
    assert {(f["properties"]["class"], f["properties"]["score"]) for f in exported} == {("boat", 0.3)}
    assert sorted(f["properties"]["tile"] for f in exported) == ids


def test_resume_redoes_only_unfinished_parts(server, tmp_path, dask_client) -> None:
    request = tile_request(server, tmp_path, tilesPerTask=2, retries=0)
    ids = [f"{t.z}/{t.x}/{t.y}" for t in request.tile_list()]  # the order of the parts
    broken = f"/{ids[-1]}.png"
    server.down.add(broken)
    before = Counter(server.hits)
    first = run_tile_job(request, dask_client)
    assert first.status == "PARTIAL" and [t["tile"] for t in first.summary["failedTiles"]] == [
        ids[-1]]
    server.down.discard(broken)
    second = run_tile_job(request, dask_client, resume=True)
    assert second.status == "SUCCESS" and second.summary["resumedParts"] == 2
    hits = server.hits - before
    assert hits == Counter({**{f"/{i}.png": 1 for i in ids[:-2]}, f"/{ids[-2]}.png": 2,
                            broken: 2})
    assert sorted(gpd.read_parquet(tmp_path / "tiles.parquet")["tile"]) == server.ids
    # another plan (a different part size) does not reuse these parts
    other = run_tile_job(tile_request(server, tmp_path, tilesPerTask=3), dask_client, resume=True)
    assert other.status == "SUCCESS" and other.summary["resumedParts"] == 0


def test_tiles_from_an_s3_template(server, aws, tmp_path, dask_client) -> None:
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="xyz-tiles")
    for path, body in list(server.tiles.items())[:2]:
        s3.put_object(Bucket="xyz-tiles", Key=f"layer{path}", Body=body)
    wanted = [path[1:-4] for path in list(server.tiles)[:2]] + ["8/1/1"]
    result = run_tile_job(tile_request(server, tmp_path, tiles=wanted,
                                       imageryUrl="s3://xyz-tiles/layer/{z}/{x}/{y}.png"),
                          dask_client)
    assert result.status == "PARTIAL" and len(result.features) == 2
    assert result.summary["failedTiles"] == [
        {"tile": "8/1/1", "reason": "not found: s3://xyz-tiles/layer/8/1/1.png"}]


def test_cli_tiles_from_a_list_file(server, tmp_path) -> None:
    listing = tmp_path / "tiles.txt"
    listing.write_text("\n".join("{1}-{2}-{0}".format(*i.split("/")) for i in server.ids) + "\n")
    process = subprocess.run(
        [sys.executable, "-m", "pipeline", "tiles", "--tiles", str(listing), "--imagery-url",
         server.url, "--model", "centerpoint", "--job-id", "cli-tiles", "--output-dir",
         str(tmp_path / "out"), "--threshold", "sample_object=0.5", "--workers", "1",
         "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr
    assert "SUCCESS" in process.stdout
    collection = json.loads((tmp_path / "out" / "cli-tiles.geojson").read_text())
    assert sorted(f["properties"]["tile"] for f in collection["features"]) == server.ids
    bad = subprocess.run([sys.executable, "-m", "pipeline", "tiles", "--bbox", "1,2,3",
                          "--zoom", "3", "--imagery-url", server.url, "--model", "null",
                          "--output-dir", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "--bbox" in bad.stderr
