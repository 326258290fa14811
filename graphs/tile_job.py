"""The tile-list job (chip-n-scale style): XYZ map tiles → a model → lon/lat features.

Tiles come from a list (``z/x/y`` or ``x-y-z`` lines) or a bbox and zoom (``mercantile``). Each
Dask task fetches a part of the list with bounded concurrency and retries (HTTP(S), ``s3://`` or
local templates), decodes the tiles, runs the model over them in batches and geolocates the
boxes. Outputs: GeoParquet with every detection (one row per tile per detection: ``tile``,
``class``, ``score``, lon/lat polygon) and GeoJSON with only the detections above the per-class
thresholds (chip-n-scale's ``download`` + ``convert``), plus the summary with the failed tiles.
With a LOCAL output, finished parts are kept beside it so that ``resume`` redoes only the
parts that are missing or had failed tiles.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import re
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import geopandas as gpd
import mercantile
import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

from pipeline import events as ev
from pipeline.detections import Detections
from pipeline.failures import one_line
from pipeline.geolocate import empty_features, to_features
from pipeline.infer import predict
from pipeline.models import ModelSpec, check_model, load_model
from pipeline.redact import public_url
from pipeline.request import ImageProcessor, Output, RequestError, StrictDocument
from pipeline.sensor_models import AffineSensorModel

log = logging.getLogger(__name__)

#: half the side of the web-mercator square, metres (EPSG:3857)
HALF_WORLD = math.pi * 6378137.0
_ZXY = re.compile(r"^(\d+)/(\d+)/(\d+)$")
_XYZ = re.compile(r"^(\d+)-(\d+)-(\d+)$")


def tile_id(tile: mercantile.Tile) -> str:
    return f"{tile.z}/{tile.x}/{tile.y}"


def parse_tiles(lines: Iterable[str], source: str = "tile list") -> list[mercantile.Tile]:
    """``z/x/y`` or ``x-y-z`` lines (blank lines and ``#`` comments skipped)."""
    tiles = []
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if match := _ZXY.match(line):
            z, x, y = map(int, match.groups())
        elif match := _XYZ.match(line):
            x, y, z = map(int, match.groups())
        else:
            raise RequestError(f"{source}: line {number}: expected z/x/y or x-y-z, got {line!r}")
        if not (0 <= x < 2**z and 0 <= y < 2**z):
            raise RequestError(f"{source}: line {number}: tile {line} is outside zoom {z}")
        tiles.append(mercantile.Tile(x, y, z))
    return tiles


def tile_url(template: str, tile: mercantile.Tile) -> str:
    return (template.replace("{z}", str(tile.z)).replace("{x}", str(tile.x))
            .replace("{y}", str(tile.y)))


class TileRequest(StrictDocument):
    """A tile-list job, in the request style (camelCase keys, strict)."""

    job_id: str = Field(min_length=1)
    imagery_url: str
    tiles: list[str] = Field(default_factory=list)
    tile_file: str | None = None
    bbox: tuple[float, float, float, float] | None = None
    zoom: int | None = Field(default=None, ge=0, le=30)
    image_processor: ImageProcessor
    image_processor_parameters: dict[str, Any] = Field(default_factory=dict)
    outputs: list[Output] = Field(default_factory=list)
    thresholds: dict[str, float] = Field(default_factory=dict)
    default_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    concurrency: int = Field(default=8, gt=0)
    retries: int = Field(default=3, ge=0)
    timeout: float = Field(default=10.0, gt=0)
    tiles_per_task: int = Field(default=64, gt=0)

    @field_validator("imagery_url")
    @classmethod
    def _template(cls, url: str) -> str:
        missing = [p for p in ("{z}", "{x}", "{y}") if p not in url]
        if missing:
            raise ValueError(f"must contain {', '.join(missing)}")
        return url

    @model_validator(mode="after")
    def _one_source(self) -> TileRequest:
        given = [bool(self.tiles), self.tile_file is not None, self.bbox is not None]
        if sum(given) != 1:
            raise ValueError("give exactly one of tiles, tileFile or bbox (with zoom)")
        if self.bbox is not None:
            west, south, east, north = self.bbox
            if self.zoom is None:
                raise ValueError("bbox needs zoom")
            if not (west < east and south < north and -180 <= west and east <= 180
                    and -90 <= south and north <= 90):
                raise ValueError(f"bbox must be W,S,E,N in degrees, got {list(self.bbox)}")
        return self

    def tile_list(self) -> list[mercantile.Tile]:
        """The tiles, without duplicates, in a stable order."""
        if self.bbox is not None:
            assert self.zoom is not None
            found: list[mercantile.Tile] = list(mercantile.tiles(*self.bbox, zooms=self.zoom))
        elif self.tile_file is not None:
            try:
                text = Path(self.tile_file).read_text()
            except OSError as exc:
                raise RequestError(f"cannot read tile list {self.tile_file}: {exc.strerror}") from None
            found = parse_tiles(text.splitlines(), self.tile_file)
        else:
            found = parse_tiles(self.tiles, "tiles")
        return sorted(set(found), key=lambda t: (t.z, t.y, t.x))

    def model_spec(self) -> ModelSpec:
        return ModelSpec(type=self.image_processor.type, name=self.image_processor.name,
                         parameters=dict(self.image_processor_parameters),
                         assumed_role=self.image_processor.assumed_role,
                         options=self.image_processor.spec_options)

    def threshold(self, classes: pd.Series) -> np.ndarray:
        """The export threshold of each class."""
        return classes.map(lambda c: self.thresholds.get(str(c), self.default_threshold)).to_numpy(
            dtype=np.float64)


# ---------------------------------------------------------------- fetching
class TileError(RuntimeError):
    """A tile that could not be fetched or decoded; ``str()`` is one line."""


_local = threading.local()


def _session(retries: int) -> Any:
    """A per-thread ``requests`` session that retries connection errors and 429/5xx."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    sessions: dict[int, Any] = _local.__dict__.setdefault("sessions", {})
    if retries not in sessions:
        session = requests.Session()
        retry = Retry(total=retries, backoff_factor=0.1, status_forcelist=(429, 500, 502, 503, 504),
                      allowed_methods=("GET",), raise_on_status=False)
        session.mount("http://", HTTPAdapter(max_retries=retry))
        session.mount("https://", HTTPAdapter(max_retries=retry))
        sessions[retries] = session
    return sessions[retries]


class S3Settings(dict[str, str]):
    """boto3 client arguments for ``s3://`` tiles, resolved in the client (Dask workers may
    have started before the AWS settings were made): endpoint and region, nothing secret (each
    worker signs with its own credentials, :func:`pipeline.aws.session`)."""


def s3_settings() -> S3Settings:
    """The caller's AWS endpoint and region for S3, as client arguments."""
    from pipeline import aws

    settings = S3Settings(region_name=aws.region())
    endpoint = aws.endpoint_url("s3")
    if endpoint:
        settings["endpoint_url"] = endpoint
    return settings


