"""STAC in: a request's STAC Items and STAC search, expanded to image URLs at planning.

* An ``imageUrls`` entry whose path ends in ``.json`` (or a STAC API's
  ``.../collections/<c>/items/<i>``) is a STAC Item (``"type": "Feature"`` with ``stac_version``)
  or an ItemCollection; it stands for its Items' image assets.
* ``stacSearch`` (:class:`pipeline.request.StacSearch`) adds the Items of a search: a STAC API
  (``url``, searched by ``pystac-client`` at its ``/search``) or a static catalog
  (``catalog``, walked by ``pystac`` and filtered here by collection, id, bbox, datetime and
  simple ``query`` operators ``eq``/``neq``/``lt``/``lte``/``gt``/``gte``/``in``).

:func:`expand_request` does both, once, before anything is read: every STAC document it reads
(Items, catalogs and their children, the API) is first checked against the allow-list, and the
queue worker checks the expanded hrefs as any image URL. STAC documents are read by
:func:`stac_reader`: local, ``http(s)://`` (each redirect checked) and ``s3://`` (the project's
S3 client). Assets are read by their absolute hrefs, with the Item's ``proj:`` and ``raster:``
metadata (:class:`AssetMetadata`, kept per job for planning: :func:`image_metadata`) laid over
the file's header by :func:`resolve`, the file winning where it states a value;
:func:`item_array` opens an asset as a DataArray the same way.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import TYPE_CHECKING, Any

from pipeline.failures import one_line

if TYPE_CHECKING:
    import pystac

    from pipeline.reading import ImageInfo
    from pipeline.request import ImageRequest, StacSearch
    from pipeline.security import AllowList

log = logging.getLogger(__name__)

#: media types of assets that are images this runner reads
IMAGE_MEDIA_TYPES = ("image/tiff", "image/jp2", "application/x-nitf", "image/nitf", "image/vnd.nitf")
#: image URLs are hrefs to assets; these are STAC Items (or ItemCollections)
STAC_SUFFIXES = (".json", ".geojson")


class StacError(ValueError):
    """A STAC document or search that cannot give images (one line)."""


#: a STAC API's Item URL (OGC API Features): ``.../collections/<id>/items/<id>``
STAC_API_ITEM = re.compile(r"/collections/[^/]+/items/[^/]+/?$")


def is_stac_url(url: str) -> bool:
    """Whether an ``imageUrls`` entry names a STAC document rather than an image: a ``.json``
    (``.geojson``) path, or a STAC API's ``.../collections/<c>/items/<i>`` URL."""
    path = url.split("?", 1)[0].split("#", 1)[0]
    return path.lower().endswith(STAC_SUFFIXES) or bool(STAC_API_ITEM.search(path))


#: a STAC document larger than this is refused (bytes)
MAX_STAC_BYTES = 16 * 2**20


def stac_reader(allow: AllowList | None = None, field: str = "imageUrls") -> Any:
    """pystac's I/O for a request's STAC documents. Every href it reads (each redirect hop
    too) is first checked against ``allow``; ``s3://`` is read with this process's S3 client
    (:func:`pipeline.aws.client`: its endpoint, its refreshing credentials), ``http(s)://`` with
    ``requests``, redirects followed here (:data:`pipeline.security.MAX_REDIRECTS`), anything else
    by pystac; a document is at most :data:`MAX_STAC_BYTES`."""
    return _reader_class()(allow, field)


@cache
def _reader_class() -> type:
    from pystac.stac_io import DefaultStacIO

    class StacReader(DefaultStacIO):
        def __init__(self, allow: AllowList | None, field: str) -> None:
            super().__init__()
            self.allow, self.field = allow, field
            self.s3: Any = None

        def read_text_from_href(self, href: str) -> str:
            if self.allow is not None:
                self.allow.check_source(href, self.field)
            if href.startswith("s3://"):
                return self._read_s3(href)
            if href.split(":", 1)[0].lower() in ("http", "https"):
                return _read_http(href, self.allow, self.field, dict(self.headers))
            return str(super().read_text_from_href(href))

        def _read_s3(self, href: str) -> str:
            from pipeline import aws
            from pipeline.security import read_capped

            if self.s3 is None:
                self.s3 = aws.client("s3")
            bucket, key = aws.split_s3_url(href)
            body = self.s3.get_object(Bucket=bucket, Key=key)["Body"]
            try:
                return read_capped(body, MAX_STAC_BYTES, "STAC document").decode("utf-8")
            finally:
                body.close()

    return StacReader


