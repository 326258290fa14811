"""Writing features and summaries: GeoJSON (RFC 7946 or OSML's form), GeoParquet 1.1,
summary JSON.

Files are serialised to a temporary file first and appear at their final names only when
complete (local: ``os.replace`` in the same directory). A sink per output type; more types
register in :data:`SINKS` (a factory ``(output, form) -> Sink``). The feature form
(:data:`FORMS`) is applied as features are written, from the one stored form of
:mod:`pipeline.geolocate`, so one job can write both.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import orjson
import pandas as pd
import shapely

from pipeline.bulk import no_cyclic_gc

FORMAT_SUFFIX = {"geojson": ".geojson", "parquet": ".parquet"}


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return None if not math.isfinite(value) else float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def summary_json(summary: dict[str, Any]) -> bytes:
    """The summary as indented JSON (orjson: a 500-image summary in ~0.05 s, where ``json``'s
    pure-Python indenting encoder took ~0.5 s at the end of the job, with the workers idle)."""
    return orjson.dumps(summary, default=_json_default,
                        option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS | orjson.OPT_APPEND_NEWLINE)


def _clean(values: list[Any]) -> list[Any]:
    """A column's values with non-finite floats as ``None`` (RFC 7946 JSON has no NaN)."""
    return [None if isinstance(v, float) and not math.isfinite(v) else v for v in values]


#: the output forms of features: RFC 7946 (lon/lat, counter-clockwise rings cut at the
#: antimeridian) and OSML (field for field what OSML Model Runner 2.3 writes)
FORMS = ("RFC7946", "OSML")
#: frame columns that are not feature properties (see :mod:`pipeline.geolocate`)
_INTERNAL = ("_ground", "_bbox", "_shape")
#: OSML rounds coordinates of geometries to this many decimals (the ``geojson`` package's)
OSML_PRECISION = 6
#: our own properties that OSML does not write
_NOT_OSML = ("image_url", "imageSegment")
#: a property value that is left out of the feature
_ABSENT = object()


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(value)


def _round(values: Any, digits: int = OSML_PRECISION) -> np.ndarray:
    """``values`` rounded exactly as Python's ``round(v, digits)`` rounds each (OSML's
    ``geojson`` package rounds so): numpy's rounding, and Python's for the few values whose
    scaled fraction is too close to one half for numpy's product to decide."""
    values = np.asarray(values, dtype=np.float64)
    out = np.round(values, digits)
    scaled = values * 10.0**digits
    tie = np.abs(scaled - np.floor(scaled) - 0.5) <= np.maximum(np.spacing(np.abs(scaled)) * 8, 1e-9)
    if tie.any():
        out[tie] = [round(v, digits) for v in values[tie].tolist()]
    return out


def _rounded(coordinates: Any) -> Any:
    """Nested GeoJSON coordinates rounded as OSML rounds them: a whole level at once where its
    positions make one array (a ring, a polygon whose rings have the same length, ...), else
    level by level (one numpy call per position took ~2 s for 2,816 shapes of 80 vertices)."""
    if isinstance(coordinates, list | tuple):
        if not coordinates:
            return []
        if isinstance(coordinates[0], list | tuple):
            try:
                array = np.asarray(coordinates, dtype=np.float64)
            except (ValueError, TypeError):  # ragged (rings of different lengths) or not numbers
                return [_rounded(c) for c in coordinates]
            return _round(array).tolist()
        return _round(coordinates).tolist()
    return coordinates


