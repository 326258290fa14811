"""A real HTTP endpoint on 127.0.0.1 that misbehaves per tile; the job ends PARTIAL and lists
exactly the tiles that failed, each with a one-line reason."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from graphs.image_job import run_job
from pipeline.request import ImageRequest
from pipeline.security import MAX_DETECTIONS_PER_TILE
from tests import hostile_server as hs

TILE = 64
GRID = 4  # 4 × 4 tiles, no overlap
#: tile (row, col) → behaviour code; the other tiles answer one box
LAYOUT = {
    (0, 0): hs.ERROR_500, (0, 1): hs.THROTTLE_429, (0, 2): hs.FLAKY, (0, 3): hs.RESET,
    (1, 0): hs.TIMEOUT, (1, 1): hs.INVALID_JSON, (1, 2): hs.NAN, (1, 3): hs.HUGE_COORDS,
    (2, 0): hs.NEGATIVE, (2, 1): hs.EMPTY_200, (2, 2): hs.WRONG_SHAPE,
    (2, 3): hs.TRICKLE, (3, 0): hs.HUGE, (3, 1): hs.MANY_BOXES,
}
#: what the one-line reason of each failing tile says
REASONS = {
    hs.ERROR_500: "HTTP 500 (internal error)", hs.THROTTLE_429: "HTTP 429", hs.RESET: "connection",
    hs.TIMEOUT: "timed out", hs.INVALID_JSON: "not JSON", hs.NAN: "NaN",
    hs.HUGE_COORDS: "outside", hs.NEGATIVE: "outside", hs.EMPTY_200: "not JSON",
    hs.WRONG_SHAPE: "FeatureCollection",
}
SUCCEEDING = {hs.OK, hs.FLAKY}
MAX_RETRIES = 2


def _window(row: int, col: int) -> list[int]:
    return [col * TILE, row * TILE, (col + 1) * TILE, (row + 1) * TILE]


@pytest.fixture(scope="module")
def server() -> Iterator[hs.HostileServer]:
    with hs.hostile_server() as server:
        yield server


@pytest.fixture(scope="module")
def outcome(server: hs.HostileServer, dask_client: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    d = tmp_path_factory.mktemp("hostile")
    pixels = np.full((1, GRID * TILE, GRID * TILE), hs.OK, dtype=np.uint8)
    for (row, col), code in LAYOUT.items():
        pixels[0, row * TILE : (row + 1) * TILE, col * TILE : (col + 1) * TILE] = code
    image = d / "painted.tif"
    with rasterio.open(image, "w", driver="GTiff", width=GRID * TILE, height=GRID * TILE, count=1,
                       dtype="uint8", crs="EPSG:4326", transform=from_origin(0, 1, 1e-4, 1e-4)) as dst:
        dst.write(pixels)
    request = ImageRequest.parse({
        "jobId": "hostile",
        "imageUrls": [str(image)],
        "outputs": [{"type": "LOCAL", "path": str(d / "out")}],
        "imageProcessor": {"name": server.url, "type": "HTTP_ENDPOINT"},
        "imageProcessorParameters": {"timeout": 1, "maxRetries": MAX_RETRIES, "retryBaseDelay": 0.01,
                                     "retryMaxDelay": 0.05, "maxConcurrency": 4},
        "imageProcessorTileSize": TILE,
        "imageProcessorTileOverlap": 0,
        "rangeAdjustment": "NONE",
        "postProcessing": [],
    })
    return run_job(request, dask_client, chunk_target=2 * TILE)


def _failed(outcome: Any) -> dict[tuple[int, ...], str]:
    image = outcome.summary["images"][0]
    return {tuple(t["window"]): t["reason"] for t in image["failedTiles"]}


def test_the_job_is_partial_and_lists_the_failing_tiles(outcome: Any) -> None:
    assert outcome.status == "PARTIAL"
    failed = _failed(outcome)
    for (row, col), code in LAYOUT.items():
        window = tuple(_window(row, col))
        if code in REASONS:
            assert window in failed, f"{hs.BEHAVIOURS[code]} at tile {row, col} did not fail"
            reason = failed[window]
            assert REASONS[code] in reason and "\n" not in reason, (hs.BEHAVIOURS[code], reason)
        elif code in SUCCEEDING:
            assert window not in failed, (hs.BEHAVIOURS[code], failed.get(window))
    ok_tiles = [(r, c) for r in range(GRID) for c in range(GRID) if LAYOUT.get((r, c), hs.OK) == hs.OK]
    assert all(tuple(_window(r, c)) not in failed for r, c in ok_tiles)


def test_features_come_from_the_tiles_that_answered(outcome: Any) -> None:
    boxes = np.array(list(outcome.features["imageBBox"]), dtype=float).reshape(-1, 4)
    assert np.isfinite(boxes).all() and (boxes >= 0).all() and (boxes <= GRID * TILE).all()
    for row in range(GRID):
        for col in range(GRID):
            code = LAYOUT.get((row, col), hs.OK)
            x0, y0, x1, y1 = _window(row, col)
            inside = (boxes[:, 0] >= x0) & (boxes[:, 2] <= x1) & (boxes[:, 1] >= y0) & (boxes[:, 3] <= y1)
            if code in SUCCEEDING:
                assert inside.sum() == 1 and boxes[inside][0].tolist() == [x0 + 10, y0 + 10, x0 + 20, y0 + 20]
            elif code in REASONS:
                assert inside.sum() == 0


def test_transient_faults_are_retried_and_permanent_ones_are_not(
    outcome: Any, server: hs.HostileServer
) -> None:
    assert outcome is not None
    calls = server.calls
    assert calls[hs.FLAKY] == 3  # two 500s, then the answer
    assert calls[hs.ERROR_500] == MAX_RETRIES + 1
    assert calls[hs.THROTTLE_429] == MAX_RETRIES + 1
    assert calls[hs.TIMEOUT] == MAX_RETRIES + 1
    for code in (hs.INVALID_JSON, hs.NAN, hs.HUGE_COORDS, hs.NEGATIVE, hs.WRONG_SHAPE):
        assert calls[code] == 1, hs.BEHAVIOURS[code]


def test_a_slow_trickle_hits_a_total_deadline(outcome: Any) -> None:
    reason = _failed(outcome).get(tuple(_window(2, 3)))
    assert reason is not None, "the HTTP adapter has no total deadline"
    assert "timed out" in reason


def test_a_huge_response_is_refused_at_the_cap(outcome: Any) -> None:
    reason = _failed(outcome).get(tuple(_window(3, 0)))
    assert reason is not None
    assert "larger than" in reason, reason


def test_boxes_per_tile_are_capped_and_counted(outcome: Any) -> None:
    image = outcome.summary["images"][0]
    x0, y0, x1, y1 = _window(3, 1)
    boxes = np.array(list(outcome.features["imageBBox"]), dtype=float).reshape(-1, 4)
    inside = (boxes[:, 0] >= x0) & (boxes[:, 2] <= x1) & (boxes[:, 1] >= y0) & (boxes[:, 3] <= y1)
    # the cap applies to what the model returned; ownership and NMS may then drop a few more
    assert 0.95 * MAX_DETECTIONS_PER_TILE <= inside.sum() <= MAX_DETECTIONS_PER_TILE
    assert image["detections"].get("dropped", 0) == hs.MANY - MAX_DETECTIONS_PER_TILE


def test_the_summary_carries_no_endpoint_body(outcome: Any, tmp_path: Path) -> None:
    text = str(outcome.summary)
    assert "traceback line" not in text  # only the first line of an error body is kept


def _tile_bytes(code: int) -> bytes:
    from rasterio.io import MemoryFile

    with MemoryFile() as memory:
        with memory.open(driver="GTiff", width=8, height=8, count=1, dtype="uint8") as dst:
            dst.write(np.full((1, 8, 8), code, dtype=np.uint8))
        return bytes(memory.read())


def test_read_response_caps_size_and_total_time(server: hs.HostileServer) -> None:
    """The helper that the HTTP adapter can use: refuses a huge body and a slow trickle."""
    import requests

    from pipeline.security import read_response

    huge = requests.post(server.url, data=_tile_bytes(hs.HUGE), stream=True, timeout=5)
    with pytest.raises(ValueError, match="larger than 1048576 bytes"):
        read_response(huge, limit=1 << 20)
    trickle = requests.post(server.url, data=_tile_bytes(hs.TRICKLE), stream=True, timeout=5)
    with pytest.raises(TimeoutError, match="not complete after 0.5 s"):
        read_response(trickle, deadline=0.5)
    ok = requests.post(server.url, data=_tile_bytes(hs.OK), stream=True, timeout=5)
    assert b'"imageBBox": [10, 10, 20, 20]' in read_response(ok, deadline=5)


def test_a_model_server_restarted_mid_job(dask_client: Any, tmp_path: Path) -> None:
    """The endpoint dies mid-job (listener gone, connections cut) and comes back on the same
    port 0.3 s later: the tiles in between are retried, and nothing is lost."""
    import threading
    import time

    first = hs.start(delay=0.05)
    port = first.server_address[1]
    size = 6 * TILE
    image = tmp_path / "plain.tif"
    with rasterio.open(image, "w", driver="GTiff", width=size, height=size, count=1, dtype="uint8",
                       crs="EPSG:4326", transform=from_origin(0, 1, 1e-4, 1e-4)) as dst:
        dst.write(np.full((1, size, size), hs.OK, dtype=np.uint8))
    request = ImageRequest.parse({
        "jobId": "restart",
        "imageUrls": [str(image)],
        "outputs": [{"type": "LOCAL", "path": str(tmp_path / "out")}],
        "imageProcessor": {"name": first.url, "type": "HTTP_ENDPOINT"},
        "imageProcessorParameters": {"timeout": 2, "maxRetries": 10, "retryBaseDelay": 0.1,
                                     "retryMaxDelay": 0.5, "maxConcurrency": 1},
        "imageProcessorTileSize": TILE,
        "imageProcessorTileOverlap": 0,
        "postProcessing": [],
    })
    outcome: dict[str, Any] = {}
    job = threading.Thread(target=lambda: outcome.setdefault(
        "result", run_job(request, dask_client, chunk_target=2 * TILE)))
    job.start()
    second = None
    try:
        stop = time.monotonic() + 60
        while sum(first.calls.values()) < 8:
            assert time.monotonic() < stop and job.is_alive(), "the job never reached the server"
            time.sleep(0.02)
        first.kill()
        time.sleep(0.3)
        second = hs.start(port=port, delay=0.05)
        job.join(120)
    finally:
        if second is not None:
            second.shutdown()
            second.server_close()
    result = outcome["result"]
    assert result.status == "SUCCESS", result.summary["images"][0]["failedTiles"][:3]
    assert len(result.features) == 36
    assert sum(first.calls.values()) < 36 and sum(second.calls.values()) > 0