def _read_http(url: str, allow: AllowList | None, field: str, headers: dict[str, str]) -> str:
    """The body of an http(s) STAC document; each redirect's target checked against ``allow``."""
    from urllib.parse import urljoin

    import requests

    from pipeline.redact import public_url
    from pipeline.security import MAX_REDIRECTS, read_response

    current = url
    for _ in range(MAX_REDIRECTS + 1):
        response = requests.get(current, headers=headers, stream=True, allow_redirects=False, timeout=30)
        location = response.headers.get("Location")
        if not (response.is_redirect and location):
            if response.status_code >= 400:
                response.close()
                raise StacError(f"HTTP {response.status_code} from {public_url(current)}")
            return read_response(response, MAX_STAC_BYTES, deadline=60.0, what="STAC document").decode()
        response.close()
        current = (urljoin(current, location) if allow is None
                   else allow.check_redirect(current, location, field))
    raise StacError(f"more than {MAX_REDIRECTS} redirects from {public_url(url)}")


def read_items(url: str, allow: AllowList | None = None, field: str = "imageUrls") -> list[pystac.Item]:
    """The Items of a STAC Item or ItemCollection document at ``url`` (a path or http(s) URL)."""
    import pystac

    io = stac_reader(allow, field)
    try:
        data = io.read_json(url)
    except Exception as exc:  # noqa: BLE001 - any read or parse error, in one line
        if type(exc).__name__ == "AccessDenied":
            raise
        raise StacError(f"{field}: cannot read STAC document {url}: {one_line(exc)}") from None
    kind = data.get("type") if isinstance(data, dict) else None
    if kind == "Feature" and "stac_version" in data:
        return [pystac.Item.from_dict(data, href=url, migrate=True, preserve_dict=False)]
    if kind == "FeatureCollection":
        return list(pystac.ItemCollection.from_dict(data, preserve_dict=False).items)
    raise StacError(f"{field}: {url} is JSON but not a STAC Item (type Feature with stac_version)")


def asset_key(item: pystac.Item, key: str | None = None) -> str:
    """The asset to read: ``key``, else the first image asset with the ``data`` role, else the
    first image asset."""
    if key is not None:
        if key not in item.assets:
            raise StacError(f"STAC Item {item.id} has no asset {key!r} (it has {', '.join(item.assets)})")
        return key
    images = [k for k, a in item.assets.items()
              if (a.media_type or "").split(";")[0].strip().lower() in IMAGE_MEDIA_TYPES]
    data = [k for k in images if "data" in (item.assets[k].roles or [])]
    if not (data or images):
        raise StacError(f"STAC Item {item.id} has no image asset (name one with stacSearch.assetKey)")
    return (data or images)[0]


def asset_href(item: pystac.Item, key: str | None = None) -> str:
    """The absolute href of the Item's image asset (see :func:`asset_key`)."""
    return str(item.assets[asset_key(item, key)].get_absolute_href())


@dataclass(frozen=True)
class AssetMetadata:
    """What an Item states about its image asset (the asset's own fields, else the Item's):
    ``proj:`` CRS (``code``/``epsg``/``wkt2``/``projjson``), transform (or ``bbox`` with
    ``shape``) and shape, and ``raster:bands`` nodata, scale, offset, data type and spatial
    resolution. :func:`resolve` lays it over an image's header: the file wins where it states
    a value, the Item fills what the file lacks."""

    item: str
    crs: str | None = None
    transform: tuple[float, ...] | None = None
    #: ``(rows, cols)``
    shape: tuple[int, int] | None = None
    nodata: float | None = None
    scales: tuple[float, ...] = ()
    offsets: tuple[float, ...] = ()
    data_type: str | None = None
    resolution: float | None = None


