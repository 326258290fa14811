"""Models that ship with the package and run in the worker process.

``null`` (no detections: the I/O baseline), ``centerpoint`` and ``flood`` (OSML's test models,
answer for answer: see :func:`centerpoint_answer` and :func:`flood_answer`) and
``bright-objects`` (a real detector with exact semantics, for tests that must know the truth).

OSML's models answer an OSML GeoJSON FeatureCollection per tile; so do ours, and that answer is
read by :func:`pipeline.models.results.parse_feature_collection`, as an endpoint's would be. So a
built-in run in the worker gives what the same model behind ``serve-model`` gives.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import ndimage

from pipeline.detections import Detections
from pipeline.models.base import ModelAdapter, ModelError, ModelSpec
from pipeline.models.results import parse_feature_collection, to_feature_collection

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def bright_objects(tile: np.ndarray, threshold: float = 200, min_area: int = 4) -> Detections:
    """Boxes around 8-connected components of pixels ``>= threshold``.

    The value is band 1 of a 1- or 2-band tile, or the mean of bands 1-3 otherwise. A component
    of at least ``min_area`` pixels gives its tight bounds (``xmax`` = last column + 1), class
    ``bright-object`` and score = mean component value / 255.
    """
    if tile.ndim == 3:
        value = tile[..., 0].astype(np.float64) if tile.shape[2] < 3 else tile[..., :3].mean(axis=2)
    else:
        value = tile.astype(np.float64)
    labels, count = ndimage.label(value >= threshold, structure=EIGHT_CONNECTED)
    if count == 0:
        return Detections()
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    sums = np.bincount(labels.ravel(), weights=value.ravel(), minlength=count + 1)[1:]
    slices = ndimage.find_objects(labels)
    boxes = np.array(
        [[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in slices], dtype=np.float64
    )
    keep = areas >= min_area
    scores = sums[keep] / areas[keep] / 255.0
    return Detections(boxes[keep], scores, np.full(int(keep.sum()), "bright-object", dtype=object))


#: OSML's test models' class and ontology
SAMPLE_CLASS = "sample_object"
#: an id (32 hex digits, as OSML's) for a name such as ``"id3"`` (the 4th feature's id)
Token = Callable[[str], str]


def random_token(_name: str) -> str:
    """OSML's ids: random 32 hex digits (what ``serve-model`` answers, as OSML's container)."""
    return secrets.token_hex(16)


def tile_token(model: str, offset: np.ndarray) -> Token:
    """Ids derived from the model and the tile's place in the image, so that a job run twice
    writes the same features (the built-ins in the worker)."""
    x, y = (int(v) for v in offset[:2])
    return lambda name: hashlib.blake2b(f"{model}:{x}:{y}:{name}".encode(),
                                        digest_size=16).hexdigest()


def osml_feature(box: list[float], polygon: list[list[float]] | None, score: float, model: str,
                 token: Token, index: int = 0) -> dict[str, Any]:
    """One feature as OSML's test models write it (``server_utils.detect_to_feature``): the box
    as ``imageBBox``, the polygon (or OSML's placeholder ``Point [0, 0]``) as ``imageGeometry``,
    class ``sample_object``, ``modelMetadata`` naming the model, and ids."""
    geometry: dict[str, Any] = ({"type": "Polygon", "coordinates": [polygon]} if polygon is not None
                                else {"type": "Point", "coordinates": [0.0, 0.0]})
    return {
        "type": "Feature",
        "geometry": None,
        "id": token(f"id{index}"),
        "properties": {
            "imageGeometry": geometry,
            "imageBBox": box,
            "featureClasses": [{"iri": SAMPLE_CLASS, "score": score}],
            "modelMetadata": {"modelName": model, "ontologyName": model, "ontologyVersion": "1.0.0"},
            "image_id": token(f"image{index}"),
        },
    }


def centerpoint_polygon(width: int, height: int, fraction: float = 0.1) -> list[list[float]]:
    """OSML centerpoint's segmentation: matplotlib's unit hexagon (``CirclePolygon(resolution=6)``
    vertices, pointing up, closed, then its first vertex appended: 8 positions) moved to 0-1
    (``(v + 1) / 2``), scaled by ``fraction`` of the tile and shifted by half the tile, rounded
    to 4 decimals. As in OSML, it sits to the lower right of the box's centre."""
    theta = (2 * np.pi / 6) * np.arange(7) + np.pi / 2
    ring = np.column_stack((np.cos(theta), np.sin(theta))).tolist()
    ring.append(ring[0])
    sx, sy = fraction * width, fraction * height
    return [[round((x + 1) / 2 * sx + width / 2, 4), round((y + 1) / 2 * sy + height / 2, 4)]
            for x, y in ring]


def centerpoint_answer(width: int, height: int, fraction: float = 0.1, segmentation: bool = True,
                       token: Token = random_token) -> dict[str, Any]:
    """OSML's ``centerpoint`` answer for a ``width`` × ``height`` tile: one feature, score 1.0,
    its box the tile's centre ± ``fraction`` of the tile, its ``imageGeometry`` the hexagon of
    :func:`centerpoint_polygon` (``segmentation``, as OSML's integration tests deploy it) or
    OSML's placeholder point."""
    cx, cy = width / 2, height / 2
    box = [cx - width * fraction, cy - height * fraction, cx + width * fraction, cy + height * fraction]
    polygon = centerpoint_polygon(width, height, fraction) if segmentation else None
    feature = osml_feature(box, polygon, 1.0, "centerpoint", token)
    return {"type": "FeatureCollection", "features": [feature]}


def flood_answer(width: int, height: int, rng: np.random.Generator, count: int = 100,
                 fraction: float = 0.1, token: Token = random_token) -> dict[str, Any]:
    """OSML's ``flood`` answer: ``count`` (OSML's ``FLOOD_VOLUME``, 100) boxes of
    ``2 × ceil(fraction × side)`` pixels around whole-pixel centres drawn so that each box lies
    in the tile, each with a uniform random score, class ``sample_object``. Drawn from ``rng``
    (OSML draws from Python's global ``random``); a tile too small for one box gets none."""
    half_x, half_y = math.ceil(width * fraction), math.ceil(height * fraction)
    if count <= 0 or width - half_x <= half_x or height - half_y <= half_y:
        return {"type": "FeatureCollection", "features": []}
    xs = rng.integers(half_x, width - half_x, size=count)
    ys = rng.integers(half_y, height - half_y, size=count)
    scores = rng.uniform(0.0, 1.0, size=count)
    features = [
        osml_feature([x - half_x, y - half_y, x + half_x, y + half_y], None, score, "flood", token, i)
        for i, (x, y, score) in enumerate(zip(xs.tolist(), ys.tolist(), scores.tolist(), strict=True))
    ]
    return {"type": "FeatureCollection", "features": features}


def centerpoint(tile: np.ndarray, offset: np.ndarray | None = None, fraction: float = 0.1,
                segmentation: bool = True, token: Token | None = None) -> dict[str, Any]:
    """OSML's ``centerpoint`` on one tile (:func:`centerpoint_answer`); ids from the tile's
    place unless ``token`` is given."""
    height, width = tile.shape[:2]
    token = token or tile_token("centerpoint", offset if offset is not None else np.zeros(2))
    return centerpoint_answer(width, height, fraction, segmentation, token)


def flood(tile: np.ndarray, offset: np.ndarray, count: int = 100, seed: int = 0,
          fraction: float = 0.1, token: Token | None = None) -> dict[str, Any]:
    """OSML's ``flood`` on one tile (:func:`flood_answer`), seeded by ``seed`` and the tile's
    offset, so that a job is repeatable; ids from the tile's place unless ``token`` is given."""
    height, width = tile.shape[:2]
    rng = np.random.default_rng([seed, int(offset[0]), int(offset[1])])
    return flood_answer(width, height, rng, count, fraction, token or tile_token("flood", offset))


#: a built-in's answer for one tile: detections, or an OSML FeatureCollection as a model answers
Answer = Detections | dict[str, Any]


class BuiltinModel(ModelAdapter):
    """Runs one of the built-in per-tile functions over a batch."""

    tile_views = True  # each tile on its own

    def __init__(self, per_tile: Callable[[np.ndarray, np.ndarray], Answer]):
        self._per_tile = per_tile

    def answer(self, tile: np.ndarray, offset: np.ndarray) -> dict[str, Any]:
        """The model's answer for one tile as an OSML FeatureCollection (``serve-model``)."""
        found = self._per_tile(tile, offset)
        return found if isinstance(found, dict) else to_feature_collection(found)

    def predict(self, tiles: np.ndarray, offsets: np.ndarray) -> list[Detections | BaseException]:
        results: list[Detections | BaseException] = []
        for tile, offset in zip(tiles, offsets, strict=True):
            found = self._per_tile(tile, offset)
            if isinstance(found, dict):  # read as an endpoint's answer is
                found = parse_feature_collection(found, tile.shape[1], tile.shape[0])
            results.append(found)
        return results


class NullModel(BuiltinModel):
    """``null``: no detections. It reads no pixels, so its tiles are not cut (an empty
    ``N × 0 × 0 × C`` batch): a job of it costs the reads and the pipeline only."""

    reads_pixels = False

    def __init__(self) -> None:
        super().__init__(lambda tile, offset: Detections())


def _number(params: dict[str, Any], key: str, default: float) -> float:
    try:
        return float(params.get(key, default))
    except (TypeError, ValueError):
        raise ModelError(f"imageProcessorParameters.{key} must be a number") from None


def _flag(params: dict[str, Any], key: str, default: bool) -> bool:
    value = params.get(key, default)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise ModelError(f"imageProcessorParameters.{key} must be true or false")
    return value


BUILTIN_NAMES = ("null", "centerpoint", "flood", "bright-objects")


def validate(spec: ModelSpec) -> None:
    if spec.name.lower() not in BUILTIN_NAMES:
        raise ModelError(
            f"unknown BUILTIN model {spec.name!r} (expected {', '.join(BUILTIN_NAMES)})"
        )


def create(spec: ModelSpec, random_ids: bool = False) -> BuiltinModel:
    """The built-in model named by ``spec.name`` (``random_ids``: OSML's random feature ids, as
    ``serve-model`` answers, instead of ids from each tile's place)."""
    token = random_token if random_ids else None
    params = spec.model_parameters
    name = spec.name.lower()
    if name == "null":
        return NullModel()
    if name == "centerpoint":
        fraction = _number(params, "bboxPercentage", 0.1)
        segmentation = _flag(params, "segmentation", True)
        return BuiltinModel(lambda tile, offset: centerpoint(tile, offset, fraction, segmentation,
                                                             token))
    if name == "flood":
        count = int(_number(params, "count", 100))
        seed = int(_number(params, "seed", 0))
        fraction = _number(params, "bboxPercentage", 0.1)
        return BuiltinModel(lambda tile, offset: flood(tile, offset, count, seed, fraction, token))
    if name == "bright-objects":
        threshold = _number(params, "threshold", 200)
        min_area = int(_number(params, "minArea", 4))
        return BuiltinModel(lambda tile, offset: bright_objects(tile, threshold, min_area))
    validate(spec)
    raise AssertionError("unreachable")