def _s3_client(settings: S3Settings) -> Any:
    clients: dict[str, Any] = _local.__dict__.setdefault("s3", {})
    key = json.dumps(settings, sort_keys=True)
    if key not in clients:
        from pipeline import aws

        owner = aws.session(region_name=settings.get("region_name"))
        clients[key] = owner.client("s3", **settings)
        aws.retry_expired_once(clients[key], aws.credentials(owner))
    return clients[key]


def fetch(url: str, retries: int = 3, timeout: float = 10.0,
          s3_settings: S3Settings | None = None) -> bytes:
    """The bytes of one tile (HTTP(S), ``s3://`` or a local path); :class:`TileError` if not."""
    if url.startswith(("http://", "https://")):
        import requests

        try:
            answer = _session(retries).get(url, timeout=timeout)
        except requests.RequestException as exc:
            reason = type(exc).__name__
            raise TileError(f"{reason} after {retries} retries: {url}") from None
        if answer.status_code != 200:
            raise TileError(f"HTTP {answer.status_code} {answer.reason}: {url}")
        return bytes(answer.content)
    if url.startswith("s3://"):
        from pipeline.aws import split_s3_url

        bucket, key = split_s3_url(url)
        s3 = _s3_client(s3_settings or S3Settings())
        try:
            return bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        except s3.exceptions.NoSuchKey:
            raise TileError(f"not found: {url}") from None
    path = url[len("file://"):] if url.startswith("file://") else url
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TileError(f"{exc.strerror}: {url}") from None


