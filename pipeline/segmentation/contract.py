"""The segmentation model contract and the request's ``segmentation`` options.

A segmentation model answers, per tile (``H × W`` pixels of the ``N × H × W × C`` uint8
batch), either

- class ids: an ``H × W`` uint8/uint16 array, each value an index into the class names, or
- class scores: a ``K × H × W`` array, float (probabilities in 0..1) or uint8 (0..255 for
  0..1), one plane per class name,

plus its class names (``K`` of them; the first is the background class, which gets no polygons
unless ``polygonClasses`` names it). Endpoints answer one tile per request with an encoded
array body whose content type says which encoding (:func:`decode_array`): NPY
(``application/x-npy``), PNG (``image/png``) or GeoTIFF (``image/tiff``); a 2-D array is class
ids, a 3-D (bands first) one class scores.
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from pipeline.models.base import ModelError

BLEND: Literal["BLEND"] = "BLEND"
CORE: Literal["CORE"] = "CORE"
NPY_TYPE = "application/x-npy"
PNG_TYPE = "image/png"
TIFF_TYPE = "image/tiff"
CONTENT_TYPES = (NPY_TYPE, PNG_TYPE, TIFF_TYPE)


class SegmentationOptions(BaseModel):
    """The request's ``segmentation`` field (our extension; OSML has none): run the model as a
    segmenter and write a class raster and/or class polygons instead of detections."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              frozen=True)

    #: ``BLEND``: overlapping tiles' scores averaged with weights that fall towards tile edges;
    #: ``CORE``: each pixel from the one tile whose ownership core holds it
    stitch: Literal["BLEND", "CORE"] = BLEND
    #: write ``<jobId>.<image>.classes.tif`` (a COG) to each LOCAL/S3 output
    raster: bool = True
    #: add one uint8 score band per class (0..255 for 0..1) to the COG
    score_bands: bool = False
    #: write class polygons as the job's features
    polygons: bool = True
    #: classes that get polygons (default: every class but the first, the background)
    polygon_classes: list[str] | None = None
    #: Douglas-Peucker tolerance in pixels (0: the exact pixel outlines)
    simplify: float = Field(default=0.0, ge=0)
    #: drop polygons smaller than this many square metres (pixels where not georeferenced)
    min_area: float = Field(default=0.0, ge=0)


class Segmenter(ABC):
    """A segmentation model adapter: tiles in, one answer per tile out (see the module)."""

    #: tiles per :meth:`segment` call
    batch_size: int = 16
    #: the class names, background first
    class_names: tuple[str, ...] = ("background", "foreground")
    #: True: tiles may come as read-only views of the chunk, batches split at tile rows
    tile_views: bool = False
    #: True: each pixel's answer depends on that pixel alone (no context, no tile position), so
    #: a chunk is segmented in one call on its own pixels as one ``1 × h × w × C`` "tile" of
    #: any size, with the same result as its tiles stitched (no tile is cut, nothing blended)
    per_pixel: bool = False

    @abstractmethod
    def segment(self, tiles: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
        """Answers for ``tiles`` (``N × H × W × C`` uint8; ``offsets``: each tile's ``(x, y)``
        in the full image): class ids ``H × W`` or class scores ``K × H × W`` per tile."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections or devices."""


def checked_ids(answer: np.ndarray, n_classes: int, height: int, width: int) -> np.ndarray:
    """A class-id answer (``H × W`` integers below ``n_classes``), checked."""
    if answer.shape != (height, width):
        raise ModelError(f"segmentation answer of shape {answer.shape}, expected {(height, width)}")
    if not np.issubdtype(answer.dtype, np.integer):
        raise ModelError(f"class ids must be integers, got {answer.dtype}")
    if answer.size and (answer.min() < 0 or answer.max() >= n_classes):
        raise ModelError(f"class id {int(answer.max())} is not one of the {n_classes} classes")
    return answer


def one_hot(ids: np.ndarray, n_classes: int) -> np.ndarray:
    """``K × H × W`` float32: 1 where ``ids`` is the class, else 0."""
    return (ids[None] == np.arange(n_classes, dtype=ids.dtype)[:, None, None]).astype(np.float32)


def as_scores(answer: np.ndarray, n_classes: int, height: int, width: int) -> np.ndarray:
    """One tile's answer as ``K × H × W`` float32 probabilities (class ids become one-hot);
    raises a one-line :class:`ModelError` for an answer that breaks the contract."""
    answer = np.asarray(answer)
    if answer.ndim == 2:
        return one_hot(checked_ids(answer, n_classes, height, width), n_classes)
    if answer.ndim == 3:
        if answer.shape != (n_classes, height, width):
            raise ModelError(f"segmentation scores of shape {answer.shape}, expected "
                             f"{(n_classes, height, width)} (classes, rows, columns)")
        if answer.dtype == np.uint8:
            return answer.astype(np.float32) / np.float32(255)
        if not np.issubdtype(answer.dtype, np.floating):
            raise ModelError(f"class scores must be float or uint8, got {answer.dtype}")
        return np.nan_to_num(answer.astype(np.float32, copy=False), nan=0.0)
    raise ModelError(f"segmentation answer must be H x W ids or K x H x W scores, got {answer.ndim}-D")


def encode_array(array: np.ndarray, content_type: str = NPY_TYPE) -> bytes:
    """An answer as an endpoint's body (NPY, PNG: uint8/uint16 with at most 4 bands, or
    GeoTIFF)."""
    if content_type == NPY_TYPE:
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
        return buffer.getvalue()
    from rasterio.io import MemoryFile

    from pipeline.models.encoding import tile_env

    bands = array[None] if array.ndim == 2 else array
    driver = {PNG_TYPE: "PNG", TIFF_TYPE: "GTiff"}.get(content_type)
    if driver is None:
        raise ModelError(f"cannot encode a segmentation answer as {content_type!r}")
    profile = {"driver": "GTiff", "width": bands.shape[2], "height": bands.shape[1],
               "count": bands.shape[0], "dtype": bands.dtype.name}
    with tile_env(), MemoryFile() as memory:
        with memory.open(**profile) as dst:
            dst.write(bands)
            dst.update_tags(SEGMENTATION_ANSWER="ids" if array.ndim == 2 else "scores")
        if driver == "GTiff":
            return bytes(memory.read())
        import rasterio.shutil

        with MemoryFile() as out:
            rasterio.shutil.copy(memory.name, out.name, driver="PNG")
            return bytes(out.read())


def decode_array(body: bytes, content_type: str) -> np.ndarray:
    """An endpoint's encoded answer (see the module) as an array; 1-band images are class ids."""
    kind = content_type.split(";")[0].strip().lower()
    try:
        if kind == NPY_TYPE or (kind == "application/octet-stream" and body[:6] == b"\x93NUMPY"):
            return np.load(io.BytesIO(body), allow_pickle=False)
        if kind in (PNG_TYPE, TIFF_TYPE, "image/geotiff"):
            from rasterio.io import MemoryFile

            from pipeline.models.encoding import tile_env

            with tile_env(), MemoryFile(body) as memory, memory.open() as src:
                array = src.read()
            return array[0] if array.shape[0] == 1 else array
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the endpoint's fault
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"malformed segmentation answer ({kind}): {first}") from None
    raise ModelError(f"segmentation answer has content type {content_type!r} "
                     f"(expected one of {', '.join(CONTENT_TYPES)})")
