"""Tiling strategies: OSML 2.x's VARIABLE_OVERLAP grid, checked against numbers worked out by
hand from OSML 2.3's ``VariableOverlapTilingStrategy`` and against OSML's own integration-test
results; the ownership rule on uneven strides; the request field, CLI flag and queue default."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from graphs.image_job import plan_image, run_job
from pipeline.demo import DEMO_CRS, DEMO_ORIGIN, DEMO_RESOLUTION, match_truth
from pipeline.detections import Detections
from pipeline.merge import border_mask
from pipeline.request import ImageRequest, RequestError
from pipeline.tiling import (
    FIXED_STRIDE,
    VARIABLE_OVERLAP,
    TileGrid,
    chunk_size,
    owned,
    processing_bounds,
)

# scene: 512 px, 128/16, 12 objects: the fixed stride is 112 (the last tile clipped), OSML's 96
from tests.test_queue_worker import (  # noqa: F401 - fixtures
    allow_list,
    queues,
    request_body,
    scene,
    worker,
)
from tests.test_tiling import _non_touching, _planted, _run_chunks, grid_edges, planted_at_edges


def vo_grid(width: int, height: int, tile: int = 512, overlap: int = 128, chunk_target: int = 2000,
            bounds: tuple[int, int, int, int] | None = None) -> TileGrid:
    return TileGrid(width, height, tile, overlap, chunk_size(tile, overlap, chunk_target),
                    VARIABLE_OVERLAP, bounds)


def all_windows(grid: TileGrid) -> np.ndarray:
    parts = [grid.chunk_tiles(r, c) for r in range(grid.chunks_y) for c in range(grid.chunks_x)]
    return np.concatenate(parts) if parts else np.empty((0, 4), dtype=np.int64)


# ------------------------------------------------------------------ OSML's numbers
def test_osml_integration_image_strides_358_across_and_344_down() -> None:
    # 3376 = 512 + 8 * 358 and 2576 = 512 + 6 * 344: 9 x 7 full tiles, overlaps 154 and 168
    grid = vo_grid(3376, 2576)
    assert grid.x.origins.tolist() == [358 * k for k in range(9)]
    assert grid.y.origins.tolist() == [344 * k for k in range(7)]
    windows = all_windows(grid)
    assert len(windows) == grid.n_tiles == 63 == len(np.unique(windows, axis=0))
    assert ((windows[:, 2] - windows[:, 0]) == 512).all() and ((windows[:, 3] - windows[:, 1]) == 512).all()
    assert grid.extent == (0, 0, 3376, 2576)


#: ``imageBBox`` x and y minima of the 63 features of OSML's expected results for its
#: integration test (awslabs/osml-model-runner-test, src/data/centerpoint.small.tif.geojson:
#: image 3376 x 2576, tile 512, overlap 128): the set of boxes is exactly these 9 x 7 pairs.
#: The centerpoint model returns one box of 0.2 T a side centred on its tile, so a tile's
#: origin is ``min - (T / 2 - 0.1 T) = min - 204.8``.
CENTERPOINT_X_MIN = [204.8, 562.8, 920.8, 1278.8, 1636.8, 1994.8, 2352.8, 2710.8, 3068.8]
CENTERPOINT_Y_MIN = [204.8, 548.8, 892.8, 1236.8, 1580.8, 1924.8, 2268.8]


def test_grid_has_the_tiles_of_osml_centerpoint_results() -> None:
    grid = vo_grid(3376, 2576)
    windows = all_windows(grid)
    tiles = {(round(x - 204.8), round(y - 204.8)) for x in CENTERPOINT_X_MIN for y in CENTERPOINT_Y_MIN}
    assert len(tiles) == 63
    assert {(int(x), int(y)) for x, y in windows[:, :2]} == tiles
    # every centre box is owned by its tile: the grid keeps all 63, once each
    boxes = np.array([[x + 204.8, y + 204.8, x + 307.2, y + 307.2] for x, y in sorted(tiles)])
    found = []
    for window, core in zip(windows, grid.cores(windows), strict=True):
        inside = (boxes[:, :2] >= window[:2]).all(axis=1) & (boxes[:, 2:] <= window[2:]).all(axis=1)
        n = int(inside.sum())
        found.append(owned(Detections(boxes[inside], np.ones(n), ["c"] * n), window, core, grid).boxes)
    assert sorted(map(tuple, np.concatenate(found).tolist())) == sorted(map(tuple, boxes.tolist()))


def test_grid_has_the_tiles_of_osml_expected_results_file() -> None:
    expected = Path(__file__).parent / "data" / "osml" / "centerpoint.small.tif.geojson"
    if not expected.exists():
        pytest.skip(f"{expected} is not here")
    features = json.loads(expected.read_text())["features"]
    boxes = [f["properties"]["imageBBox"] for f in features]
    origins = {(round(x - 204.8), round(y - 204.8)) for x, y, *_ in boxes}
    assert len(features) == len(origins) == 63
    assert {(int(x), int(y)) for x, y in all_windows(vo_grid(3376, 2576))[:, :2]} == origins


@pytest.mark.parametrize(("size", "x", "y"), [
    # smaller than a tile both ways: one clipped tile
    ((300, 200), ([0], [300]), ([0], [200])),
    # 1001 wide, 300 high (no full tile): crops at the spread overlap 128 + ceil(279 / 2) = 268,
    # stride 244, clipped to the image, kept where longer than 268 (the 25 px one is not)
    ((1001, 300), ([0, 244, 488, 732], [512, 756, 1000, 1001]), ([0], [300])),
    # 1001 x 1001: full tiles only; the bounds end with the last one, column 1000 is in none
    ((1001, 1001), ([0, 244, 488], [512, 756, 1000]), ([0, 244, 488], [512, 756, 1000])),
    # exact fits: 1280 = 512 + 2 * 384 is the fixed grid; 1152 spreads 3 tiles at 320
    ((1280, 1152), ([0, 384, 768], [512, 896, 1280]), ([0, 320, 640], [512, 832, 1152])),
    # no longer than the overlap across: OSML makes no tile at all (down, alone, the spread
    # overlap 128 + 296 = 424 would give crops at 0 and 88)
    ((100, 600), ([], []), ([0, 88], [512, 600])),
    # regions: 10499 spreads at 143 (stride 369) into regions of 27 * 369 + 143 = 10106 from 0
    # and 9963; the first region, tiled on its own, spreads at 129 (stride 383), the second
    # is one tile; columns 10475.. are in no tile
    ((10499, 600), ([383 * k for k in range(26)] + [9963], [383 * k + 512 for k in range(26)] + [10475]),
     ([0, 88], [512, 600])),
])
def test_variable_overlap_axes(size, x, y) -> None:
    grid = vo_grid(*size)
    assert (grid.x.origins.tolist(), grid.x.ends.tolist()) == x
    assert (grid.y.origins.tolist(), grid.y.ends.tolist()) == y
    assert grid.n_tiles == len(x[0]) * len(y[0]) == len(all_windows(grid))


def test_fixed_stride_is_the_old_grid() -> None:
    grid = TileGrid(1001, 300, 512, 128, 384)
    assert (grid.x.origins.tolist(), grid.x.ends.tolist()) == ([0, 384, 768], [512, 896, 1001])
    assert (grid.y.origins.tolist(), grid.y.ends.tolist()) == ([0], [300])


def test_roi_processing_bounds_are_osmls_rounded_corner_and_size() -> None:
    assert processing_bounds((10.5, 3.5, 20.2, 9.7), 100, 100) == (10, 4, 20, 10)  # half to even
    assert processing_bounds((0.4, 0.0, 99.9, 50.0), 99, 50) == (0, 0, 99, 50)  # within the image
    # a grid over bounds (120, 37)-(1121, 337) is the 1001 x 300 grid moved there
    grid = vo_grid(2000, 1000, bounds=(120, 37, 1121, 337))
    assert grid.x.origins.tolist() == [120, 364, 608, 852] and grid.x.ends.tolist()[-1] == 1121
    assert grid.y.origins.tolist() == [37] and grid.y.ends.tolist() == [337]


@pytest.mark.parametrize(("width", "height", "tile", "overlap"),
                         [(3376, 2576, 512, 128), (1001, 300, 512, 128), (700, 650, 128, 40),
                          (257, 129, 64, 5), (90, 600, 64, 48)])
def test_cores_partition_the_grid_and_reach_the_middle_of_each_overlap(width, height, tile, overlap):
    grid = vo_grid(width, height, tile, overlap, chunk_target=300)
    windows = all_windows(grid)
    gx0, gy0, gx1, gy1 = grid.extent
    assert (windows[:, 0] >= gx0).all() and (windows[:, 2] <= gx1).all() and (windows[:, 3] <= gy1).all()
    cores = grid.cores(windows)
    ys, xs = np.mgrid[gy0:gy1, gx0:gx1] + 0.5
    count = np.zeros(xs.shape, dtype=int)
    for cx0, cy0, cx1, cy1 in cores:
        count += (xs >= cx0) & (xs < cx1) & (ys >= cy0) & (ys < cy1)
    assert (count == 1).all()
    # each inner core edge is the middle of two neighbours' overlap, at least overlap / 2 inside both
    for axis in (grid.x, grid.y):
        for k in range(axis.count - 1):
            middle = (axis.origins[k + 1] + axis.ends[k]) / 2
            assert axis.cuts[k] == middle
            assert middle - axis.origins[k + 1] >= overlap / 2 and axis.ends[k] - middle >= overlap / 2


@pytest.mark.parametrize("strategy", [FIXED_STRIDE, VARIABLE_OVERLAP])
def test_border_boxes_are_all_that_can_touch_another_chunks_boxes(strategy) -> None:
    grid = TileGrid(1100, 900, 128, 40, chunk_size(128, 40, 200), strategy)
    assert grid.chunks_x > 2 and grid.chunks_y > 2
    rng = np.random.default_rng(4)
    boxes, owner = [], []
    for row in range(grid.chunks_y):
        for col in range(grid.chunks_x):
            for x0, y0, x1, y1 in grid.chunk_tiles(row, col):  # boxes anywhere in the chunk's tiles
                for _ in range(6):
                    a, b = np.sort(rng.uniform(x0, x1, 2))
                    c, d = np.sort(rng.uniform(y0, y1, 2))
                    boxes.append([a, c, b, d])
                    owner.append((row, col))
    boxes_arr = np.array(boxes)
    flagged = np.zeros(len(boxes), dtype=bool)
    for chunk in set(owner):
        mine = np.array([o == chunk for o in owner])
        flagged[mine] = border_mask(boxes_arr[mine], grid.chunk_reach(*chunk))
    from pipeline.merge import overlapping_pairs

    i, j, _ = overlapping_pairs(boxes_arr)
    across = np.array([owner[a] != owner[b] for a, b in zip(i, j, strict=True)])
    assert across.sum() > 100
    assert flagged[i[across]].all() and flagged[j[across]].all()
    assert not flagged.all()  # and most boxes are settled within their chunk


@pytest.mark.parametrize(("width", "height"), [(700, 520), (517, 261), (1001, 300)])
@pytest.mark.parametrize(("tile", "overlap", "chunk_target"), [(128, 40, 150), (100, 30, 400), (64, 20, 60)])
def test_variable_overlap_objects_across_tile_and_chunk_edges_found_once(width, height, tile, overlap,
                                                                         chunk_target) -> None:
    grid = vo_grid(width, height, tile, overlap, chunk_target)
    boxes = planted_at_edges(grid, overlap - 3)
    assert len(boxes) >= len(grid_edges(grid, "x"))
    found = _run_chunks(_planted(width, height, boxes), grid)
    assert sorted(map(tuple, found.boxes.tolist())) == sorted(tuple(float(v) for v in b) for b in boxes)


# ------------------------------------------------------------------ a job, the request, the CLI
def _scene(path: Path, width: int, height: int, tile: int, overlap: int, chunk_target: int,
           ) -> tuple[Path, np.ndarray]:
    """A GeoTIFF with bright squares straddling every edge of both strategies' grids."""
    boxes: list[tuple[int, int, int, int]] = []
    for strategy in (FIXED_STRIDE, VARIABLE_OVERLAP):
        grid = TileGrid(width, height, tile, overlap, chunk_size(tile, overlap, chunk_target), strategy)
        boxes += planted_at_edges(grid, overlap - 4)
    boxes = _non_touching(boxes)
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=1, dtype="uint8",
                       crs=DEMO_CRS, transform=from_origin(*DEMO_ORIGIN, DEMO_RESOLUTION,
                                                           DEMO_RESOLUTION)) as dst:
        dst.write(_planted(width, height, boxes))
    return path, np.array(boxes, dtype=np.float64)