def geojson_dicts(shapes: np.ndarray) -> list[Any]:
    """GeoJSON dicts of shapely geometries, as ``json.loads(shapely.to_geojson(shape))`` gives
    them: 2-D polygons (the common shape: a segment's, a model's outline) built at once from
    their coordinates (the doubles that GEOS writes in full), the rest parsed from GEOS's text by
    orjson. For 2,816 polygons of 80 vertices: 0.06 s, where GEOS's text and ``json.loads``
    per shape took 0.24 s."""
    shapes = np.asarray(shapes, dtype=object)
    out: list[Any] = [None] * len(shapes)
    simple = (shapely.get_type_id(shapes) == shapely.GeometryType.POLYGON) & ~shapely.is_empty(shapes) \
        & ~shapely.has_z(shapes) & ~shapely.has_m(shapes)
    if simple.any():
        polygons = shapes[simple]
        rings = shapely.get_rings(polygons)
        coordinates = shapely.get_coordinates(rings)
        if np.isfinite(coordinates).all():  # GEOS writes NaN as null
            ends = np.cumsum(shapely.get_num_coordinates(rings)).tolist()
            positions = coordinates.tolist()
            ring_lists = [positions[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]
            at = 0
            for k, count in zip(np.flatnonzero(simple).tolist(),
                                (shapely.get_num_interior_rings(polygons) + 1).tolist(), strict=True):
                out[k] = {"type": "Polygon", "coordinates": ring_lists[at:at + count]}
                at += count
        else:
            simple[:] = False
    rest = np.flatnonzero(~simple & ~shapely.is_missing(shapes))
    for k, text in zip(rest.tolist(), shapely.to_geojson(shapes[rest]).tolist(), strict=True):
        out[k] = orjson.loads(text)  # json's decoder took ~4× the time
    return out


def _shape_values(values: list[Any], rows: list[int]) -> dict[int, Any]:
    """The model's shapes of ``rows`` as GeoJSON dicts: dicts stay, shapely geometries and WKB
    (a part's column) are converted."""
    out = {k: values[k] for k in rows if isinstance(values[k], dict) or values[k] is None}
    other = [k for k in rows if k not in out]
    if other:
        geometries = np.asarray([values[k] for k in other], dtype=object)
        if isinstance(values[other[0]], bytes | bytearray):
            geometries = shapely.from_wkb(geometries)
        for k, shape in zip(other, geojson_dicts(geometries), strict=True):
            out[k] = shape
    return out


#: a JSON string in compact orjson text that has no escapes
_STRINGS = re.compile(rb'"[^"]*"')
_RAISE_ORJSON = orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATETIME \
    | orjson.OPT_PASSTHROUGH_DATACLASS


def _as_json(text: bytes) -> bool:
    """Whether compact orjson ``text`` is ``json``'s text but for the separators' spaces: ASCII
    but DEL (json escapes the rest), no escapes, no strings holding a separator, no ``null`` (orjson
    writes NaN so, json refuses it), and no float that ``repr`` writes with an exponent (below
    1e-4, where orjson writes ``0.00001`` or ``1e-5`` for json's ``1e-05``; 1e16 and up, where
    both have an exponent): no ``e`` outside strings and no ``0.0000``."""
    if (not text.isascii() or b"\\" in text or b"\x7f" in text or b"null" in text
            or b"0.0000" in text):
        return False
    strings = _STRINGS.findall(text)
    return (text.count(b"e") == sum(s.count(b"e") for s in strings)
            and not any(b"," in s or b":" in s for s in strings))


def _no_default(value: Any) -> Any:
    raise TypeError


def _json_texts(values: Iterable[Any], encode: Callable[[Any], str]) -> list[str]:
    """``encode(value)`` (``json``'s encoder with its default separators ``", "``/``": "``) of
    each value, made by orjson where that gives the same text (10× faster for GeoJSON
    geometries' coordinates): compact orjson text that is ASCII, has no escapes, separators in
    strings, nulls (orjson writes NaN so), exponents or types that ``json`` hands to its
    ``default`` (numpy scalars, subclasses, dates), with a space added after each separator."""
    out = []
    for value in values:
        try:
            text = orjson.dumps(value, default=_no_default, option=_RAISE_ORJSON)
        except TypeError:  # orjson.JSONEncodeError: json's default, big integers, ...
            out.append(encode(value))
            continue
        out.append(text.replace(b",", b", ").replace(b":", b": ").decode() if _as_json(text)
                   else encode(value))
    return out


def _image_geometries(columns: dict[str, list[Any]], shaped: list[bool], form: str) -> list[Any]:
    """``imageGeometry`` per row: the model's shape (rounded in OSML's form), else the box's
    ring from ``imageBBox`` (RFC 7946: NW, NE, SE, SW as stored; OSML: NE, SE, SW, NW rounded)."""
    values = columns["imageGeometry"]
    n = len(values)
    own = [k for k in range(n) if shaped[k]]
    shapes = _shape_values(values, own)
    boxes = columns.get("imageBBox")
    out: list[Any] = list(values)
    if boxes is not None and len(own) < n:
        box = [k for k in range(n) if not shaped[k] and boxes[k] is not None]
        array = np.asarray([boxes[k] for k in box], dtype=np.float64).reshape(-1, 4)
        order = [2, 1, 2, 3, 0, 3, 0, 1, 2, 1] if form == "OSML" else [0, 1, 2, 1, 2, 3, 0, 3, 0, 1]
        rings = (_round(array) if form == "OSML" else array)[:, order].reshape(-1, 5, 2).tolist()
        for k, ring in zip(box, rings, strict=True):
            out[k] = {"type": "Polygon", "coordinates": [ring]}
    for k, shape in shapes.items():
        out[k] = {**shape, "coordinates": _rounded(shape["coordinates"])} \
            if form == "OSML" and shape is not None and "coordinates" in shape else shape
    return out


def _drop_nulls(classes: list[Any]) -> list[Any]:
    """``featureClasses`` lists without the null keys that a GeoParquet part adds to entries
    that lack a key other entries have."""
    if not any(None in c.values() for entries in classes if entries for c in entries):
        return classes
    return [[{k: v for k, v in c.items() if v is not None} for c in entries] if entries else entries
            for entries in classes]


def _osml_ground(ground: list[Any], geometry: np.ndarray) -> list[str | None]:
    """OSML's ``geometry`` texts: the shapes as geolocated (vertices in their own order) with
    ``[lon, lat, height]`` positions rounded to 6 decimals; null where the feature has no lon/lat."""
    values = np.asarray(ground, dtype=object)
    if len(values) and isinstance(next((v for v in values if v is not None), None), bytes | bytearray):
        values = shapely.from_wkb(values)
    values[shapely.is_missing(np.asarray(geometry, dtype=object))] = None
    values = shapely.transform(shapely.force_3d(values, 0.0), _round, include_z=True)
    return list(shapely.to_geojson(values).tolist())


_DATES: dict[str, str] = {}


def _osml_time(value: str) -> str:
    """An ISO 8601 time as OSML writes ``inferenceDT``: UTC, whole seconds, ``Z``."""
    if value not in _DATES:
        from datetime import UTC, datetime

        moment = datetime.fromisoformat(value)
        moment = moment.astimezone(UTC) if moment.tzinfo else moment
        _DATES[value] = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    return _DATES[value]


def _osml_source(meta: Any, url: Any) -> list[dict[str, Any]] | None:
    """OSML's ``sourceMetadata`` (NITF only) from ours (:func:`pipeline.nitf.source_metadata`)."""
    if not meta:
        return None
    moment = meta.get("sourceDT")
    return [{"location": url, "format": "NITF", "category": meta.get("imageCategory") or "",
             "sourceId": meta.get("fileTitle") or "",
             "sourceDT": moment.replace("+00:00", "Z") if isinstance(moment, str) else moment}]


def _osml_properties(columns: dict[str, list[Any]], shaped: list[bool], n: int) -> None:
    """Turn the property columns into OSML's (in place): ``imageBBox`` only where the model
    gave one, centres only where geolocated, ``inferenceDT`` in whole seconds,
    ``sourceMetadata`` as OSML's list, and not our own ``image_url``/``imageSegment``."""
    bbox = columns.get("_bbox") or [None] * n
    georeferenced = any(_finite(v) for v in columns.get("center_longitude") or [])
    if "imageBBox" in columns and georeferenced:
        columns["imageBBox"] = [b if not own or box is not None else _ABSENT
                                for b, box, own in zip(columns["imageBBox"], bbox, shaped, strict=True)]
    for name in ("center_longitude", "center_latitude"):
        if name in columns:
            columns[name] = [v if _finite(v) else _ABSENT for v in columns[name]]
    if "inferenceMetadata" in columns:
        columns["inferenceMetadata"] = [
            {**m, "inferenceDT": _osml_time(m["inferenceDT"])} if m and m.get("inferenceDT") else m
            for m in columns["inferenceMetadata"]
        ]
    if "sourceMetadata" in columns:
        urls = columns.get("image_url") or [None] * n
        columns["sourceMetadata"] = [
            _osml_source(m, u) or _ABSENT for m, u in zip(columns.pop("sourceMetadata"), urls, strict=True)
        ]
    for name in _NOT_OSML:
        columns.pop(name, None)


def _feature_texts(geometry: np.ndarray, columns: dict[str, list[Any]],
                   form: str = "RFC7946") -> Iterator[str]:
    """One GeoJSON Feature as JSON text per row, in ``form`` (:data:`FORMS`): the ``id`` column
    is the feature's id, ``modelProperties`` (JSON text) is merged into its properties, the
    internal columns give OSML's ``geometry`` and ``bbox``, the other columns are its
    properties (plain Python values)."""
    if form not in FORMS:
        raise ValueError(f"unknown feature form {form!r} (expected one of {', '.join(FORMS)})")
    columns = dict(columns)
    n = len(geometry)
    ids = columns.pop("id", None)
    model = columns.pop("modelProperties", None) or [None] * n
    shaped = [v is True for v in columns.pop("_shape", None) or [False] * n]
    ground = columns.pop("_ground", None)
    bbox = columns.pop("_bbox", None) or [None] * n
    if "imageGeometry" in columns:
        columns["imageGeometry"] = _image_geometries(columns, shaped, form)
    if "featureClasses" in columns:
        columns["featureClasses"] = _drop_nulls(columns["featureClasses"])
    if form == "OSML":
        geometries = _osml_ground(ground if ground is not None else list(geometry), geometry)
        columns["_bbox"] = bbox
        _osml_properties(columns, shaped, n)
        columns.pop("_bbox")
    else:
        geometries = shapely.to_geojson(shapely.orient_polygons(geometry)).tolist()
        bbox = [None] * n
    encode = json.JSONEncoder(default=_json_default, allow_nan=False).encode
    # ``imageGeometry`` (most of a shaped feature's text) is encoded apart, a column at a time
    # (:func:`_json_texts`), and put between the encoded properties before and after it
    at = list(columns).index("imageGeometry") if "imageGeometry" in columns else len(columns)
    shape_texts = _json_texts(_clean(columns.pop("imageGeometry")), encode) \
        if "imageGeometry" in columns else None
    names = list(columns)
    rows = zip(*(_clean(values) for values in columns.values()), strict=True) if names \
        else iter([()] * n)
    head_names, tail_names = names[:at], names[at:]
    for k, (geometry_text, values) in enumerate(zip(geometries, rows, strict=True)):
        if shape_texts is None:
            body = encode({name: v for name, v in zip(names, values, strict=True) if v is not _ABSENT})
        else:
            head = encode({name: v for name, v in zip(head_names, values[:at], strict=True)
                           if v is not _ABSENT})
            tail = encode({name: v for name, v in zip(tail_names, values[at:], strict=True)
                           if v is not _ABSENT})
            inner = [part for part in (head[1:-1], f'"imageGeometry": {shape_texts[k]}', tail[1:-1]) if part]
            body = f"{{{', '.join(inner)}}}"
        if isinstance(model[k], str):  # None or NaN where the model said no more
            body = f"{body[:-1]}{', ' if len(body) > 2 else ''}{model[k][1:]}"
        feature_id = ids[k] if ids is not None else None
        identifier = f'"id":{json.dumps(feature_id)},' if feature_id is not None else ""
        box = f'"bbox":{json.dumps(bbox[k])},' if bbox[k] is not None else ""
        yield (f'{{"type":"Feature",{box}{identifier}"geometry":{geometry_text or "null"},'
               f'"properties":{body}}}')


def _frame_columns(features: gpd.GeoDataFrame) -> tuple[np.ndarray, dict[str, list[Any]]]:
    """A GeoDataFrame's geometries and its other columns as lists of Python values."""
    name = features.geometry.name
    return features.geometry.values, {c: features[c].tolist() for c in features.columns if c != name}


#: rows read from a GeoParquet part at a time by the streaming writers (bounds their memory)
PART_BATCH_ROWS = 5000


def _part_batches(path: str | Path,
                  rows: int = PART_BATCH_ROWS) -> Iterator[tuple[np.ndarray, dict[str, list[Any]]]]:
    """A GeoParquet part's geometries and other columns (not its bbox covering) as lists of
    Python values, ``rows`` at a time (``pyarrow`` batches; nested columns come back as lists
    and dicts)."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as part:
        geo = json.loads(part.schema_arrow.metadata[b"geo"])
        primary = geo["primary_column"]
        covering = geo["columns"][primary].get("covering", {}).get("bbox", {})
        skip = {str(column[0]) for column in covering.values()}
        names = [name for name in part.schema_arrow.names if name not in skip]
        for batch in part.iter_batches(batch_size=rows, columns=names):
            with no_cyclic_gc():  # a batch's values hold no cycles
                geometry = shapely.from_wkb(batch.column(primary).to_numpy(zero_copy_only=False))
                columns = {name: batch.column(name).to_pylist() for name in names if name != primary}
            yield geometry, columns


def _columns_of(parts: Iterable[gpd.GeoDataFrame | str | Path],
                rows: int | None = None) -> Iterator[tuple[np.ndarray, dict[str, list[Any]]]]:
    """Geometries and columns of frames and of GeoParquet part files, ``rows`` (default
    :data:`PART_BATCH_ROWS`) at a time (the Python values of a whole frame's nested columns
    took several times its own memory)."""
    rows = rows or PART_BATCH_ROWS
    for part in parts:
        if isinstance(part, gpd.GeoDataFrame):
            for start in range(0, max(len(part), 1), rows):
                yield _frame_columns(part.iloc[start:start + rows])
        else:
            yield from _part_batches(part, rows)


def write_geojson(features: gpd.GeoDataFrame | Iterable[gpd.GeoDataFrame | str | Path],
                  path: str | Path, form: str = "RFC7946") -> None:
    """A FeatureCollection in ``form`` (:data:`FORMS`; RFC 7946: lon/lat, CCW rings), written
    feature by feature.

    ``features`` may also be an iterable of frames or GeoParquet part files, written one after
    another (one in memory at a time).
    """
    parts = [features] if isinstance(features, gpd.GeoDataFrame) else features
    with open(path, "w", encoding="utf-8") as out:
        out.write('{"type":"FeatureCollection","features":[')
        n = 0
        for columns in _columns_of(parts):
            with no_cyclic_gc():  # a batch's values and texts hold no cycles
                for text in _feature_texts(*columns, form=form):
                    out.write(f'{"," if n else ""}\n{text}')
                    n += 1
        out.write("\n]}\n")


def feature_collection(texts: Sequence[str]) -> bytes:
    """A FeatureCollection of feature texts (from :func:`_feature_texts`), as UTF-8 bytes."""
    body = ",".join(f"\n{text}" for text in texts)
    return f'{{"type":"FeatureCollection","features":[{body}\n]}}\n'.encode()


def _image_shapes(features: gpd.GeoDataFrame) -> np.ndarray:
    """The ``imageGeometry`` column as shapely geometries: boxes' rings (NW, NE, SE, SW) built
    at once from ``imageBBox``, the model's shapes from their GeoJSON dicts."""
    values = features["imageGeometry"].tolist()
    n = len(values)
    out = np.empty(n, dtype=object)
    dicts = np.fromiter((isinstance(v, dict) for v in values), dtype=bool, count=n)
    boxes = np.zeros(n, dtype=bool)
    if "_shape" in features.columns and "imageBBox" in features.columns:
        boxes = dicts & ~features["_shape"].to_numpy(dtype=bool)
    if boxes.any():
        array = np.asarray(features["imageBBox"].to_numpy()[boxes].tolist(), dtype=np.float64)
        out[boxes] = shapely.polygons(array[:, [0, 1, 2, 1, 2, 3, 0, 3, 0, 1]].reshape(-1, 5, 2))
    for k in np.flatnonzero(~boxes & ~dicts).tolist():
        out[k] = values[k]
    shapes = np.flatnonzero(~boxes & dicts)
    if len(shapes):
        out[shapes] = _geometries_of([values[k] for k in shapes.tolist()])
    return out


def _geometries_of(dicts: list[dict[str, Any]]) -> np.ndarray:
    """Shapely geometries of GeoJSON geometry dicts, as ``shapely.from_geojson`` reads them:
    2-D polygons (closed rings of 4 or more finite positions) built at once from their
    coordinates, the rest by one ``from_geojson`` call (orjson's texts). For 2,816 polygons of
    80 vertices: 0.04 s, where a ``from_geojson(json.dumps(...))`` per shape took 0.4 s."""
    out = np.empty(len(dicts), dtype=object)
    simple = [k for k, d in enumerate(dicts)
              if d.get("type") == "Polygon" and _ring_lists(d.get("coordinates"))]
    built = _polygons(dicts, simple) if simple else None
    if built is not None:
        out[simple] = built
    done = set(simple) if built is not None else set()
    rest = [k for k in range(len(dicts)) if k not in done]
    if rest:
        out[rest] = shapely.from_geojson([_geojson_bytes(dicts[k]) for k in rest])
    return out


def _ring_lists(coordinates: Any) -> bool:
    """Whether ``coordinates`` are a polygon's rings of 4 or more positions, the first 2-D."""
    return isinstance(coordinates, list) and bool(coordinates) and all(
        isinstance(ring, list) and len(ring) >= 4 for ring in coordinates) \
        and isinstance(coordinates[0][0], list | tuple) and len(coordinates[0][0]) == 2


def _polygons(dicts: list[dict[str, Any]], rows: list[int]) -> np.ndarray | None:
    """The polygons of ``rows`` (:func:`_geometries_of`), or None where one of them is not 2-D,
    closed or finite (those go through ``from_geojson`` with its own checks and errors)."""
    rings = [ring for k in rows for ring in dicts[k]["coordinates"]]
    try:
        coordinates = np.array([position for ring in rings for position in ring], dtype=np.float64)
    except (ValueError, TypeError):  # ragged (3-D positions among them), not numbers
        return None
    if coordinates.ndim != 2 or coordinates.shape[1] != 2 or not np.isfinite(coordinates).all():
        return None
    sizes = np.array([len(ring) for ring in rings], dtype=np.int64)
    ends = np.cumsum(sizes)
    if not (coordinates[ends - sizes] == coordinates[ends - 1]).all():  # GEOS refuses open rings
        return None
    linear = shapely.linearrings(coordinates, indices=np.repeat(np.arange(len(rings)), sizes))
    counts = [len(dicts[k]["coordinates"]) for k in rows]
    return np.asarray(shapely.polygons(linear, indices=np.repeat(np.arange(len(rows)), counts)), dtype=object)


def _geojson_bytes(value: dict[str, Any]) -> bytes | str:
    """A GeoJSON geometry dict as JSON text for GEOS (orjson; ``json`` where orjson cannot)."""
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError: a big integer, a numpy scalar, ...
        return json.dumps(value)


def with_image_shapes(features: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """``features`` with ``imageGeometry`` as a geometry column (pixels, no CRS), as GeoParquet
    stores it and a job's result holds it (:func:`pipeline.geolocate.to_features` gives dicts)."""
    if "imageGeometry" in features.columns and not isinstance(features["imageGeometry"], gpd.GeoSeries):
        features = features.assign(imageGeometry=gpd.GeoSeries(_image_shapes(features), index=features.index))
    return features


def write_parquet(features: gpd.GeoDataFrame, path: str | Path, internal: bool = True) -> None:
    """GeoParquet 1.1 with a ``bbox`` covering column; ``imageGeometry`` is stored as a
    geometry column (pixels, no CRS: a model's shapes differ in type). ``internal=False`` (an
    output file) leaves out the internal columns that only the GeoJSON forms need."""
    features = with_image_shapes(features)
    if not internal:
        features = features.drop(columns=[c for c in _INTERNAL if c in features.columns])
    features.to_parquet(path, schema_version="1.1.0", write_covering_bbox=True, index=False)


def concat_parquet(paths: Sequence[str | Path], path: str | Path) -> None:
    """Concatenate GeoParquet parts into one file, batch by batch (a row group per batch of at
    most ``10 × PART_BATCH_ROWS`` rows), without holding more than one batch in memory; the
    ``geo`` metadata's bbox and geometry types cover all parts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schemas = [pq.read_schema(p) for p in paths]
    geo = json.loads(schemas[0].metadata[b"geo"])
    for internal in _INTERNAL:  # an output file: no internal columns
        geo["columns"].pop(internal, None)
    for column in geo["columns"]:
        boxes = [json.loads(s.metadata[b"geo"])["columns"].get(column, {}) for s in schemas]
        spans = np.array([b["bbox"] for b in boxes if b.get("bbox")], dtype=np.float64).reshape(-1, 4)
        if len(spans):
            geo["columns"][column]["bbox"] = [*spans[:, :2].min(axis=0), *spans[:, 2:].max(axis=0)]
        geo["columns"][column]["geometry_types"] = sorted(
            {t for b in boxes for t in b.get("geometry_types", [])})
    unified = pa.unify_schemas([s.remove_metadata() for s in schemas], promote_options="permissive")
    unified = pa.schema([f for f in unified if f.name not in _INTERNAL])
    schema = unified.with_metadata({**schemas[0].metadata, b"geo": json.dumps(geo).encode()})
    with pq.ParquetWriter(path, schema) as writer:
        for part in paths:
            with pq.ParquetFile(part) as source:
                for batch in source.iter_batches(batch_size=PART_BATCH_ROWS * 10):
                    table = pa.Table.from_batches([batch])
                    for name in schema.names:  # a column that some parts lack (per-image properties)
                        if name not in table.column_names:
                            table = table.append_column(name, pa.nulls(len(table), schema.field(name).type))
                    writer.write_table(table.select(schema.names).cast(schema))


WRITERS: dict[str, Callable[[gpd.GeoDataFrame, str | Path], None]] = {
    "geojson": write_geojson,
    "parquet": partial(write_parquet, internal=False),
}


@contextmanager
def staged_file(directory: str | Path, suffix: str) -> Iterator[Path]:
    """A temporary file in ``directory`` that is removed unless the caller moved it away."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=".partial-", suffix=suffix, dir=directory)
    os.close(handle)
    try:
        yield Path(name)
    finally:
        if os.path.exists(name):
            os.unlink(name)


class Sink(ABC):
    """Where one output of a job goes."""

    @abstractmethod
    def write_features(self, job_id: str, features: gpd.GeoDataFrame) -> list[str]:
        """Write the features in every format of this output; return the locations."""

    @abstractmethod
    def write_summary(self, job_id: str, summary: dict[str, Any]) -> str:
        """Write ``<jobId>.summary.json``; return its location."""

    def write_feature_parts(self, job_id: str, parts: Sequence[str | Path]) -> list[str]:
        """Write the features held in GeoParquet ``parts`` (a streaming job's part files) as
        one output. This default reads them all into memory; sinks that can stream override it."""
        features = pd.concat([gpd.read_parquet(p) for p in parts], ignore_index=True)
        return self.write_features(job_id, gpd.GeoDataFrame(features, crs=features.crs))

    def describe(self) -> str:
        return type(self).__name__


class LocalSink(Sink):
    """``LOCAL`` output: ``<path>/<jobId>.<suffix>``, atomically by rename."""

    def __init__(self, path: str | Path, formats: tuple[str, ...] = ("geojson", "parquet"),
                 form: str = "RFC7946", stac: bool = False):
        self.directory = Path(path)
        self.formats = formats
        self.form = form  # of the GeoJSON file
        self.stac = stac  # also STAC Items and a Collection beside the summary
        self.stac_files: list[str] = []  # what the last write_summary wrote of them

    def _publish(self, name: str, write: Callable[[Path], object]) -> str:
        final = self.directory / name
        with staged_file(self.directory, Path(name).suffix) as staged:
            write(staged)
            os.replace(staged, final)
        return str(final)

    def write_features(self, job_id: str, features: gpd.GeoDataFrame) -> list[str]:
        writers: dict[str, Callable[[Path], None]] = {
            "geojson": lambda p: write_geojson(features, p, self.form),
            "parquet": lambda p: WRITERS["parquet"](features, p),
        }
        return [self._publish(f"{job_id}{FORMAT_SUFFIX[fmt]}", writers[fmt]) for fmt in self.formats]

    def write_feature_parts(self, job_id: str, parts: Sequence[str | Path]) -> list[str]:
        """Stream the parts into the final files: one part in memory at a time."""
        writers: dict[str, Callable[[Path], None]] = {
            "geojson": lambda p: write_geojson(parts, p, self.form),
            "parquet": lambda p: concat_parquet(parts, p),
        }
        return [self._publish(f"{job_id}{FORMAT_SUFFIX[fmt]}", writers[fmt]) for fmt in self.formats]

    def write_summary(self, job_id: str, summary: dict[str, Any]) -> str:
        from pipeline.redact import redact_obj

        text = summary_json(redact_obj(summary))  # no secrets
        written = self._publish(f"{job_id}.summary.json", lambda p: p.write_bytes(text))
        self.stac_files = self.write_stac(job_id, summary)
        return written

    def write_stac(self, job_id: str, summary: dict[str, Any]) -> list[str]:
        """With ``stac``: a STAC Item per image and a Collection (:mod:`pipeline.stac`)."""
        if not self.stac:
            return []
        from pipeline.redact import redact_obj
        from pipeline.stac import write_job_stac

        return write_job_stac(self.directory, job_id, redact_obj(summary), tuple(self.formats))

    def describe(self) -> str:
        return str(self.directory)


SINKS: dict[str, str] = {"LOCAL": "pipeline.sinks:local_sink"}


def local_sink(output: Any, form: str = "RFC7946") -> Sink:
    return LocalSink(output.path, tuple(output.formats), form, getattr(output, "stac", False))


def make_sink(output: Any, form: str | None = None) -> Sink:
    """The sink for one request output (``LocalOutput``, ``S3Output``, ...), writing features
    in the output's ``featureForm``, else in ``form`` (the run mode's default), else RFC 7946."""
    import importlib

    reference = SINKS.get(output.type)
    if reference is None:
        raise ValueError(f"output type {output.type} is not supported yet")
    module_name, _, attribute = reference.partition(":")
    factory: Callable[..., Sink] = getattr(importlib.import_module(module_name), attribute)
    return factory(output, getattr(output, "feature_form", None) or form or "RFC7946")


class KinesisSink(Sink):
    """``Kinesis`` output (as OSML has it): records with ``PartitionKey`` = the job id and
    ``Data`` = a GeoJSON FeatureCollection of at most ``batch_size`` features (in OSML's form,
    one feature per record, as OSML puts them)."""

    #: Kinesis limits: records and bytes per PutRecords call, bytes per record
    MAX_RECORDS, MAX_CALL_BYTES, MAX_RECORD_BYTES = 500, 5_000_000, 1_000_000

    def __init__(self, stream: str, batch_size: int = 1000, role: str | None = None,
                 client: Any = None, form: str = "RFC7946"):
        self.stream = stream
        self.form = form
        self.batch_size = 1 if form == "OSML" else batch_size
        self.role = role
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            from pipeline.aws import client

            self._client = client("kinesis", self.role)
        return self._client

    def _payloads(self, texts: Iterator[str]) -> Iterator[bytes]:
        """FeatureCollections of at most ``batch_size`` features, halved until one fits."""
        while True:
            with no_cyclic_gc():  # the batch's texts hold no cycles
                batch = list(islice(texts, self.batch_size))
            if not batch:
                return
            yield from self._fitted(batch)

    def _fitted(self, texts: list[str]) -> Iterator[bytes]:
        data = feature_collection(texts)
        if len(data) > self.MAX_RECORD_BYTES and len(texts) > 1:
            half = len(texts) // 2
            yield from self._fitted(texts[:half])
            yield from self._fitted(texts[half:])
        else:
            yield data

    def _put(self, records: list[dict[str, Any]]) -> None:
        import time

        for attempt in range(5):
            answer = self.client.put_records(StreamName=self.stream, Records=records)
            if not answer.get("FailedRecordCount"):
                return
            records = [r for r, out in zip(records, answer["Records"], strict=True)
                       if out.get("ErrorCode")]
            time.sleep(0.2 * 2**attempt)
        raise RuntimeError(f"Kinesis stream {self.stream}: {len(records)} records not accepted")

    def _send(self, job_id: str, parts: Iterable[gpd.GeoDataFrame | str | Path]) -> list[str]:
        """Put the features of ``parts`` (read batch by batch) in PutRecords calls of at most
        :attr:`MAX_RECORDS` records and :attr:`MAX_CALL_BYTES` bytes."""
        texts = (text for columns in _columns_of(parts) for text in _feature_texts(*columns, form=self.form))
        records: list[dict[str, Any]] = []
        size = 0
        for data in self._payloads(texts):
            if len(records) == self.MAX_RECORDS or size + len(data) > self.MAX_CALL_BYTES:
                self._put(records)
                records, size = [], 0
            records.append({"Data": data, "PartitionKey": job_id})
            size += len(data)
        if records:
            self._put(records)
        return [self.describe()]

    def write_features(self, job_id: str, features: gpd.GeoDataFrame) -> list[str]:
        return self._send(job_id, [features])

    def write_feature_parts(self, job_id: str, parts: Sequence[str | Path]) -> list[str]:
        """Stream the parts to the stream: one batch of features in memory at a time."""
        return self._send(job_id, parts)

    def write_summary(self, job_id: str, summary: dict[str, Any]) -> str:
        """Kinesis carries features only; the summary goes to the other outputs."""
        return self.describe()

    def describe(self) -> str:
        return f"kinesis://{self.stream}"


def kinesis_sink(output: Any, form: str = "RFC7946") -> Sink:
    return KinesisSink(output.stream, output.batch_size, output.role, form=form)


SINKS["KINESIS"] = "pipeline.sinks:kinesis_sink"


class S3Sink(Sink):
    """``S3`` output: ``s3://<bucket>/<prefix>/<jobId>.<suffix>``, complete or not at all.

    Each file is written to a local temporary directory first and then uploaded (boto3's
    managed transfer: one PUT, or a multipart upload that S3 shows only once it completes and
    that is aborted on failure). ``role`` is assumed through STS for the writes.
    """

    def __init__(self, bucket: str, prefix: str = "", formats: tuple[str, ...] = ("geojson", "parquet"),
                 role: str | None = None, form: str = "RFC7946", stac: bool = False):
        self.form = form  # of the GeoJSON file
        self.stac = stac
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.formats = formats
        self.role = role
        self._client: Any = None

    def key(self, name: str) -> str:
        """The object key of ``name``: the prefix joined with exactly one ``/``."""
        return f"{self.prefix}/{name}" if self.prefix else name

    def _s3(self) -> Any:
        if self._client is None:
            from pipeline import aws

            self._client = aws.client("s3", self.role)
        return self._client

    def _upload(self, files: list[str]) -> list[str]:
        written = []
        for path in files:
            key = self.key(Path(path).name)
            upload(self._s3(), Path(path), self.bucket, key)
            written.append(f"s3://{self.bucket}/{key}")
        return written

    def _staged(self, write: Callable[[LocalSink], list[str]]) -> list[str]:
        with tempfile.TemporaryDirectory(prefix="s3-out-") as directory:
            return self._upload(write(LocalSink(directory, self.formats, self.form, self.stac)))

    def write_features(self, job_id: str, features: gpd.GeoDataFrame) -> list[str]:
        return self._staged(lambda local: local.write_features(job_id, features))

    def write_feature_parts(self, job_id: str, parts: Sequence[str | Path]) -> list[str]:
        return self._staged(lambda local: local.write_feature_parts(job_id, parts))

    def write_summary(self, job_id: str, summary: dict[str, Any]) -> str:
        return self._staged(lambda local: [local.write_summary(job_id, summary), *local.stac_files])[0]

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.key('')}"


def upload(s3: Any, body: bytes | Path, bucket: str, key: str) -> None:
    """Put ``body`` (bytes, or a local file through boto3's managed transfer: multipart when
    large, aborted on failure) at ``s3://bucket/key``; a failure is one-line :class:`OSError`."""
    import botocore.exceptions

    try:
        if isinstance(body, Path):
            s3.upload_file(str(body), bucket, key)
        else:
            s3.put_object(Bucket=bucket, Key=key, Body=body)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError,
            boto3_transfer_errors()) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise OSError(f"cannot write s3://{bucket}/{key}: {message}") from None


def boto3_transfer_errors() -> type[Exception]:
    """boto3's transfer failure (an upload that failed after retries)."""
    from boto3.exceptions import S3UploadFailedError

    return S3UploadFailedError


def s3_sink(output: Any, form: str = "RFC7946") -> Sink:
    return S3Sink(output.bucket, output.prefix, tuple(output.formats), output.role, form,
                  getattr(output, "stac", False))


SINKS["S3"] = "pipeline.sinks:s3_sink"