def decode(data: bytes, url: str) -> np.ndarray:
    """PNG/JPEG/WebP/... bytes → ``H × W × 3`` uint8."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise TileError(f"cannot decode {url}: {exc}") from None


# ---------------------------------------------------------------- one task
@dataclass
class TilePartResult:
    """What one part of the tile list produced."""

    part: int
    features: gpd.GeoDataFrame
    tiles: int = 0
    failed_tiles: list[dict[str, Any]] = field(default_factory=list)
    fetch_seconds: float = 0.0
    model_seconds: float = 0.0


def zoom_model(zoom: int, tile_size: int) -> AffineSensorModel:
    """Global pixels of zoom ``zoom`` (``tile_size`` px tiles) → EPSG:3857, as an affine."""
    resolution = 2 * HALF_WORLD / (tile_size * 2**zoom)
    return AffineSensorModel((resolution, 0.0, -HALF_WORLD, 0.0, -resolution, HALF_WORLD),
                             _web_mercator_wkt())


@functools.cache
def _web_mercator_wkt() -> str:
    from pyproj import CRS

    return str(CRS.from_epsg(3857).to_wkt())


def run_part(part: int, tiles: list[tuple[int, int, int]], template: str, spec: ModelSpec,
             job_id: str, concurrency: int = 8, retries: int = 3, timeout: float = 10.0,
             s3: S3Settings | None = None) -> TilePartResult:
    """Fetch, decode, infer and geolocate one part of the tile list (a Dask task)."""
    result = TilePartResult(part, empty_features(), tiles=len(tiles))
    wanted = [mercantile.Tile(x, y, z) for x, y, z in tiles]

    def load(tile: mercantile.Tile) -> np.ndarray | TileError:
        url = tile_url(template, tile)
        try:
            return decode(fetch(url, retries, timeout, s3), url)
        except TileError as exc:
            return exc

    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(concurrency, max(1, len(wanted)))) as pool:
        pixels = list(pool.map(load, wanted))
    result.fetch_seconds = time.perf_counter() - began

    good: dict[tuple[int, ...], list[tuple[mercantile.Tile, np.ndarray]]] = {}
    for tile, value in zip(wanted, pixels, strict=True):
        if isinstance(value, TileError):
            result.failed_tiles.append({"tile": tile_id(tile), "reason": str(value)})
        else:
            good.setdefault((tile.z, *value.shape), []).append((tile, value))

    frames = []
    batch_size = spec.batch_size or load_model(spec).batch_size
    for (zoom, height, width, _), group in good.items():
        found, local_boxes, tile_ids, urls = [], [], [], []
        for start in range(0, len(group), batch_size):
            batch = group[start : start + batch_size]
            stack = np.stack([p for _, p in batch])
            offsets = np.array([[t.x * width, t.y * height] for t, _ in batch], dtype=np.int64)
            began = time.perf_counter()
            outputs = predict(spec, stack, offsets)
            result.model_seconds += time.perf_counter() - began
            for (tile, _), offset, output in zip(batch, offsets, outputs, strict=True):
                if isinstance(output, BaseException):
                    result.failed_tiles.append({"tile": tile_id(tile), "reason": one_line(output)})
                    continue
                detections = Detections.coerce(output).finite()
                found.append(detections.shifted(offset[0], offset[1]))
                local_boxes.extend(detections.boxes.tolist())
                tile_ids += [tile_id(tile)] * len(detections)
                urls += [public_url(tile_url(template, tile))] * len(detections)
        merged = Detections.concat(found)
        if not len(merged):
            continue
        features = to_features(merged, zoom_model(zoom, width), image_url=template, job_id=job_id)
        features["imageBBox"] = local_boxes
        features["image_url"] = urls
        features.insert(1, "tile", tile_ids)
        features.insert(2, "class", merged.classes.astype(str))
        features.insert(3, "score", merged.scores)
        frames.append(features.drop(columns=["imageGeometry"]))
    if frames:
        result.features = gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs="EPSG:4326")
    return result


# ---------------------------------------------------------------- the job
@dataclass
class TileJobResult:
    """The features (all detections), the exported ones, the summary and the outputs."""

    features: gpd.GeoDataFrame
    exported: gpd.GeoDataFrame
    summary: dict[str, Any]
    outputs: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return str(self.summary["status"])


def parts_directory(request: TileRequest) -> Path | None:
    """Where finished parts are kept for resume: beside the first LOCAL output."""
    for output in request.outputs:
        if output.type == "LOCAL":
            return Path(output.path) / f".{request.job_id}.tiles"
    return None


def _save_part(directory: Path, result: TilePartResult) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"part-{result.part:06d}"
    if len(result.features):
        staged = stem.with_suffix(".parquet.partial")
        result.features.to_parquet(staged, index=False)
        staged.replace(stem.with_suffix(".parquet"))
    meta = {"tiles": result.tiles, "failedTiles": result.failed_tiles,
            "features": len(result.features), "fetchSeconds": result.fetch_seconds,
            "modelSeconds": result.model_seconds}
    staged = stem.with_suffix(".json.partial")
    staged.write_text(json.dumps(meta))
    staged.replace(stem.with_suffix(".json"))  # the part counts as done once this exists


def _load_part(directory: Path, part: int) -> TilePartResult | None:
    stem = directory / f"part-{part:06d}"
    try:
        meta = json.loads(stem.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    if meta["failedTiles"]:
        return None  # resume retries parts with failed tiles
    features = (gpd.read_parquet(stem.with_suffix(".parquet")) if meta["features"]
                else empty_features())
    return TilePartResult(part, features, meta["tiles"], meta["failedTiles"],
                          meta["fetchSeconds"], meta["modelSeconds"])


def run_tile_job(request: TileRequest, client: Any, *, progress: Any = None,
                 bus: ev.EventBus | None = None, resume: bool = False) -> TileJobResult:
    """Run a tile-list job on ``client`` and write its outputs."""
    from distributed import as_completed

    from graphs.model_targets import finish_model, prepare_model
    from pipeline.sinks import make_sink

    bus = bus or ev.EventBus()
    started = datetime.now(UTC)
    began = time.perf_counter()
    spec = request.model_spec()
    check_model(spec)
    spec = prepare_model(client, spec)  # endpoint settings, resources (fail fast), metrics
    resources = spec.options.get("resources") or None
    tiles = request.tile_list()
    parts = [[(t.x, t.y, t.z) for t in tiles[i : i + request.tiles_per_task]]
             for i in range(0, len(tiles), request.tiles_per_task)]
    directory = parts_directory(request)
    if directory is not None:
        plan = json.dumps({"imageryUrl": request.imagery_url, "model": spec.key,
                           "tilesPerTask": request.tiles_per_task,
                           "tiles": hashlib.sha256(" ".join(map(tile_id, tiles)).encode()).hexdigest()})
        recorded = directory / "plan.json"
        if resume and (not recorded.is_file() or recorded.read_text() != plan):
            log.warning("resume: %s belongs to another plan of job %s; starting over",
                        directory, request.job_id)
            resume = False
        if not resume and directory.exists():
            for old in directory.glob("part-*"):
                old.unlink()
        directory.mkdir(parents=True, exist_ok=True)
        recorded.write_text(plan)
    bus.emit(ev.STARTED, request.job_id, message=f"{len(tiles)} tiles in {len(parts)} parts")

    s3 = s3_settings() if request.imagery_url.startswith("s3://") else None
    results: list[TilePartResult] = []
    futures = {}
    for number, part in enumerate(parts):
        kept = _load_part(directory, number) if resume and directory is not None else None
        if kept is not None:
            results.append(kept)
            continue
        future = client.submit(run_part, number, part, request.imagery_url, spec, request.job_id,
                               request.concurrency, request.retries, request.timeout, s3,
                               key=f"tiles-{request.job_id}-{number}-{time.time_ns()}",
                               resources=resources)
        futures[future] = number
    resumed = len(results)
    if resume:
        log.info("resume: %d of %d parts already done", resumed, len(parts))
    bar = progress(len(tiles)) if progress else None
    if bar is not None and results:
        bar.update(sum(r.tiles for r in results))
    for future in as_completed(list(futures)):
        number = futures.pop(future)
        if future.status == "finished":
            result: TilePartResult = future.result()
        else:
            reason = one_line(future.exception())
            result = TilePartResult(number, empty_features(), len(parts[number]), [
                {"tile": f"{z}/{x}/{y}", "reason": reason} for x, y, z in parts[number]])
        future.release()
        if directory is not None:
            _save_part(directory, result)
        results.append(result)
        if bar is not None:
            bar.update(result.tiles)
    if bar is not None:
        bar.close()

    results.sort(key=lambda r: r.part)
    frames = [r.features for r in results if len(r.features)]
    features = (gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs="EPSG:4326")
                if frames else empty_features())
    exported = features[features["score"].to_numpy() >= request.threshold(features["class"])] \
        if len(features) else features
    failed = sorted((t for r in results for t in r.failed_tiles), key=lambda t: t["tile"])
    status = (ev.SUCCESS if not failed else ev.FAILED if len(failed) >= len(tiles)
              else ev.PARTIAL)
    written: list[str] = []
    if status != ev.FAILED:
        for output in request.outputs:
            formats = getattr(output, "formats", None)
            if formats is None:  # Kinesis: the exported features
                written += make_sink(output).write_features(request.job_id, exported)
                continue
            if "parquet" in formats:
                sink = make_sink(output.model_copy(update={"formats": ("parquet",)}))
                written += sink.write_features(request.job_id, features)
            if "geojson" in formats:
                sink = make_sink(output.model_copy(update={"formats": ("geojson",)}))
                written += sink.write_features(request.job_id, exported)
    summary = {
        "jobId": request.job_id,
        "status": status,
        "model": {"type": spec.type, "name": spec.name},
        "imageryUrl": request.imagery_url,
        "tiles": len(tiles),
        "failedTiles": failed,
        "features": len(features),
        "exported": len(exported),
        "thresholds": {"default": request.default_threshold, **request.thresholds},
        "parts": len(parts),
        "resumedParts": resumed,
        "startTime": started.isoformat(),
        "endTime": datetime.now(UTC).isoformat(),
        "seconds": {
            "total": round(time.perf_counter() - began, 4),
            "fetch": round(sum(r.fetch_seconds for r in results), 4),
            "model": round(sum(r.model_seconds for r in results), 4),
        },
        "outputs": list(written),
        "modelMetrics": finish_model(client),
    }
    for output in request.outputs:
        written.append(make_sink(output).write_summary(request.job_id, summary))
    reason = f"{len(failed)} of {len(tiles)} tiles failed" if failed else ""
    bus.emit(status, request.job_id, message=f"{len(features)} features, {len(exported)} exported"
             + (f"; {reason}" if reason else ""), failedTiles=len(failed))
    return TileJobResult(features, exported, summary, written)
