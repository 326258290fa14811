"""Segmentation jobs: planted shapes with exact truth across chunk sizes, the COG and its
georeferencing, polygons dissolved across chunk seams, blending against an independent sum."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from pyproj import Transformer
from rio_cogeo.cogeo import cog_validate

from graphs.segment_job import run_segmentation
from pipeline.models import ModelSpec
from pipeline.request import ImageRequest
from pipeline.segmentation.stitch import covering_tiles, read_window, stitch_chunk
from pipeline.tiling import TileGrid, chunk_size

# a 6400 x 4500 scene, 256-px tiles with 64 px of overlap: chunk targets 1024, 2048 and 4096
# give chunks of 960, 2112 and 4032 px, whose seams the shapes cross
WIDTH, HEIGHT, TILE, OVERLAP = 6400, 4500, 256, 64
TRANSFORM = Affine(0.5, 0.0, 400000.0, 0.0, -0.5, 3700000.0)  # EPSG:32617, 0.5 m pixels
SHAPES: dict[str, Any] = {
    "disc-960": ("disc", 960, 960, 150),  # on a corner of four 960-px chunks
    "disc-2112": ("disc", 2112, 2112, 200),  # on a corner of four 2112-px chunks
    "disc-4032": ("disc", 4032, 960, 120),
    "ring": ("ring", 2112, 3600, 250, 180),  # crosses the 2112 seam and the 3840 one
    "strip-h": ("box", 100, 1500, 6300, 1540),  # 6200 px long: every vertical seam
    "strip-v": ("box", 3000, 2100, 3030, 4400),  # every horizontal seam below it
    "strip-diag": ("diag", 300, 2600, 1700, 4000, 100),  # a wide diagonal band
}


def truth_polygon(shape: tuple[Any, ...]) -> shapely.Geometry:
    kind, *p = shape
    if kind == "disc":
        return shapely.Point(p[0], p[1]).buffer(p[2], quad_segs=256)
    if kind == "ring":
        return shapely.Point(p[0], p[1]).buffer(p[2], quad_segs=256).difference(
            shapely.Point(p[0], p[1]).buffer(p[3], quad_segs=256))
    if kind == "box":
        return shapely.box(*p)
    return shapely.LineString([(p[0], p[1]), (p[2], p[3])]).buffer(p[4] / 2, cap_style="flat")


def truth_raster() -> np.ndarray:
    """Pixels whose centre lies in a shape: 1, else 0 (computed from the shapes' equations)."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH] + 0.5
    truth = np.zeros((HEIGHT, WIDTH), bool)
    for kind, *p in SHAPES.values():
        if kind == "disc":
            truth |= (xx - p[0]) ** 2 + (yy - p[1]) ** 2 < p[2] ** 2
        elif kind == "ring":
            d2 = (xx - p[0]) ** 2 + (yy - p[1]) ** 2
            truth |= (d2 < p[2] ** 2) & (d2 >= p[3] ** 2)
        elif kind == "box":
            truth |= (xx >= p[0]) & (xx < p[2]) & (yy >= p[1]) & (yy < p[3])
        else:
            x0, y0, x1, y1, w = p
            length = np.hypot(x1 - x0, y1 - y0)
            along = ((xx - x0) * (x1 - x0) + (yy - y0) * (y1 - y0)) / length
            across = ((xx - x0) * (y1 - y0) - (yy - y0) * (x1 - x0)) / length
            truth |= (along >= 0) & (along < length) & (np.abs(across) < w / 2)
    return truth.astype(np.uint8)


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    truth = truth_raster()
    path = tmp_path_factory.mktemp("segment") / "planted.tif"
    with rasterio.open(path, "w", driver="GTiff", width=WIDTH, height=HEIGHT, count=1, dtype="uint8",
                       crs="EPSG:32617", transform=TRANSFORM, tiled=True, blockxsize=512,
                       blockysize=512, compress="DEFLATE") as dst:
        dst.write(np.where(truth == 1, 255, 30).astype(np.uint8)[None])
    return path, truth


def request(url: Path, out: Path, job: str, answer: str = "scores", **segmentation: Any) -> ImageRequest:
    return ImageRequest.parse({
        "jobId": job, "imageUrls": [str(url)],
        "imageProcessor": {"name": "threshold", "type": "BUILTIN"},
        "imageProcessorParameters": {"answer": answer},
        "imageProcessorTileSize": TILE, "imageProcessorTileOverlap": OVERLAP,
        "segmentation": segmentation, "outputs": [{"type": "LOCAL", "path": str(out)}],
    })


def iou(a: shapely.Geometry, b: shapely.Geometry) -> float:
    return float(shapely.area(shapely.intersection(a, b)) / shapely.area(shapely.union(a, b)))


def pixel_polygons(features: Any) -> list[shapely.Geometry]:
    return [shapely.geometry.shape(g) for g in features["imageGeometry"]]


@pytest.mark.parametrize(("stitch", "answer"), [("BLEND", "scores"), ("CORE", "ids"), ("CORE", "scores")])
def test_planted_shapes_identical_across_chunk_sizes(scene: tuple[Path, np.ndarray], tmp_path: Path,
                                                     dask_client: Any, stitch: str, answer: str) -> None:
    url, truth = scene
    rasters = []
    for target in (1024, 2048, 4096):
        result = run_segmentation(request(url, tmp_path, f"{stitch}-{target}", answer, stitch=stitch),
                                  dask_client, chunk_target=target)
        assert result.status == "SUCCESS", result.summary
        grid = TileGrid(WIDTH, HEIGHT, TILE, OVERLAP, chunk_size(TILE, OVERLAP, target))
        assert grid.chunks_x >= 2  # seams to cross
        with rasterio.open(result.images[0].rasters[0]) as src:
            rasters.append(src.read(1))
            assert src.colormap(1)[1][3] == 255  # a palette for the class band alone
        # one polygon per planted shape, each matching its truth polygon
        polygons = pixel_polygons(result.features)
        assert len(polygons) == len(SHAPES), (target, len(polygons))
        for name, shape in SHAPES.items():
            truth_shape = truth_polygon(shape)
            best = max(polygons, key=lambda p, t=truth_shape: iou(p, t))
            assert iou(best, truth_shape) >= 0.99, (name, target, iou(best, truth_shape))
            assert best.geom_type == "Polygon"
        assert set(result.features["featureClasses"].map(lambda c: c[0]["iri"])) == {"bright"}
    for raster in rasters:
        np.testing.assert_array_equal(raster, truth)


def test_cog_valid_georeferenced_with_class_names(scene: tuple[Path, np.ndarray], tmp_path: Path,
                                                  dask_client: Any) -> None:
    url, truth = scene
    result = run_segmentation(request(url, tmp_path, "cog", scoreBands=True), dask_client,
                              chunk_target=2048)
    cog = Path(result.images[0].rasters[0])
    assert cog == tmp_path / "cog.planted.classes.tif"
    valid, errors, _ = cog_validate(str(cog))
    assert valid, errors
    assert not list(tmp_path.glob(".partial*")) and not list(tmp_path.glob("*.partial.*"))
    with rasterio.open(cog) as src:
        assert src.crs.to_epsg() == 32617
        assert src.transform == Affine(0.5, 0.0, 400000.0, 0.0, -0.5, 3700000.0)
        assert (src.width, src.height, src.count) == (WIDTH, HEIGHT, 3)
        assert src.overviews(1) and src.block_shapes[0] == (512, 512)
        assert json.loads(src.tags(1)["CLASS_NAMES"]) == ["background", "bright"]
        assert src.descriptions == ("class", "score:background", "score:bright")
        np.testing.assert_array_equal(src.read(1), truth)
        np.testing.assert_array_equal(src.read(3), truth * 255)
        np.testing.assert_array_equal(src.read(2), (1 - truth) * 255)
        # overviews by nearest samples (a class id, never an average of two), made by the
        # chunk tasks: level f takes pixel min(f i + f / 2, size - 1)
        assert src.overviews(1) == [2, 4, 8, 16]
        for f in (2, 8):
            rows = np.minimum(np.arange(-(-HEIGHT // f)) * f + f // 2, HEIGHT - 1)
            cols = np.minimum(np.arange(-(-WIDTH // f)) * f + f // 2, WIDTH - 1)
            overview = src.read(1, out_shape=(len(rows), len(cols)))
            np.testing.assert_array_equal(overview, truth[rows][:, cols])
    # the polygons are geolocated through the image's affine: the disc's ground centroid is
    # the UTM point (400000 + 0.5 x, 3700000 - 0.5 y) in lon/lat (pyproj, independently)
    features = result.features
    to_lonlat = Transformer.from_crs(32617, 4326, always_xy=True)
    for name in ("disc-960", "disc-2112", "disc-4032"):
        _, cx, cy, r = SHAPES[name]
        lon, lat = to_lonlat.transform(400000 + 0.5 * cx, 3700000 - 0.5 * cy)
        found = [k for k, g in enumerate(features.geometry)
                 if g.contains(shapely.Point(lon, lat))]
        assert len(found) == 1, name
        centroid = features.geometry.iloc[found[0]].centroid
        assert abs(centroid.x - lon) < 1e-7 and abs(centroid.y - lat) < 1e-7
        properties = json.loads(features["modelProperties"].iloc[found[0]])
        assert properties["area_m2"] == pytest.approx(np.pi * r**2 * 0.25, rel=0.01)
        assert features["featureClasses"].iloc[found[0]][0]["score"] == pytest.approx(1.0)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["cog.geojson", "cog.parquet", "cog.planted.classes.tif", "cog.summary.json"]


def tile_constant(**_: Any) -> Any:
    """A PYTHON segmenter whose scores depend on the tile, not only on the pixel: class 1's
    probability is a constant per tile drawn from its offset, plus a ramp across the tile."""

    def model(tiles: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
        out = []
        for tile, (x, y) in zip(tiles, offsets, strict=True):
            c = np.random.default_rng([int(x), int(y)]).uniform(0.2, 0.8)
            ramp = np.linspace(-0.15, 0.15, tile.shape[1], dtype=np.float32)[None, :]
            p = np.clip(c + ramp + tile[..., 0] / 2550.0, 0, 1).astype(np.float32)
            out.append(np.stack([1 - p, p]))
        return out

    model.class_names = ("low", "high")  # type: ignore[attr-defined]
    return model


def independent_blend(pixels: np.ndarray, grid: TileGrid) -> np.ndarray:
    """Class-1 probability by summing every tile of the grid over the whole (small) image."""
    spec_model = tile_constant()
    size, overlap = grid.tile_size, grid.overlap
    ramp = np.array([min(1.0, (min(i, size - 1 - i) + 1) / (overlap + 1)) for i in range(size)])
    weight = np.outer(ramp, ramp)
    acc = np.zeros(pixels.shape[1:])
    total = np.zeros(pixels.shape[1:])
    for y in grid.y.origins:
        for x in grid.x.origins:
            tile = np.zeros((size, size, 1), np.uint8)
            part = pixels[0, y:y + size, x:x + size]
            tile[:part.shape[0], :part.shape[1], 0] = part
            p = spec_model(tile[None], np.array([[x, y]]))[0][1]
            h, w = part.shape
            acc[y:y + h, x:x + w] += (weight * p)[:h, :w]
            total[y:y + h, x:x + w] += weight[:h, :w]
    return acc / total


@pytest.mark.parametrize("mode", ["BLEND", "CORE"])
def test_stitching_against_independent_computation(mode: str) -> None:
    rng = np.random.default_rng(7)
    width, height = 1300, 900
    pixels = rng.integers(0, 256, size=(1, height, width), dtype=np.uint8)
    spec = ModelSpec("PYTHON", "tests.test_segmentation:tile_constant")
    results = []
    for target in (192, 384, 2048):  # chunk sides of 1, 2 and many tile strides
        grid = TileGrid(width, height, 256, 64, chunk_size(256, 64, target))
        scores = np.zeros((2, height, width), np.float32)
        for row in range(grid.chunks_y):
            for col in range(grid.chunks_x):
                bounds = grid.chunk_bounds(row, col)
                x0, y0, x1, y1 = read_window(covering_tiles(grid, bounds, mode), bounds)
                stitched = stitch_chunk(pixels[:, y0:y1, x0:x1], (x0, y0), bounds, grid, spec, mode)
                assert not stitched.failed_tiles
                b = stitched.bounds
                scores[:, b[1]:b[3], b[0]:b[2]] = stitched.scores
        results.append(scores)
    for scores in results[1:]:
        np.testing.assert_array_equal(scores, results[0])  # bit for bit
    if mode == "BLEND":
        expected = independent_blend(pixels, grid)
    else:  # each pixel from the tile whose core (middle of overlap to middle of overlap) holds it
        stride = 256 - 64
        tx = np.minimum((np.arange(width) + 0.5 - (stride + 256) / 2) // stride + 1, grid.tiles_x - 1)
        ty = np.minimum((np.arange(height) + 0.5 - (stride + 256) / 2) // stride + 1, grid.tiles_y - 1)
        tx, ty = np.maximum(tx, 0).astype(int), np.maximum(ty, 0).astype(int)
        expected = np.zeros((height, width))
        model = tile_constant()
        for j in range(grid.tiles_y):
            for i in range(grid.tiles_x):
                x, y = i * stride, j * stride
                tile = np.zeros((256, 256, 1), np.uint8)
                part = pixels[0, y:y + 256, x:x + 256]
                tile[:part.shape[0], :part.shape[1], 0] = part
                p = model(tile[None], np.array([[x, y]]))[0][1]
                sel = (ty[:, None] == j) & (tx[None, :] == i)
                rows, cols = np.nonzero(sel)
                expected[rows, cols] = p[rows - y, cols - x]
    np.testing.assert_allclose(results[0][1], expected, atol=2e-6)
    np.testing.assert_allclose(results[0][0], 1 - expected, atol=2e-6)


def test_region_of_interest_reads_only_its_chunks(scene: tuple[Path, np.ndarray], tmp_path: Path,
                                                   dask_client: Any) -> None:
    """An ROI over the left half (x < 3200): the truth inside, nodata outside, polygons clipped
    to it; the chunks that miss it are never read: their blocks are corrupted in the file."""
    url, truth = scene
    corrupted = tmp_path / "corrupted.tif"
    corrupted.write_bytes(url.read_bytes())
    with rasterio.open(corrupted) as src:  # every 512-px block at x >= 4608: garbage
        blocks = [(int(src.get_tag_item(f"BLOCK_OFFSET_{i}_{j}", "TIFF", bidx=1)),
                   int(src.get_tag_item(f"BLOCK_SIZE_{i}_{j}", "TIFF", bidx=1)))
                  for i in range(9, -(-WIDTH // 512)) for j in range(-(-HEIGHT // 512))]
    with open(corrupted, "r+b") as raw:
        for offset, size in blocks:
            raw.seek(offset)
            raw.write(b"\xff" * size)
    # without an ROI the corrupted blocks are read and their tiles fail
    whole = run_segmentation(request(corrupted, tmp_path / "whole", "whole", "ids", stitch="CORE"),
                             dask_client, chunk_target=2048)
    assert whole.status != "SUCCESS" and whole.images[0].failed_tiles

    to_lonlat = Transformer.from_crs(32617, 4326, always_xy=True)
    corners = [(0, 0), (3200, 0), (3200, HEIGHT), (0, HEIGHT)]
    roi = shapely.Polygon([to_lonlat.transform(*(TRANSFORM * c)) for c in corners]).wkt
    job = request(corrupted, tmp_path, "roi", "ids", stitch="CORE").model_copy(
        update={"region_of_interest": roi})
    result = run_segmentation(job, dask_client, chunk_target=2048)
    assert result.status == "SUCCESS", result.summary
    grid = TileGrid(WIDTH, HEIGHT, TILE, OVERLAP, chunk_size(TILE, OVERLAP, 2048))
    assert grid.chunks_x == 3  # chunks of 2112 px: the third starts at 4224, right of the ROI
    assert result.images[0].chunks_read == 2 * grid.chunks_y
    with rasterio.open(result.images[0].rasters[0]) as src:
        assert src.nodata == 255
        classes = src.read(1)
    np.testing.assert_array_equal(classes[:, :3200], truth[:, :3200])
    assert (classes[:, 3200:] == 255).all()
    half = shapely.box(0, 0, 3200, HEIGHT)
    polygons = pixel_polygons(result.features)
    inside = {name: shapely.intersection(truth_polygon(shape), half) for name, shape in SHAPES.items()
              if shapely.intersects(truth_polygon(shape), half)}
    assert len(polygons) == len(inside) == 6  # disc-4032 lies outside; strip-h is cut at x = 3200
    for name, clipped in inside.items():
        best = max(polygons, key=lambda p, t=clipped: iou(p, t))
        assert iou(best, clipped) >= 0.99, name
    assert max(shapely.bounds(np.array(polygons))[:, 2]) == 3200
