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
queue worker checks the expanded hrefs as any image URL. Assets are read by their absolute
hrefs; :func:`item_array` opens one as a DataArray with the Item's ``proj:`` georeferencing
(where the file has none) and ``raster:`` nodata, scale and offset.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pipeline.failures import one_line

if TYPE_CHECKING:
    import pystac

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


def _stac_io(allow: AllowList | None, field: str) -> Any:
    """pystac's I/O, checking every href it reads against ``allow`` first."""
    from pystac.stac_io import DefaultStacIO

    class CheckedStacIO(DefaultStacIO):
        def read_text(self, source: Any, *args: Any, **kwargs: Any) -> str:
            if allow is not None:
                allow.check_source(str(source), field)
            return str(super().read_text(source, *args, **kwargs))

    return CheckedStacIO()


def read_items(url: str, allow: AllowList | None = None, field: str = "imageUrls") -> list[pystac.Item]:
    """The Items of a STAC Item or ItemCollection document at ``url`` (a path or http(s) URL)."""
    import pystac

    io = _stac_io(allow, field)
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
        catalog = pystac.Catalog.from_file(spec.catalog, stac_io=_stac_io(allow, "stacSearch.catalog"))
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


def expand_request(request: ImageRequest, allow: AllowList | None = None) -> ImageRequest:
    """``request`` with its STAC Items and ``stacSearch`` replaced by their image assets' hrefs
    (``stacSources`` maps each href to its Item); a request without STAC comes back as is.
    Raises :class:`StacError` (one line) or ``AccessDenied`` (a STAC URL not allowed)."""
    if request._stac_expanded or (request.stac_search is None
                                  and not any(is_stac_url(u) for u in request.image_urls)):
        _SOURCES[request.job_id] = request.stac_sources
        return request
    key = request.stac_search.asset_key if request.stac_search else None
    urls: list[str] = []
    sources = dict(request.stac_sources)
    for i, url in enumerate(request.image_urls):
        if not is_stac_url(url):
            urls.append(url)
            continue
        if allow is not None:
            allow.check_source(url, f"imageUrls[{i}]")
        for item in read_items(url, allow, f"imageUrls[{i}]"):
            href = asset_href(item, key)
            urls.append(href)
            sources[href] = str(item.get_self_href() or url)
    if request.stac_search is not None:
        items = search(request.stac_search, allow)
        if not items:
            raise StacError("stacSearch: the search found no STAC Items")
        for item in items:
            href = asset_href(item, key)
            urls.append(href)
            sources[href] = str(item.get_self_href() or href)
    urls = list(dict.fromkeys(urls))  # an image found twice is processed once
    _SOURCES[request.job_id] = sources
    log.info("STAC: %d image(s) from %d STAC source(s)", len(urls), len(sources))
    expanded = request.model_copy(update={"image_urls": urls, "stac_search": None})
    expanded._stac_sources = sources
    expanded._stac_expanded = True
    return expanded


def item_array(item: pystac.Item, key: str | None = None, chunks: int = 4096) -> Any:
    """The Item's image asset as a lazily chunked ``(band, y, x)`` DataArray (rioxarray), with
    the Item's ``proj:`` CRS and transform where the file has none, and its ``raster:bands``
    nodata, scale and offset applied (float pixels where a scale or offset is given)."""
    import numpy as np
    import rioxarray
    from affine import Affine
    from pystac.extensions.projection import ProjectionExtension
    from pystac.extensions.raster import RasterExtension

    name = asset_key(item, key)
    asset = item.assets[name]
    href = str(asset.get_absolute_href())
    array: Any = rioxarray.open_rasterio(href, chunks={"band": -1, "y": chunks, "x": chunks}, lock=False)
    array.name = href
    if ProjectionExtension.has_extension(item):
        proj = ProjectionExtension.ext(asset)
        crs = proj.crs_string or (proj.wkt2 if proj.wkt2 else None)
        if array.rio.crs is None and crs and proj.transform:
            a, _, c, _, e, f = proj.transform[:6]  # pixel-centre coordinates, as rioxarray's
            array = array.assign_coords(x=c + a * (np.arange(array.sizes["x"]) + 0.5),
                                        y=f + e * (np.arange(array.sizes["y"]) + 0.5))
            array = array.rio.write_crs(crs).rio.write_transform(Affine(*proj.transform[:6]))
    if RasterExtension.has_extension(item):
        bands = RasterExtension.ext(asset).bands or []
        nodata = [b.nodata for b in bands]
        if nodata and nodata[0] is not None and array.rio.nodata is None:
            array = array.rio.write_nodata(nodata[0])
        scale = [b.scale if b.scale is not None else 1.0 for b in bands]
        offset = [b.offset if b.offset is not None else 0.0 for b in bands]
        if len(bands) == array.sizes["band"] and (any(s != 1.0 for s in scale) or any(offset)):
            values = array * np.array(scale)[:, None, None] + np.array(offset)[:, None, None]
            array = values.rio.write_crs(array.rio.crs) if array.rio.crs else values
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
    ["footprint"]``, from :func:`pipeline.io.footprint`; null for an image without
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