def _wire(path: Path, **extra: Any) -> dict[str, Any]:
    return {"jobId": "tiling", "imageUrls": [str(path)],
            "imageProcessor": {"name": "bright-objects", "type": "BUILTIN"},
            "imageProcessorTileSize": 128, "imageProcessorTileOverlap": 40, **extra}


@pytest.mark.parametrize("strategy", [FIXED_STRIDE, VARIABLE_OVERLAP])
def test_job_finds_every_object_once_with_either_strategy(strategy, tmp_path, dask_client) -> None:
    path, truth = _scene(tmp_path / "edges.tif", 902, 695, 128, 40, 200)  # VO covers all
    request = ImageRequest.parse(_wire(path, tilingStrategy=strategy))
    for chunk_target in (200, 500):
        result = run_job(request, dask_client, chunk_target=chunk_target)
        assert result.status == "SUCCESS"
        boxes = np.array(list(result.features["imageBBox"]), dtype=float)
        assert match_truth(boxes, truth) == (len(truth), 0, 0) and len(boxes) == len(truth)
        image = result.summary["images"][0]
        grid = plan_image(request, str(path), chunk_target).grid
        assert image["tiling"] == {"strategy": strategy, "tilesAcross": grid.tiles_x,
                                   "tilesDown": grid.tiles_y}
        assert image["tiles"] == grid.n_tiles


