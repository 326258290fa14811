"""Segmentation targets: built-in rule-based segmenters, ``PYTHON``, ``HTTP_ENDPOINT`` and
``SM_ENDPOINT``.

Built-ins (``imageProcessor.type`` ``BUILTIN``, parameters from ``imageProcessorParameters``):

- ``threshold``: class ``bright`` where the pixel value (band 1 of a 1- or 2-band tile, else
  the mean of bands 1-3) is ``>= threshold`` (default 128); a trivial per-pixel model with exact
  semantics (planted-shape tests, benchmarks). ``answer``: ``ids`` (default) or ``scores``.
- ``vegetation``: class ``vegetation`` by the excess-green index ``ExG = 2g - r - b`` of the
  chromatic coordinates (``r = R / (R + G + B)``, ...) of an RGB tile, or by NDVI
  ``(NIR - R) / (NIR + R)`` where ``nirBand`` (1-based; ``redBand`` default 1) names a
  near-infrared band. The vegetation probability rises linearly from 0 to 1 over
  ``threshold ± softness`` (ExG: 0.05 ± 0.05; NDVI: 0.3 ± 0.1).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline.models.base import ModelError, ModelSpec
from pipeline.segmentation.contract import NPY_TYPE, Segmenter, decode_array

#: pixels of the slab that :func:`threshold_answer` sums at a time
SLAB_PIXELS = 2**20


def threshold_answer(tile: np.ndarray, threshold: float = 128, scores: bool = False) -> np.ndarray:
    """Class ids (``H × W`` uint8, 1 = bright) or uint8 scores (``2 × H × W``)."""
    bright = np.empty(tile.shape[:2], np.bool_)
    height, width, count = tile.shape
    # a slab of rows at a time, its uint16 sums in a buffer reused; with ~2**20 pixels a slab
    # (256 rows of 4096) a 4096² chunk took 30% less time than with 16 rows (fewer numpy calls)
    rows = max(1, SLAB_PIXELS // max(1, width))
    if count < 3:
        for y in range(0, height, rows):
            np.greater_equal(tile[y:y + rows, :, 0], threshold, out=bright[y:y + rows])
    elif tile.dtype.itemsize == 1 and tile.strides[1:] == (count, 1) and width:
        # band-last rows (as read): the sum of each run of 3 bytes over a row's bytes, taken at
        # every pixel's first band; contiguous adds, 1.4x faster than adding strided bands
        flat = np.lib.stride_tricks.as_strided(tile, (height, width * count), (tile.strides[0], 1))
        rows = max(1, rows // count)
        wide = np.empty((rows, width * count), np.uint16)
        total = np.empty((rows, width * count - 2), np.uint16)
        for y in range(0, height, rows):
            slab, part = wide[:min(rows, height - y)], total[:min(rows, height - y)]
            np.copyto(slab, flat[y:y + rows])
            np.add(slab[:, :-2], slab[:, 1:-1], out=part)
            part += slab[:, 2:]
            np.greater_equal(part[:, ::count], 3 * threshold, out=bright[y:y + rows])
    else:
        total = np.empty((rows, width), np.uint16)
        for y in range(0, height, rows):
            slab = tile[y:y + rows]
            part = total[:len(slab)]  # the mean of bands 1-3 >= threshold, as an exact integer sum
            np.copyto(part, slab[..., 0])  # then adds in place: faster than a casting np.add
            part += slab[..., 1]
            part += slab[..., 2]
            np.greater_equal(part, 3 * threshold, out=bright[y:y + rows])
    if not scores:
        return bright.view(np.uint8)
    return np.stack([~bright, bright]).astype(np.uint8) * np.uint8(255)


def excess_green(tile: np.ndarray) -> np.ndarray:
    """``2g - r - b`` of the chromatic coordinates of an RGB tile (0 where the pixel is black)."""
    rgb = tile[..., :3].astype(np.float32)
    total = rgb.sum(axis=2)
    safe = np.where(total > 0, total, 1.0)
    return np.where(total > 0, (2 * rgb[..., 1] - rgb[..., 0] - rgb[..., 2]) / safe, 0.0)


def ndvi(tile: np.ndarray, red_band: int, nir_band: int) -> np.ndarray:
    """``(NIR - R) / (NIR + R)`` of 1-based bands (0 where both are 0)."""
    red = tile[..., red_band - 1].astype(np.float32)
    nir = tile[..., nir_band - 1].astype(np.float32)
    total = nir + red
    return np.where(total > 0, (nir - red) / np.where(total > 0, total, 1.0), 0.0)


def vegetation_answer(tile: np.ndarray, threshold: float | None = None, softness: float | None = None,
                      red_band: int = 1, nir_band: int | None = None) -> np.ndarray:
    """``2 × H × W`` float32 scores (background, vegetation) of one tile."""
    if nir_band is not None:
        if max(red_band, nir_band) > tile.shape[2]:
            raise ModelError(f"vegetation: band {max(red_band, nir_band)} of a {tile.shape[2]}-band tile")
        index, t, s = ndvi(tile, red_band, nir_band), 0.3, 0.1
    else:
        if tile.shape[2] < 3:
            raise ModelError(f"vegetation needs an RGB tile or nirBand, got {tile.shape[2]} band(s)")
        index, t, s = excess_green(tile), 0.05, 0.05
    t = t if threshold is None else threshold
    s = s if softness is None else softness
    p = np.clip((index - t) / (2 * s) + 0.5, 0.0, 1.0).astype(np.float32)
    return np.stack([1 - p, p])


class FunctionSegmenter(Segmenter):
    """A per-tile function as a segmenter."""

    tile_views = True  # each tile read on its own, never written

    def __init__(self, per_tile: Callable[[np.ndarray], np.ndarray], class_names: tuple[str, ...],
                 per_pixel: bool = False):
        self._per_tile = per_tile
        self.class_names = class_names
        self.per_pixel = per_pixel

    def segment(self, tiles: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
        return [self._per_tile(tile) for tile in tiles]


def _number(params: dict[str, Any], key: str, default: float | None) -> float | None:
    value = params.get(key, default)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ModelError(f"imageProcessorParameters.{key} must be a number") from None


BUILTIN_SEGMENTERS = ("threshold", "vegetation")


def builtin(spec: ModelSpec) -> Segmenter:
    """The built-in segmenter named by ``spec.name``."""
    params = spec.model_parameters
    name = spec.name.lower()
    if name == "threshold":
        threshold = _number(params, "threshold", 128)
        answer = str(params.get("answer", "ids")).lower()
        if answer not in ("ids", "scores"):
            raise ModelError("imageProcessorParameters.answer must be ids or scores")
        return FunctionSegmenter(lambda t: threshold_answer(t, threshold or 0, answer == "scores"),
                                 ("background", "bright"), per_pixel=True)
    if name == "vegetation":
        threshold, softness = _number(params, "threshold", None), _number(params, "softness", None)
        red = int(_number(params, "redBand", 1) or 1)
        nir = _number(params, "nirBand", None)
        nir_band = int(nir) if nir is not None else None
        return FunctionSegmenter(lambda t: vegetation_answer(t, threshold, softness, red, nir_band),
                                 ("background", "vegetation"), per_pixel=True)
    raise ModelError(f"unknown BUILTIN segmenter {spec.name!r} (expected {', '.join(BUILTIN_SEGMENTERS)})")


def _class_names(spec: ModelSpec, default: Any) -> tuple[str, ...]:
    names = spec.parameters.get("classNames", default)
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names or not all(isinstance(n, str) for n in names):
        raise ModelError("a segmentation model needs class names (imageProcessorParameters.classNames)")
    return tuple(names)


class PythonSegmenter(Segmenter):
    """``PYTHON``: ``"package.module:factory"``; the factory (called with the model's
    parameters) returns ``model(tiles, offsets) -> list of answers``, with ``class_names``
    as an attribute or ``classNames`` in the parameters (and ``per_pixel = True`` where each
    pixel's answer depends on that pixel alone: see :class:`Segmenter`)."""

    def __init__(self, spec: ModelSpec):
        from pipeline.models.python import load_factory

        self._model = load_factory(spec.name)(**spec.model_parameters)
        if not callable(self._model):
            raise ModelError(f"{spec.name!r} returned {type(self._model).__name__}, not a callable")
        self.class_names = _class_names(spec, getattr(self._model, "class_names", None))
        self.batch_size = int(getattr(self._model, "batch_size", self.batch_size))
        self.per_pixel = bool(getattr(self._model, "per_pixel", False))

    def segment(self, tiles: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
        answers = list(self._model(tiles, offsets))
        if len(answers) != len(tiles):
            raise ModelError(f"model returned {len(answers)} answers for {len(tiles)} tiles")
        return answers


class HttpSegmenter(Segmenter):
    """``HTTP_ENDPOINT``: POST each encoded tile (``imageProcessorTileFormat``) to the URL
    (``Accept: application/x-npy`` unless the parameters set ``Accept``); the answer is an
    encoded array (see :mod:`~pipeline.segmentation.contract`). Class names from ``classNames``."""

    batch_size = 4

    def __init__(self, spec: ModelSpec):
        from pipeline.models.http import session_for

        self.spec = spec
        self.class_names = _class_names(spec, None)
        self.timeout = float(spec.parameters.get("timeout", 60))
        self.session = session_for(4)

    def _one(self, tile: np.ndarray) -> np.ndarray:
        import requests

        from pipeline.models.encoding import CONTENT_TYPES, encode_tile
        from pipeline.models.http import http_error

        body = encode_tile(tile, self.spec.tile_format, self.spec.tile_compression)
        headers = {"Content-Type": CONTENT_TYPES[self.spec.tile_format], "Accept": NPY_TYPE,
                   **{k: str(v) for k, v in self.spec.model_parameters.items()}}
        try:
            response = self.session.post(self.spec.name, data=body, headers=headers, timeout=self.timeout)
        except requests.RequestException as exc:
            what = f"HTTP endpoint {self.spec.name}"
            raise ModelError(f"{what}: connection failed ({type(exc).__name__})") from None
        if response.status_code >= 300:
            raise http_error(response.status_code, response.text[:2000], f"HTTP endpoint {self.spec.name}")
        return decode_array(response.content, response.headers.get("Content-Type", ""))

    def segment(self, tiles: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
        return [self._one(tile) for tile in tiles]

    def close(self) -> None:
        self.session.close()


class SageMakerSegmenter(HttpSegmenter):
    """``SM_ENDPOINT``: ``invoke_endpoint`` with each encoded tile (``ContentType`` from
    ``imageProcessorTileFormat``, ``Accept`` default ``application/x-npy``); the answer's
    ``ContentType`` says how its body is encoded. Class names from ``classNames``."""

    def __init__(self, spec: ModelSpec):
        from pipeline.models.endpoint import aws_session
        from pipeline.models.sagemaker import PASS_THROUGH

        self.spec = spec
        self.class_names = _class_names(spec, None)
        self.extra = {k: str(v) for k, v in spec.parameters.items() if k in PASS_THROUGH}
        self.extra.setdefault("Accept", NPY_TYPE)
        url = spec.options.get("endpointUrl") or None
        self.client = aws_session(spec).client("sagemaker-runtime", endpoint_url=url)

    def _one(self, tile: np.ndarray) -> np.ndarray:
        import botocore.exceptions

        from pipeline.models.encoding import CONTENT_TYPES, encode_tile
        from pipeline.models.endpoint import classify_boto_error

        body = encode_tile(tile, self.spec.tile_format, self.spec.tile_compression)
        params = {"ContentType": CONTENT_TYPES[self.spec.tile_format], **self.extra}
        try:
            answer = self.client.invoke_endpoint(EndpointName=self.spec.name, Body=body, **params)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise classify_boto_error(exc, f"SageMaker endpoint {self.spec.name}") from None
        return decode_array(answer["Body"].read(), answer.get("ContentType", ""))

    def close(self) -> None:
        self.client.close()


SEGMENTERS: dict[str, Callable[[ModelSpec], Segmenter]] = {
    "BUILTIN": builtin,
    "PYTHON": PythonSegmenter,
    "HTTP_ENDPOINT": HttpSegmenter,
    "SM_ENDPOINT": SageMakerSegmenter,
}


def resolve_segmenter(spec: ModelSpec) -> ModelSpec:
    """``spec`` with what workers need from the client's settings (a SageMaker endpoint's
    runtime URL and region; nothing secret)."""
    if spec.type.upper() != "SM_ENDPOINT":
        return spec
    from pipeline.models.endpoint import aws_options, with_options

    return with_options(spec, **aws_options(spec, "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME"))
_cache: dict[str, Segmenter] = {}
_lock = threading.Lock()


def load_segmenter(spec: ModelSpec) -> Segmenter:
    """The segmenter for ``spec``, built once per process."""
    factory = SEGMENTERS.get(spec.type.upper())
    if factory is None:
        raise ModelError(f"imageProcessor.type {spec.type!r} cannot segment "
                         f"(segmentation targets: {', '.join(SEGMENTERS)})")
    with _lock:
        segmenter = _cache.get(spec.key)
        if segmenter is None:
            segmenter = _cache[spec.key] = factory(spec)
        return segmenter


def check_segmenter(spec: ModelSpec) -> tuple[str, ...]:
    """Build the segmenter in the client (one-line :class:`ModelError` for a spec that cannot
    segment); its class names."""
    return tuple(load_segmenter(spec).class_names)
