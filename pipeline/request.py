"""The image request: OSML Model Runner's ``ImageRequest`` wire format as a pydantic model.

A request that a person wrote (CLI, Python API) is *strict*: an unknown field is an error that
names it. Queue traffic is *lenient*: :meth:`ImageRequest.from_message` drops unknown fields and
reports them, as OSML does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from pipeline.segmentation.contract import SegmentationOptions

log = logging.getLogger(__name__)

DEFAULT_TILE_SIZE = 1024
DEFAULT_TILE_OVERLAP = 50


class RequestError(ValueError):
    """An invalid request. ``str()`` is one line that names the field or file."""


class _Strict(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class StrictDocument(_Strict):
    """A request document (camelCase keys, strict) that loads with one-line errors."""

    @classmethod
    def parse(cls, data: Any) -> Self:
        """Validate a mapping strictly; raise :class:`RequestError` with one line."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise RequestError(format_validation_error(exc)) from None

    @classmethod
    def from_file(cls, path: str | Path) -> Self:
        """Load from a ``.json`` or ``.yaml``/``.yml`` file (strict)."""
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise RequestError(f"request file not found: {path}") from None
        except OSError as exc:
            raise RequestError(f"cannot read request file {path}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise RequestError(f"{path}: not UTF-8 text (byte {exc.start})") from None
        return cls.parse(load_document(text, str(path)))


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


class ImageProcessor(_Strict):
    """The model target: ``{"name": ..., "type": ..., "assumedRole": ..., "maxConcurrency": ...}``.

    ``maxConcurrency`` (our extension of OSML's object) caps the requests in flight to an endpoint
    across the cluster; it wins over ``imageProcessorParameters.maxConcurrency`` and over the
    SageMaker default (instances × per-instance concurrency).
    """

    name: str
    type: str = "SM_ENDPOINT"
    assumed_role: str | None = None
    max_concurrency: int | None = Field(default=None, gt=0, strict=True)

    @property
    def spec_options(self) -> dict[str, Any]:
        """What this object adds to ``ModelSpec.options`` (settings that win over defaults)."""
        return {"maxConcurrency": self.max_concurrency} if self.max_concurrency is not None else {}

    _normalise_type = field_validator("type", mode="before")(_upper)


Format = Literal["geojson", "parquet"]
DEFAULT_FORMATS: tuple[Format, ...] = ("geojson", "parquet")
#: how features are written (GeoJSON files, Kinesis records): RFC 7946, or field for field as
#: OSML Model Runner 2.3 writes them; None: the run mode's default (queue worker: OSML)
FeatureForm = Literal["RFC7946", "OSML"]


def _exactly_one(first: Any, second: Any, message: str) -> None:
    """A ``ValueError(message)`` unless exactly one of the two is given (not None)."""
    if (first is None) == (second is None):
        raise ValueError(message)


def _lower_formats(value: Any) -> Any:
    if isinstance(value, str):
        value = [value]
    return [v.lower() if isinstance(v, str) else v for v in value]


class _Output(_Strict):
    """What every output has: its ``type`` and how its features are written."""

    type: str
    feature_form: FeatureForm | None = None

    _normalise_type = field_validator("type", "feature_form", mode="before")(_upper)


class _FileOutput(_Output):
    """An output of files: ``<jobId>.geojson|.parquet|.summary.json`` (``formats``)."""

    formats: tuple[Format, ...] = DEFAULT_FORMATS
    #: our extension: also write a STAC Item per image and a Collection (``pipeline.stac``)
    stac: bool = False

    _normalise_formats = field_validator("formats", mode="before")(_lower_formats)


class LocalOutput(_FileOutput):
    """Write ``<path>/<jobId>.geojson|.parquet|.summary.json`` on the local file system."""

    type: Literal["LOCAL"] = "LOCAL"
    path: str


class S3Output(_FileOutput):
    """Write ``s3://<bucket>/<prefix>/<jobId>.geojson|.parquet|.summary.json``."""

    type: Literal["S3"] = "S3"
    bucket: str
    prefix: str = ""
    role: str | None = None


class KinesisOutput(_Output):
    """Put GeoJSON FeatureCollections of at most ``batchSize`` features on a Kinesis stream."""

    type: Literal["KINESIS"] = "KINESIS"
    stream: str
    batch_size: int = Field(default=1000, gt=0)
    role: str | None = None


def _output_kind(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return str(kind).upper() if kind is not None else None


Output = Annotated[
    Annotated[LocalOutput, Tag("LOCAL")]
    | Annotated[S3Output, Tag("S3")]
    | Annotated[KinesisOutput, Tag("KINESIS")],
    Discriminator(_output_kind),
]


class DistillationAlgorithm(_Strict):
    """NMS or SOFT_NMS parameters (OSML's ``FeatureDistillation*`` algorithms)."""

    algorithm_type: Literal["NMS", "SOFT_NMS"] = "NMS"
    iou_threshold: float = Field(default=0.75, ge=0.0, le=1.0)
    skip_box_threshold: float = Field(default=0.0001, ge=0.0, le=1.0)
    sigma: float = Field(default=0.1, gt=0.0)

    _normalise_type = field_validator("algorithm_type", mode="before")(_upper)


class PostProcessingStep(_Strict):
    """One ``postProcessing`` entry; only ``FEATURE_DISTILLATION`` exists (as in OSML)."""

    step: Literal["FEATURE_DISTILLATION"] = "FEATURE_DISTILLATION"
    algorithm: DistillationAlgorithm = DistillationAlgorithm()

    _normalise_step = field_validator("step", mode="before")(_upper)


class Elevation(_Strict):
    """Ground height for RPC geolocation: ``{"constant": metres}`` (ellipsoidal) or
    ``{"dem": "<url of a DEM GeoTIFF>"}``; without it the RPC's ``HEIGHT_OFF`` is used."""

    constant: float | None = None
    dem: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> Elevation:
        _exactly_one(self.constant, self.dem, "give exactly one of constant (metres) or dem (a DEM URL)")
        return self


class StacSearch(_Strict):
    """Our extension ``stacSearch``: images found by a STAC search, expanded at planning
    (:mod:`pipeline.stac`). ``url`` is a STAC API root (searched at ``/search``), ``catalog`` a
    static catalog's ``catalog.json`` (walked and filtered here); ``assetKey`` picks each
    Item's asset (default: its first image asset with the ``data`` role)."""

    url: str | None = None
    catalog: str | None = None
    collections: list[str] | None = None
    ids: list[str] | None = None
    bbox: list[float] | None = None
    datetime: str | None = None
    query: dict[str, Any] | None = None
    asset_key: str | None = None
    max_items: int = Field(default=100, gt=0, le=10_000)

    @field_validator("bbox")
    @classmethod
    def _four_numbers(cls, bbox: list[float] | None) -> list[float] | None:
        if bbox is not None and (len(bbox) != 4 or bbox[0] > bbox[2] or bbox[1] > bbox[3]):
            raise ValueError("must be [west, south, east, north]")
        return bbox

    @model_validator(mode="after")
    def _one_source(self) -> StacSearch:
        _exactly_one(self.url, self.catalog,
                     "give exactly one of url (a STAC API) or catalog (a static catalog.json)")
        return self


class ImageRequest(StrictDocument):
    """One job: run ``imageProcessor`` over every image of ``imageUrls``."""

    job_id: str = Field(min_length=1)
    job_name: str | None = None
    job_arn: str | None = None
    #: image URLs; a ``.json`` URL is a STAC Item (or ItemCollection), expanded to its asset
    image_urls: list[str]
    image_read_role: str | None = None
    outputs: list[Output] = Field(default_factory=list)
    output_bucket: str | None = None
    output_prefix: str | None = None
    image_processor: ImageProcessor
    image_processor_parameters: dict[str, Any] = Field(default_factory=dict)
    tile_size: int = Field(default=DEFAULT_TILE_SIZE, gt=0, alias="imageProcessorTileSize")
    tile_overlap: int = Field(default=DEFAULT_TILE_OVERLAP, ge=0, alias="imageProcessorTileOverlap")
    tile_format: Literal["NITF", "JPEG", "PNG", "GTIFF"] = Field(
        default="NITF", alias="imageProcessorTileFormat"  # as OSML
    )
    tile_compression: Literal["NONE", "JPEG", "J2K", "LZW"] = Field(
        default="NONE", alias="imageProcessorTileCompression"
    )
    #: None: ``DRA`` for images deeper than 8 bits, else ``NONE`` (decided per image)
    range_adjustment: Literal["NONE", "DRA", "MINMAX"] | None = None
    region_of_interest: str | None = None
    #: our extension (OSML ignores it): None is the run mode's default, ``VARIABLE_OVERLAP``
    #: (OSML 2.x's grid) on the queue worker, ``FIXED_STRIDE`` on the CLI and Python API
    tiling_strategy: Literal["FIXED_STRIDE", "VARIABLE_OVERLAP"] | None = None
    elevation: Elevation | None = None
    #: our extension: run the model as a segmenter (see ``pipeline.segmentation``)
    segmentation: SegmentationOptions | None = None
    feature_properties: list[dict[str, Any]] = Field(default_factory=list)
    post_processing: list[PostProcessingStep] = Field(
        default_factory=lambda: [PostProcessingStep()]
    )
    #: our extension: more images from a STAC search (see :class:`StacSearch`)
    stac_search: StacSearch | None = None
    #: set by :func:`pipeline.stac.expand_request` (never from a request): ``{image url: its
    #: STAC Item's href}``
    _stac_sources: dict[str, str] = PrivateAttr(default_factory=dict)
    #: True once expanded: its image URLs are assets, never read as STAC again
    _stac_expanded: bool = PrivateAttr(default=False)

    @property
    def stac_sources(self) -> dict[str, str]:
        """The STAC Item each image URL came from (after :func:`pipeline.stac.expand_request`)."""
        return dict(self._stac_sources)

    _normalise_enums = field_validator(
        "tile_format", "tile_compression", "range_adjustment", "tiling_strategy", mode="before"
    )(_upper)

    @field_validator("tile_compression")
    @classmethod
    def _valid_tile_encoding(cls, compression: str, info: ValidationInfo) -> str:
        tile_format = info.data.get("tile_format")
        if tile_format is not None:
            from pipeline.models.base import ModelError
            from pipeline.models.encoding import check_format

            try:
                check_format(tile_format, compression)
            except ModelError as exc:
                raise ValueError(str(exc)) from None
        return compression

    @field_validator("image_urls")
    @classmethod
    def _no_empty_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.strip():
                raise ValueError("image URL must not be empty")
        return urls

    @field_validator("region_of_interest")
    @classmethod
    def _valid_wkt(cls, wkt: str | None) -> str | None:
        if wkt is None or not wkt.strip():
            return None
        import shapely

        try:
            geometry = shapely.from_wkt(wkt)
        except shapely.errors.ShapelyError as exc:
            raise ValueError(f"not valid WKT ({str(exc).splitlines()[0]})") from None
        if geometry is None or geometry.is_empty or geometry.area <= 0:
            raise ValueError("must be a non-empty polygon in WKT")
        return wkt

    @model_validator(mode="after")
    def _check(self) -> ImageRequest:
        if not self.image_urls and self.stac_search is None:
            raise ValueError("imageUrls: at least one image URL is required (or a stacSearch)")
        if self.tile_overlap >= self.tile_size:
            raise ValueError(
                f"imageProcessorTileOverlap ({self.tile_overlap}) must be smaller than "
                f"imageProcessorTileSize ({self.tile_size})"
            )
        return self

    # ------------------------------------------------------------------ derived values
    @property
    def all_outputs(self) -> list[LocalOutput | S3Output | KinesisOutput]:
        """``outputs`` plus OSML's legacy ``outputBucket``/``outputPrefix`` as one S3 output."""
        outputs: list[LocalOutput | S3Output | KinesisOutput] = list(self.outputs)
        if self.output_bucket:
            outputs.append(S3Output(bucket=self.output_bucket, prefix=self.output_prefix or ""))
        return outputs

    @property
    def distillation(self) -> DistillationAlgorithm | None:
        """The feature-distillation algorithm, or None where ``postProcessing`` is ``[]``."""
        for step in self.post_processing:
            if step.step == "FEATURE_DISTILLATION":
                return step.algorithm
        return None

    @property
    def merged_feature_properties(self) -> dict[str, Any]:
        """OSML's ``featureProperties`` list, merged into one dict (later entries win)."""
        merged: dict[str, Any] = {}
        for entry in self.feature_properties:
            merged.update(entry)
        return merged

    def with_output_dir(self, directory: str | Path) -> ImageRequest:
        """A copy with one more LOCAL output in ``directory``."""
        extra = LocalOutput(path=str(directory))
        return self.model_copy(update={"outputs": [*self.outputs, extra]})

    def to_wire(self) -> dict[str, Any]:
        """The request as OSML JSON (camelCase names)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_message(cls, body: str | bytes | dict[str, Any]) -> tuple[ImageRequest, list[str]]:
        """Validate OSML queue traffic leniently: unknown fields are dropped and returned."""
        data = load_document(body, "message") if not isinstance(body, dict) else body
        if not isinstance(data, dict):
            raise RequestError("message: the request must be a JSON object")
        known = {f.alias or name for name, f in cls.model_fields.items()} | set(cls.model_fields)
        unknown = sorted(str(k) for k in data if k not in known)  # YAML allows non-str keys
        if unknown:
            log.warning("ignoring unknown request fields: %s", ", ".join(unknown))
        return cls.parse({k: v for k, v in data.items() if k in known}), unknown


def load_document(text: str | bytes, source: str) -> Any:
    """Parse JSON (or YAML, which is a superset) into Python values, one-line errors."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    stripped = text.lstrip()
    try:
        if stripped.startswith(("{", "[")) or source.endswith(".json"):
            return json.loads(text)
        return yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise RequestError(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RequestError(f"{source}: not valid YAML{where}") from None


def format_validation_error(exc: ValidationError) -> str:
    """The first pydantic error as one line: ``invalid request: <field path>: <message>``."""
    errors = exc.errors()
    first = errors[0]
    loc = ".".join(str(part) for part in first["loc"]) or "request"
    message = first["msg"].replace("\n", " ")
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    elif first["type"] == "missing":
        message = "required field is missing"
    elif first["type"] == "union_tag_invalid":
        message = f"unknown output type (expected LOCAL, S3 or Kinesis): {first.get('input')!r}"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"invalid request: {loc}: {message}{more}"
