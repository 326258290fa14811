"""Writing features and summaries: GeoJSON (RFC 7946), GeoParquet 1.1, summary JSON.

Files are serialised to a temporary file first and appear at their final names only when
complete (local: ``os.replace`` in the same directory). A sink per output type; more types
register in :data:`SINKS`.
"""

from __future__ import annotations

import json
import math
import os
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


def _clean(values: list[Any]) -> list[Any]:
    """A column's values with non-finite floats as ``None`` (RFC 7946 JSON has no NaN)."""
    return [None if isinstance(v, float) and not math.isfinite(v) else v for v in values]


def _feature_texts(geometry: np.ndarray, columns: dict[str, list[Any]]) -> Iterator[str]:
    """One RFC 7946 Feature (lon/lat, CCW rings) as JSON text per row: the ``id`` column is
    the feature's id, the other columns its properties (plain Python values)."""
    geometries = shapely.to_geojson(shapely.orient_polygons(geometry))
    ids = columns.pop("id", None)
    names = list(columns)
    rows = zip(*(_clean(values) for values in columns.values()), strict=True) if names \
        else iter([()] * len(geometries))
    encode = json.JSONEncoder(default=_json_default, allow_nan=False).encode
    for k, (geometry_text, values) in enumerate(zip(geometries, rows, strict=True)):
        body = encode(dict(zip(names, values, strict=True)))
        feature_id = ids[k] if ids is not None else None
        identifier = f'"id":{json.dumps(feature_id)},' if feature_id is not None else ""
        yield f'{{"type":"Feature",{identifier}"geometry":{geometry_text or "null"},"properties":{body}}}'


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
                rows: int = PART_BATCH_ROWS) -> Iterator[tuple[np.ndarray, dict[str, list[Any]]]]:
    """Geometries and columns of frames (whole) and of GeoParquet part files (batch by batch)."""
    for part in parts:
        if isinstance(part, gpd.GeoDataFrame):
            yield _frame_columns(part)
        else:
            yield from _part_batches(part, rows)


def write_geojson(features: gpd.GeoDataFrame | Iterable[gpd.GeoDataFrame | str | Path],
                  path: str | Path) -> None:
    """An RFC 7946 FeatureCollection, written feature by feature (lon/lat, CCW rings).

    ``features`` may also be an iterable of frames or GeoParquet part files, written one after
    another (one in memory at a time).
    """
    parts = [features] if isinstance(features, gpd.GeoDataFrame) else features
    with open(path, "w", encoding="utf-8") as out:
        out.write('{"type":"FeatureCollection","features":[')
        n = 0
        for columns in _columns_of(parts):
            with no_cyclic_gc():  # a batch's values and texts hold no cycles
                for text in _feature_texts(*columns):
                    out.write(f'{"," if n else ""}\n{text}')
                    n += 1
        out.write("\n]}\n")


def feature_collection(texts: Sequence[str]) -> bytes:
    """A FeatureCollection of feature texts (from :func:`_feature_texts`), as UTF-8 bytes."""
    body = ",".join(f"\n{text}" for text in texts)
    return f'{{"type":"FeatureCollection","features":[{body}\n]}}\n'.encode()


def write_parquet(features: gpd.GeoDataFrame, path: str | Path) -> None:
    """GeoParquet 1.1 with a ``bbox`` covering column."""
    features.to_parquet(path, schema_version="1.1.0", write_covering_bbox=True, index=False)