def asset_metadata(item: pystac.Item, key: str | None = None) -> AssetMetadata | None:
    """The ``proj:`` and ``raster:`` metadata of the Item's image asset, or None if it has none."""
    from pystac.extensions.projection import ProjectionExtension
    from pystac.extensions.raster import RasterExtension

    asset = item.assets[asset_key(item, key)]
    crs = shape = transform = None
    if ProjectionExtension.has_extension(item):
        proj = ProjectionExtension.ext(asset)  # the asset's fields, else the Item's
        crs, shape = proj.crs_string, proj.shape
        transform = tuple(float(v) for v in proj.transform[:6]) if proj.transform else None
        if transform is None and proj.bbox and shape and len(proj.bbox) == 4:
            from rasterio.transform import from_bounds

            transform = tuple(from_bounds(*proj.bbox, width=shape[1], height=shape[0]))[:6]
    bands = RasterExtension.ext(asset).bands if RasterExtension.has_extension(item) else None
    bands = bands or []
    nodata = next((float(b.nodata) for b in bands if b.nodata is not None), None)
    resolution = next((float(b.spatial_resolution) for b in bands if b.spatial_resolution), None)
    data_type = next((str(b.data_type) for b in bands if b.data_type), None)
    scaled = any(b.scale not in (None, 1) or b.offset not in (None, 0) for b in bands)
    metadata = AssetMetadata(
        str(item.get_self_href() or item.id), crs, transform,
        (int(shape[0]), int(shape[1])) if shape and len(shape) == 2 else None, nodata,
        tuple(1.0 if b.scale is None else float(b.scale) for b in bands) if scaled else (),
        tuple(0.0 if b.offset is None else float(b.offset) for b in bands) if scaled else (),
        data_type.split(".")[-1] if data_type else None, resolution)
    return None if metadata == AssetMetadata(metadata.item) else metadata


def resolve(info: ImageInfo, metadata: AssetMetadata | None) -> tuple[ImageInfo, dict[str, Any]]:
    """``info`` with what ``metadata`` states and the file lacks, and what happened, for the
    summary (``{"item", "applied": [fields], "fileWins": [{"field", "file", "item"}]}``).

    The file wins: its georeferencing (RPC, affine or GCPs), nodata and scale/offset are what
    its pixels were written with, while an Item may be rounded, stale or describe another
    asset. The Item's CRS and transform apply only to a file without georeferencing whose
    size is the Item's ``proj:shape`` (where given); its nodata to a file without one; its
    scales and offsets (one per band) to a file without its own. A disagreement is logged
    and listed in ``fileWins``; ``data_type`` and ``spatial_resolution`` are only compared."""
    from dataclasses import replace

    from pyproj import CRS

    from pipeline.redact import public_url

    if metadata is None:
        return info, {}
    applied: list[str] = []
    file_wins: list[dict[str, Any]] = []
    changes: dict[str, Any] = {}

    def disagree(name: str, file: Any, item: Any) -> None:
        file_wins.append({"field": name, "file": file, "item": item})
        log.warning("%s: the file's %s (%s) wins over its STAC Item's (%s)", public_url(info.url), name,
                    file, item)

    size = (info.height, info.width)
    if metadata.shape is not None and metadata.shape != size:
        disagree("proj:shape", list(size), list(metadata.shape))
    elif metadata.crs and metadata.transform:
        crs = CRS.from_user_input(metadata.crs)
        if info.transform is None and not info.rpcs and len(info.gcps) < 3:
            changes.update(crs=crs.to_wkt(), transform=metadata.transform)
            applied += ["proj:crs", "proj:transform"]
        elif info.transform is not None and info.crs is not None:
            if not CRS.from_wkt(info.crs).equals(crs, ignore_axis_order=True):
                disagree("proj:crs", CRS.from_wkt(info.crs).to_string(), metadata.crs)
            pixel = max(abs(v) for v in info.transform[:2] + info.transform[3:5]) or 1.0
            pairs = zip(info.transform, metadata.transform, strict=True)
            if any(abs(a - b) > 1e-6 * pixel for a, b in pairs):
                disagree("proj:transform", list(info.transform), list(metadata.transform))
    if metadata.nodata is not None:
        if info.nodata is None:
            changes["nodata"] = metadata.nodata
            applied.append("raster:bands.nodata")
        elif info.nodata != metadata.nodata and not (math.isnan(info.nodata) and math.isnan(metadata.nodata)):
            disagree("raster:bands.nodata", info.nodata, metadata.nodata)
    if metadata.scales:
        item_linear = (metadata.scales, metadata.offsets)
        if len(metadata.scales) != info.bands:
            disagree("raster:bands", f"{info.bands} bands", f"{len(metadata.scales)} bands")
        elif not info.scales:
            changes.update(scales=metadata.scales, offsets=metadata.offsets)
            applied += ["raster:bands.scale", "raster:bands.offset"]
        elif (info.scales, info.offsets) != item_linear:
            disagree("raster:bands.scale/offset", [list(info.scales), list(info.offsets)],
                     [list(v) for v in item_linear])
    if metadata.data_type and metadata.data_type != info.dtype:
        disagree("raster:bands.data_type", info.dtype, metadata.data_type)
    transform = changes.get("transform", info.transform)
    if metadata.resolution and transform is not None and \
            not math.isclose(abs(transform[0]), metadata.resolution, rel_tol=1e-6):
        disagree("raster:bands.spatial_resolution", abs(transform[0]), metadata.resolution)
    report: dict[str, Any] = {"item": public_url(metadata.item), "applied": applied}
    if file_wins:
        report["fileWins"] = file_wins
    return replace(info, **changes), report