def test_request_field_is_optional_named_and_checked(tmp_path) -> None:
    path = tmp_path / "x.tif"
    assert ImageRequest.parse(_wire(path)).tiling_strategy is None
    request = ImageRequest.parse(_wire(path, tilingStrategy="variable_overlap"))
    assert request.tiling_strategy == VARIABLE_OVERLAP
    assert request.to_wire()["tilingStrategy"] == VARIABLE_OVERLAP
    assert "tilingStrategy" not in ImageRequest.parse(_wire(path)).to_wire()
    with pytest.raises(RequestError, match="^invalid request: tilingStrategy: ") as err:
        ImageRequest.parse(_wire(path, tilingStrategy="SPIRAL"))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown tiling strategy 'SPIRAL'"):
        TileGrid(10, 10, 4, 0, 4, "SPIRAL")


def test_cli_flag() -> None:
    from pipeline.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["run", "r.json", "--tiling", "variable_overlap"]).tiling == VARIABLE_OVERLAP
    assert parser.parse_args(["run", "r.json"]).tiling is None
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "r.json", "--tiling", "spiral"])


def test_api_detect_keyword(tmp_path) -> None:
    from pipeline.api import detect

    path, truth = _scene(tmp_path / "edges.tif", 602, 503, 128, 40, 10_000)  # VO covers all
    for strategy in (FIXED_STRIDE, VARIABLE_OVERLAP):
        features = detect(str(path), "bright-objects", tile_size=128, overlap=40, tiling=strategy)
        boxes = np.array(list(features["imageBBox"]), dtype=float)
        assert match_truth(boxes, truth) == (len(truth), 0, 0) and len(boxes) == len(truth)