def concat_parquet(paths: Sequence[str | Path], path: str | Path) -> None:
    """Concatenate GeoParquet parts into one file, batch by batch (a row group per batch of at
    most ``10 × PART_BATCH_ROWS`` rows), without holding more than one batch in memory; the
    ``geo`` metadata's bbox and geometry types cover all parts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schemas = [pq.read_schema(p) for p in paths]
    geo = json.loads(schemas[0].metadata[b"geo"])
    column = geo["primary_column"]
    boxes = [json.loads(s.metadata[b"geo"])["columns"][column] for s in schemas]
    spans = np.array([b["bbox"] for b in boxes if b.get("bbox")], dtype=np.float64).reshape(-1, 4)
    if len(spans):
        geo["columns"][column]["bbox"] = [*spans[:, :2].min(axis=0), *spans[:, 2:].max(axis=0)]
    geo["columns"][column]["geometry_types"] = sorted({t for b in boxes for t in b["geometry_types"]})
    unified = pa.unify_schemas([s.remove_metadata() for s in schemas], promote_options="permissive")
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
    "parquet": write_parquet,
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

    def __init__(self, path: str | Path, formats: tuple[str, ...] = ("geojson", "parquet")):
        self.directory = Path(path)
        self.formats = formats

    def _publish(self, name: str, write: Callable[[Path], object]) -> str:
        final = self.directory / name
        with staged_file(self.directory, Path(name).suffix) as staged:
            write(staged)
            os.replace(staged, final)
        return str(final)

    def write_features(self, job_id: str, features: gpd.GeoDataFrame) -> list[str]:
        return [
            self._publish(f"{job_id}{FORMAT_SUFFIX[fmt]}", partial(WRITERS[fmt], features))
            for fmt in self.formats
        ]

    def write_feature_parts(self, job_id: str, parts: Sequence[str | Path]) -> list[str]:
        """Stream the parts into the final files: one part in memory at a time."""
        writers: dict[str, Callable[[Path], None]] = {
            "geojson": lambda p: write_geojson(parts, p),
            "parquet": lambda p: concat_parquet(parts, p),
        }
        return [self._publish(f"{job_id}{FORMAT_SUFFIX[fmt]}", writers[fmt]) for fmt in self.formats]

    def write_summary(self, job_id: str, summary: dict[str, Any]) -> str:
        from pipeline.redact import redact_obj

        text = json.dumps(redact_obj(summary), indent=2, default=_json_default)  # no secrets
        return self._publish(f"{job_id}.summary.json", lambda p: p.write_text(text))

    def describe(self) -> str:
        return str(self.directory)


SINKS: dict[str, str] = {"LOCAL": "pipeline.sinks:local_sink"}


def local_sink(output: Any) -> Sink:
    return LocalSink(output.path, tuple(output.formats))


def make_sink(output: Any) -> Sink:
    """The sink for one request output (``LocalOutput``, ``S3Output``, ...)."""
    import importlib

    reference = SINKS.get(output.type)
    if reference is None:
        raise ValueError(f"output type {output.type} is not supported yet")
    module_name, _, attribute = reference.partition(":")
    factory: Callable[[Any], Sink] = getattr(importlib.import_module(module_name), attribute)
    return factory(output)


class KinesisSink(Sink):
    """``Kinesis`` output (as OSML has it): records with ``PartitionKey`` = the job id and
    ``Data`` = a GeoJSON FeatureCollection of at most ``batch_size`` features."""

    #: Kinesis limits: records and bytes per PutRecords call, bytes per record
    MAX_RECORDS, MAX_CALL_BYTES, MAX_RECORD_BYTES = 500, 5_000_000, 1_000_000

    def __init__(self, stream: str, batch_size: int = 1000, role: str | None = None,
                 client: Any = None):
        self.stream = stream
        self.batch_size = batch_size
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
        texts = (text for columns in _columns_of(parts) for text in _feature_texts(*columns))
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


def kinesis_sink(output: Any) -> Sink:
    return KinesisSink(output.stream, output.batch_size, output.role)


SINKS["KINESIS"] = "pipeline.sinks:kinesis_sink"


class S3Sink(Sink):
    """``S3`` output: ``s3://<bucket>/<prefix>/<jobId>.<suffix>``, complete or not at all.

    Each file is written to a local temporary directory first and then uploaded (boto3's
    managed transfer: one PUT, or a multipart upload that S3 shows only once it completes and
    that is aborted on failure). ``role`` is assumed through STS for the writes.
    """

    def __init__(self, bucket: str, prefix: str = "", formats: tuple[str, ...] = ("geojson", "parquet"),
                 role: str | None = None):
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
            return self._upload(write(LocalSink(directory, self.formats)))

    def write_features(self, job_id: str, features: gpd.GeoDataFrame) -> list[str]:
        return self._staged(lambda local: local.write_features(job_id, features))

    def write_feature_parts(self, job_id: str, parts: Sequence[str | Path]) -> list[str]:
        return self._staged(lambda local: local.write_feature_parts(job_id, parts))

    def write_summary(self, job_id: str, summary: dict[str, Any]) -> str:
        return self._staged(lambda local: [local.write_summary(job_id, summary)])[0]

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


def s3_sink(output: Any) -> Sink:
    return S3Sink(output.bucket, output.prefix, tuple(output.formats), output.role)


SINKS["S3"] = "pipeline.sinks:s3_sink"