def search(spec: StacSearch, allow: AllowList | None = None) -> list[pystac.Item]:
    """The Items that ``spec`` finds (at most ``maxItems``), in the order the source gives."""
    if spec.url is not None:
        return _api_search(spec, allow)
    return _catalog_search(spec, allow)


def _api_search(spec: StacSearch, allow: AllowList | None) -> list[pystac.Item]:
    import pystac_client

    assert spec.url is not None
    if allow is not None:
        allow.check_source(spec.url, "stacSearch.url")
    try:
        client = pystac_client.Client.open(spec.url, timeout=30)
        found = client.search(collections=spec.collections, ids=spec.ids, bbox=spec.bbox,
                              datetime=spec.datetime, query=spec.query, max_items=spec.max_items)
        items = list(found.items())
    except Exception as exc:  # noqa: BLE001
        raise StacError(f"stacSearch.url: search of {spec.url} failed: {one_line(exc)}") from None
    if allow is not None:  # the items' own links (and assets, later) are checked too
        for item in items:
            if item.get_self_href():
                allow.check_source(str(item.get_self_href()), "stacSearch.url")
    return items


def _catalog_search(spec: StacSearch, allow: AllowList | None) -> list[pystac.Item]:
    import pystac

    assert spec.catalog is not None
    try:
        catalog = pystac.Catalog.from_file(spec.catalog, stac_io=stac_reader(allow, "stacSearch.catalog"))
        items = []
        for item in catalog.get_items(recursive=True):
            if matches(item, spec):
                items.append(item)
                if len(items) >= spec.max_items:
                    break
    except StacError:
        raise
    except Exception as exc:  # noqa: BLE001
        if type(exc).__name__ == "AccessDenied":
            raise
        raise StacError(f"stacSearch.catalog: cannot read {spec.catalog}: {one_line(exc)}") from None
    return items


def matches(item: pystac.Item, spec: StacSearch) -> bool:
    """Whether a static catalog's Item passes the search's filters (as a STAC API would)."""
    import shapely

    if spec.collections is not None and item.collection_id not in spec.collections:
        return False
    if spec.ids is not None and item.id not in spec.ids:
        return False
    if spec.bbox is not None and item.geometry is not None:
        if not shapely.intersects(shapely.geometry.shape(item.geometry), shapely.box(*spec.bbox)):
            return False
    if spec.datetime is not None and not _in_interval(item, spec.datetime):
        return False
    for name, conditions in (spec.query or {}).items():
        value = item.properties.get(name)
        if not all(_compare(value, op, target) for op, target in conditions.items()):
            return False
    return True


def _when(text: str, end: bool) -> datetime | None:
    from pystac.utils import str_to_datetime

    if text in ("", ".."):
        return None
    if len(text) == 10:  # a date: the whole day
        text += "T23:59:59.999999Z" if end else "T00:00:00Z"
    when = str_to_datetime(text)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _in_interval(item: pystac.Item, interval: str) -> bool:
    """Whether the Item's datetime (or its start/end range) meets ``interval`` (RFC 3339,
    ``a/b`` with ``..`` for an open end, or one instant or date)."""
    start_text, _, end_text = interval.partition("/") if "/" in interval else (interval, "", interval)
    low, high = _when(start_text, False), _when(end_text, True)
    props = item.common_metadata
    first = props.start_datetime or item.datetime
    last = props.end_datetime or item.datetime
    if first is None or last is None:
        return False
    return (high is None or first <= high) and (low is None or last >= low)


def _compare(value: Any, op: str, target: Any) -> bool:
    if op == "eq":
        return bool(value == target)
    if op == "neq":
        return bool(value != target)
    if op == "in":
        return value in target
    if value is None:
        return False
    comparisons = {"lt": value < target, "lte": value <= target, "gt": value > target, "gte": value >= target}
    if op not in comparisons:
        raise StacError(f"stacSearch.query: unknown operator {op!r} (eq, neq, lt, lte, gt, gte, in)")
    return bool(comparisons[op])