def test_queue_worker_gives_unnamed_requests_osml_tiling(scene, queues, tmp_path, dask_client) -> None:  # noqa: F811
    bodies = {"unnamed": request_body(scene, "unnamed", [{"type": "LOCAL", "path": str(tmp_path)}]),
              "named": request_body(scene, "named", [{"type": "LOCAL", "path": str(tmp_path)}],
                                    tilingStrategy=FIXED_STRIDE)}
    for body in bodies.values():
        queues.sqs.send_message(QueueUrl=queues.requests, MessageBody=body)
    stats = worker(queues, dask_client, chunk_target=224).run()
    assert stats.succeeded == 2
    strategies = {}
    for job in bodies:
        summary = json.loads((tmp_path / f"{job}.summary.json").read_text())
        assert summary["features"] == len(scene.truth)
        strategies[job] = summary["images"][0]["tiling"]["strategy"]
    assert strategies == {"unnamed": VARIABLE_OVERLAP, "named": FIXED_STRIDE}



def test_roi_grid_covers_the_rois_rounded_bounds_as_osml(tmp_path) -> None:
    import shapely

    from pipeline.reading import describe
    from pipeline.sensor_models import sensor_model

    path, _ = _scene(tmp_path / "roi.tif", 902, 695, 256, 48, 10_000)
    model = sensor_model(describe(str(path)))
    xs, ys = np.array([100.3, 700.2, 700.2, 100.3]), np.array([150.6, 150.6, 650.4, 650.4])
    roi = shapely.Polygon(np.column_stack(model.pixel_to_lonlat(xs, ys))).wkt
    wire = {**_wire(path, regionOfInterest=roi), "imageProcessorTileSize": 256,
            "imageProcessorTileOverlap": 48}
    fixed = plan_image(ImageRequest.parse(wire), str(path)).grid
    assert fixed.bounds is None and fixed.x.origins[0] == 0  # the whole image, ROI chunks only
    grid = plan_image(ImageRequest.parse({**wire, "tilingStrategy": VARIABLE_OVERLAP}), str(path)).grid
    # bounds (100, 151) + (600, 500); 600 spreads at 48 + 72 / 2 = 84 (stride 172), 500 at
    # 48 + 172 / 2 = 134 (stride 122)
    assert grid.bounds == (100, 151, 700, 651)
    assert (grid.x.origins.tolist(), grid.x.ends.tolist()) == ([100, 272, 444], [356, 528, 700])
    assert (grid.y.origins.tolist(), grid.y.ends.tolist()) == ([151, 273, 395], [407, 529, 651])