#: ``{job id: {image url: its STAC Item's href}}`` of the last expansion of each job in this
#: process: what the job's STAC output links to (``derived_from``)
_SOURCES: dict[str, dict[str, str]] = {}


def source_item(job_id: str, url: str) -> str | None:
    """The href of the STAC Item that image ``url`` of job ``job_id`` came from, if any."""
    return _SOURCES.get(job_id, {}).get(url)


#: ``{job id: {image url: its Item's AssetMetadata}}``, beside :data:`_SOURCES`
_METADATA: dict[str, dict[str, AssetMetadata]] = {}


def image_metadata(job_id: str, url: str) -> AssetMetadata | None:
    """The STAC metadata of image ``url`` of job ``job_id`` (:func:`asset_metadata`), if any."""
    return _METADATA.get(job_id, {}).get(url)


def expand_request(request: ImageRequest, allow: AllowList | None = None) -> ImageRequest:
    """``request`` with its STAC Items and ``stacSearch`` replaced by their image assets' hrefs
    (``stacSources`` maps each href to its Item); a request without STAC comes back as is.
    Raises :class:`StacError` (one line) or ``AccessDenied`` (a STAC URL not allowed)."""
    if request._stac_expanded or (request.stac_search is None
                                  and not any(is_stac_url(u) for u in request.image_urls)):
        _SOURCES[request.job_id] = request.stac_sources
        if not request._stac_expanded:
            _METADATA.pop(request.job_id, None)
        return request
    key = request.stac_search.asset_key if request.stac_search else None
    urls: list[str] = []
    sources = dict(request.stac_sources)
    metadata: dict[str, AssetMetadata] = {}

    def add(item: pystac.Item, source: str) -> None:
        href = asset_href(item, key)
        urls.append(href)
        sources[href] = source
        found = asset_metadata(item, key)
        if found is not None:
            metadata[href] = found

    for i, url in enumerate(request.image_urls):
        if not is_stac_url(url):
            urls.append(url)
            continue
        if allow is not None:
            allow.check_source(url, f"imageUrls[{i}]")
        for item in read_items(url, allow, f"imageUrls[{i}]"):
            add(item, str(item.get_self_href() or url))
    if request.stac_search is not None:
        items = search(request.stac_search, allow)
        if not items:
            raise StacError("stacSearch: the search found no STAC Items")
        for item in items:
            add(item, str(item.get_self_href() or asset_href(item, key)))
    urls = list(dict.fromkeys(urls))  # an image found twice is processed once
    _SOURCES[request.job_id] = sources
    _METADATA[request.job_id] = metadata
    log.info("STAC: %d image(s) from %d STAC source(s)", len(urls), len(sources))
    expanded = request.model_copy(update={"image_urls": urls, "stac_search": None})
    expanded._stac_sources = sources
    expanded._stac_expanded = True
    return expanded


def item_array(item: pystac.Item, key: str | None = None, chunks: int = 4096) -> Any:
    """The Item's image asset as a lazily chunked ``(band, y, x)`` DataArray
    (:func:`pipeline.reading.open_image`) with the Item's ``proj:`` and ``raster:`` metadata
    where the file lacks them (:func:`resolve`): float values where a band has a scale or
    offset. Its name is the asset's href (:func:`pipeline.redact.public_url`)."""
    from pipeline.reading import open_image
    from pipeline.redact import public_url

    href = asset_href(item, key)
    array = open_image(href, chunks, metadata=asset_metadata(item, key))
    array.name = public_url(href)
    return array


# ---------------------------------------------------------------------------- STAC out
#: our properties on the Items and Collection a job writes (documented in the README)
PREFIX = "dmr"
MEDIA_TYPES = {"geojson": "application/geo+json", "parquet": "application/vnd.apache.parquet"}
SUFFIXES = {"geojson": ".geojson", "parquet": ".parquet"}


def features_item(item_id: str, geometry: dict[str, Any] | None, assets: dict[str, Any],
                  started: datetime, ended: datetime, *, sources: Sequence[str] = (),
                  collection: str | None = None, properties: dict[str, Any] | None = None) -> Any:
    """A STAC Item of features found in an image: ``geometry`` (GeoJSON, lon/lat; None for
    pixel features) the processed footprint, ``assets`` ``{key: pystac.Asset}`` the feature
    files, a ``derived_from`` link to each of ``sources`` (the images' own STAC Items)."""
    import pystac
    import shapely

    from pipeline.redact import public_url

    bbox = list(shapely.bounds(shapely.geometry.shape(geometry))) if geometry else None
    item = pystac.Item(item_id, geometry, bbox, ended, {
        **(properties or {}), "start_datetime": started.isoformat(), "end_datetime": ended.isoformat(),
    }, collection=collection)
    for key, asset in assets.items():
        item.add_asset(key, asset.clone())
    for source in sources:
        item.add_link(pystac.Link("derived_from", public_url(source), pystac.MediaType.JSON))
    return item


def job_stac(job_id: str, summary: dict[str, Any], formats: tuple[str, ...]) -> tuple[Any, list[Any]]:
    """The STAC Collection of a finished job and one Item per image that did not fail.

    Each Item's geometry is the image's processed footprint (``summary["images"][k]
    ["footprint"]``, from :func:`pipeline.sensor_models.footprint`; null for an image without
    georeferencing), its assets the job's feature files in ``formats`` (shared by the job's
    images: select an image's features by ``image_url``) and summary, its ``derived_from`` link
    the STAC Item the image came from (:func:`source_item`). Hrefs are relative: the files sit
    beside each other (``<jobId>.collection.json``, ``<jobId>.<k>.item.json``)."""
    import pystac
    from pystac.utils import str_to_datetime

    from pipeline.redact import public_url

    ended = str_to_datetime(summary["endTime"])
    started = str_to_datetime(summary["startTime"])
    assets = {fmt: pystac.Asset(f"./{job_id}{SUFFIXES[fmt]}", media_type=MEDIA_TYPES[fmt],
                                roles=["data"], title=f"features ({fmt})") for fmt in formats}
    assets["summary"] = pystac.Asset(f"./{job_id}.summary.json", media_type=pystac.MediaType.JSON,
                                     roles=["metadata"], title="job summary")
    items = []
    for k, image in enumerate(summary.get("images", [])):
        if image.get("status") == "FAILED":
            continue
        detections = image.get("detections") or {}
        source = source_item(job_id, str(image["url"]))
        items.append(features_item(
            f"{job_id}-{k}", image.get("footprint"), assets, started, ended,
            sources=[source] if source else [], collection=job_id, properties={
                f"{PREFIX}:jobId": job_id,
                f"{PREFIX}:imageUrl": public_url(str(image["url"])),
                f"{PREFIX}:status": image.get("status"),
                f"{PREFIX}:features": detections.get("afterMerge", 0),
                f"{PREFIX}:classes": image.get("classes", {}),
                f"{PREFIX}:model": summary.get("model", {}),
            }))
    boxes = [i.bbox for i in items if i.bbox] or [[-180.0, -90.0, 180.0, 90.0]]
    union = [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
             max(b[3] for b in boxes)]
    collection = pystac.Collection(
        job_id, f"Features found by job {job_id} ({summary.get('status')})",
        pystac.Extent(pystac.SpatialExtent([union]), pystac.TemporalExtent([[started, ended]])),
        license="other", extra_fields={f"{PREFIX}:status": summary.get("status"),
                                       f"{PREFIX}:features": summary.get("features", 0)})
    for key, asset in assets.items():
        collection.add_asset(key, asset.clone())
    return collection, items


def write_job_stac(directory: str | Any, job_id: str, summary: dict[str, Any],
                   formats: tuple[str, ...]) -> list[str]:
    """Write :func:`job_stac` into ``directory`` (each file atomically); return the paths."""
    import os
    from pathlib import Path

    import pystac

    from pipeline.sinks import staged_file

    directory = Path(directory)
    collection, items = job_stac(job_id, summary, formats)
    collection_name = f"{job_id}.collection.json"
    documents: list[tuple[str, dict[str, Any]]] = []
    for k, item in enumerate(items):
        name = f"{job_id}.{k}.item.json"
        item.add_link(pystac.Link("collection", f"./{collection_name}", pystac.MediaType.JSON))
        item.add_link(pystac.Link("parent", f"./{collection_name}", pystac.MediaType.JSON))
        collection.add_link(pystac.Link("item", f"./{name}", pystac.MediaType.GEOJSON))
        documents.append((name, item.to_dict(include_self_link=False, transform_hrefs=False)))
    documents.append((collection_name, collection.to_dict(include_self_link=False, transform_hrefs=False)))
    written = []
    for name, document in documents:
        text = json.dumps(document, indent=2)
        with staged_file(directory, ".json") as staged:
            staged.write_text(text)
            os.replace(staged, directory / name)
        written.append(str(directory / name))
    return written

