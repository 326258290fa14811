"""Part files and the manifest of finished chunks: what makes a job streamable and resumable.

A job's work location (see ``graphs.image_job.work_location``: beside its first LOCAL or S3
output, else under ``MODEL_RUNNER_WORK_PREFIX``) holds, per finished chunk, a GeoParquet part
of its *settled* features (final, written as the chunk arrives) and an ``.npz`` of its *border*
detections (those that wait for the cross-chunk merge), plus a manifest: a header with the
request's fingerprint, then one record per finished chunk, added only after its files are in
place. Resuming reads the manifest and skips those chunks, in any process that can reach the
location.

Two storages with one interface: :class:`LocalStorage` (a directory; the manifest is
``manifest.jsonl``, appended, fsynced at most once a second) and :class:`S3Storage` (an S3
prefix; S3 has no append, so the header is ``manifest.json`` and each chunk record a small object
``manifest/<chunk>.json``; files are written to a local cache first and uploaded).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import geopandas as gpd
import numpy as np
import shapely

from pipeline.detections import Detections
from pipeline.sinks import _json_default, staged_file, write_parquet

MANIFEST = "manifest.jsonl"
#: version of the chunk layout (:class:`pipeline.tiling.TileGrid`): a manifest written under
#: another layout names other chunks, so it cannot be resumed
CHUNK_LAYOUT = 2
_PART_FILES = ("i*-r*-c*.parquet", "i*-r*-c*.npz", "i*-r*-c*.tif", "i*-border.parquet")  # .tif: segmentation


class ResumeError(RuntimeError):
    """A work directory that cannot be resumed; ``str()`` is one line."""


def fingerprint(request_wire: dict[str, Any], chunk_target: int, *formats: object) -> str:
    """What must not change between a run and its resume: everything but the outputs, the
    chunk layout and the versions of the part files (``formats``)."""
    kept = {k: v for k, v in request_wire.items()
            if k not in ("outputs", "outputBucket", "outputPrefix", "jobName", "jobArn")}
    text = json.dumps([kept, chunk_target, CHUNK_LAYOUT, *formats], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _chunk_name(image: int, chunk: tuple[int, int]) -> str:
    return f"i{image:04d}-r{chunk[0]:05d}-c{chunk[1]:05d}"


class Storage(Protocol):
    """Where a :class:`PartStore` keeps its files and manifest."""

    #: a local directory where files are written (and where remote ones are fetched to)
    cache: Path

    def describe(self) -> str: ...

    def publish(self, name: str, write: Callable[[Path], object]) -> str:
        """Write ``name`` with ``write(path)``; it appears whole or not at all."""

    def local(self, name: str) -> Path:
        """A local path of file ``name`` (fetched if it is remote)."""

    def names(self) -> set[str]:
        """The part files present."""

    def start(self, header: str) -> None:
        """Remove the previous parts and manifest; write the manifest header."""

    def append(self, key: str, line: str) -> None:
        """Add one record (``key``: its chunk name) to the manifest, durably."""

    def manifest(self) -> tuple[str | None, list[str]]:
        """The manifest's header and records (``None``: no manifest)."""

    def remove(self) -> None:
        """Remove everything this store wrote."""


#: seconds between fsyncs of a local manifest: each line is flushed (a crash of the process
#: loses none), and a crash of the machine loses at most this much of the manifest, whose
#: chunks a resume recomputes (an fsync per chunk cost ~1 ms of a small image's ~20)
SYNC_SECONDS = 1.0


class LocalStorage:
    """A local directory; ``manifest.jsonl`` is appended (flushed, fsynced every
    :data:`SYNC_SECONDS`)."""

    def __init__(self, directory: str | Path):
        self.cache = Path(directory)
        self.synced = time.monotonic()

    def describe(self) -> str:
        return str(self.cache / MANIFEST)

    def publish(self, name: str, write: Callable[[Path], object]) -> str:
        with staged_file(self.cache, Path(name).suffix) as staged:
            write(staged)
            os.replace(staged, self.cache / name)
        return name

    def local(self, name: str) -> Path:
        return self.cache / name

    def names(self) -> set[str]:
        if not self.cache.is_dir():
            return set()
        return {p.name for pattern in _PART_FILES for p in self.cache.glob(pattern)}

    def _clear(self) -> None:
        for name in [*self.names(), MANIFEST]:
            (self.cache / name).unlink(missing_ok=True)

    def start(self, header: str) -> None:
        self.cache.mkdir(parents=True, exist_ok=True)
        self._clear()
        (self.cache / MANIFEST).write_text(header + "\n")

    def append(self, key: str, line: str) -> None:
        with open(self.cache / MANIFEST, "a", encoding="utf-8") as out:
            out.write(line + "\n")
            out.flush()
            if time.monotonic() - self.synced >= SYNC_SECONDS:
                os.fsync(out.fileno())
                self.synced = time.monotonic()

    def manifest(self) -> tuple[str | None, list[str]]:
        path = self.cache / MANIFEST
        if not path.exists():
            return None, []
        lines = path.read_text().splitlines()
        return (lines[0] if lines else ""), lines[1:]

    def remove(self) -> None:
        self._clear()
        try:
            self.cache.rmdir()
        except OSError:  # not empty (something else lives there) or gone
            pass


class S3Storage:
    """An S3 prefix ``s3://bucket/prefix/``: files are written to a local cache (a temporary
    directory of this process) and uploaded; each manifest record is its own object."""

    HEADER, RECORDS = "manifest.json", "manifest/"

    def __init__(self, url: str, role: str | None = None):
        from pipeline.aws import split_s3_url

        self.bucket, key = split_s3_url(url)
        self.prefix = key.strip("/") + "/"
        self.role = role
        self._temporary = tempfile.TemporaryDirectory(prefix="parts-")  # removed with the store
        self.cache = Path(self._temporary.name)
        self._client: Any = None

    @property
    def s3(self) -> Any:
        if self._client is None:
            from pipeline.aws import client

            self._client = client("s3", self.role)
        return self._client

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def _keys(self, below: str = "") -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + below)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def _put(self, name: str, body: bytes | Path) -> None:
        from pipeline.sinks import upload

        upload(self.s3, body, self.bucket, self.prefix + name)

    def publish(self, name: str, write: Callable[[Path], object]) -> str:
        path = self.cache / name
        with staged_file(self.cache, path.suffix) as staged:
            write(staged)
            os.replace(staged, path)
        self._put(name, path)
        return name

    def local(self, name: str) -> Path:
        path = self.cache / name
        if not path.exists():
            with staged_file(self.cache, path.suffix) as staged:
                self.s3.download_file(self.bucket, self.prefix + name, str(staged))
                os.replace(staged, path)
        return path

    def names(self) -> set[str]:
        return {k[len(self.prefix):] for k in self._keys() if "/" not in k[len(self.prefix):]}

    def start(self, header: str) -> None:
        self.remove()
        self._put(self.HEADER, header.encode())

    def append(self, key: str, line: str) -> None:
        self._put(f"{self.RECORDS}{key}.json", line.encode())

    def _read(self, key: str) -> str | None:
        try:
            return str(self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read().decode())
        except self.s3.exceptions.NoSuchKey:
            return None

    def manifest(self) -> tuple[str | None, list[str]]:
        header = self._read(self.prefix + self.HEADER)
        if header is None:
            return None, []
        records = [self._read(k) for k in sorted(self._keys(self.RECORDS))]
        return header, [r for r in records if r is not None]

    def remove(self) -> None:
        keys = self._keys()
        for start in range(0, len(keys), 1000):
            self.s3.delete_objects(Bucket=self.bucket, Delete={
                "Objects": [{"Key": k} for k in keys[start : start + 1000]], "Quiet": True})
        for path in self.cache.iterdir():
            path.unlink()


def open_storage(location: str | Path, role: str | None = None) -> LocalStorage | S3Storage:
    """The storage of a work location: ``s3://bucket/prefix`` or a local directory."""
    if str(location).startswith("s3://"):
        return S3Storage(str(location), role)
    return LocalStorage(location)


class PartStore:
    """The part files and manifest of one job at ``location`` (a directory or an S3 prefix).

    ``resume=False`` starts afresh (the previous run's parts and manifest are removed);
    ``resume=True`` keeps the chunks the manifest lists, provided the fingerprint matches.
    """

    def __init__(self, location: str | Path, job_id: str, fingerprint: str, resume: bool = False,
                 role: str | None = None):
        self.storage = open_storage(location, role)
        self.fingerprint = fingerprint
        self.records: dict[tuple[int, int, int], dict[str, Any]] = {}
        self.border_parts: dict[int, Path] = {}
        header, lines = self.storage.manifest() if resume else (None, [])
        if header is not None:
            self._load(header, lines)
        else:
            self.storage.start(json.dumps({"jobId": job_id, "fingerprint": fingerprint}))

    @property
    def directory(self) -> Path:
        """The local directory of the part files (for S3: this process's cache)."""
        return self.storage.cache

    def _load(self, header_line: str, lines: list[str]) -> None:
        try:
            header = json.loads(header_line) if header_line else {}
        except json.JSONDecodeError:
            header = {}
        if header.get("fingerprint") != self.fingerprint:
            raise ResumeError(
                f"cannot resume: {self.storage.describe()} belongs to a different request or "
                "chunk size (run without --resume to start again)"
            )
        present = self.storage.names()
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a crash: that chunk is redone
                continue
            files = [record.get("part"), record.get("border")]
            if all(f in present for f in files if f):
                self.records[(record["image"], *record["chunk"])] = record

    def finished(self, image: int) -> dict[tuple[int, int], dict[str, Any]]:
        """Finished chunks of image number ``image``: ``{(row, col): manifest record}``."""
        return {(r, c): rec for (i, r, c), rec in self.records.items() if i == image}

    def write_chunk(self, image: int, chunk: tuple[int, int], features: gpd.GeoDataFrame,
                    border: Detections, record: dict[str, Any], complete: bool = True) -> dict[str, Any]:
        """Write one chunk's settled features and border detections; list it in the manifest
        if ``complete`` (a chunk with failed tiles is left out, so a resume redoes it)."""
        name = _chunk_name(image, chunk)
        record = {**record, "image": image, "chunk": list(chunk), "part": None, "border": None,
                  "features": len(features), "borderDetections": len(border)}
        if len(features):
            record["part"] = self.storage.publish(f"{name}.parquet", lambda p: write_parquet(features, p))
        if len(border):
            record["border"] = self.storage.publish(f"{name}.npz", lambda p: _save_detections(border, p))
        if complete:
            self.storage.append(name, json.dumps(record))
        self.records[(image, *chunk)] = record
        return record

    def write_border(self, image: int, features: gpd.GeoDataFrame) -> Path | None:
        """The merged border features of one image, as one more part (a local path), kept
        only locally: it is recomputed from the chunks' border detections on a resume."""
        if not len(features):
            return None
        path = self.directory / f"i{image:04d}-border.parquet"
        LocalStorage(self.directory).publish(path.name, lambda p: write_parquet(features, p))
        self.border_parts[image] = path
        return path

    def border(self, record: dict[str, Any]) -> Detections:
        """The border detections a chunk left for the cross-chunk merge."""
        if not record.get("border"):
            return Detections()
        with np.load(self.storage.local(record["border"]), allow_pickle=False) as data:
            return _load_detections(data)

    def parts(self, image: int) -> Iterator[Path]:
        """The settled part files of one image, in chunk order, then its border part (local
        paths; a remote part is fetched when its turn comes)."""
        for key in sorted(self.records):
            part = self.records[key].get("part")
            if key[0] == image and part:
                yield self.storage.local(part)
        if image in self.border_parts:
            yield self.border_parts[image]

    def remove(self) -> None:
        """Remove the parts and the manifest (after the final files are written)."""
        self.storage.remove()


def _save_detections(detections: Detections, path: Path) -> None:
    """Border detections as an ``.npz`` (no pickles): the model's shapes as hex WKB and its
    other answers as JSON text, "" where a detection has none."""
    shapes = np.array([shapely.to_wkb(s, hex=True) if s is not None else "" for s in detections.shapes],
                      dtype=str)
    extras = np.array([json.dumps(e, default=_json_default) if e is not None else ""
                       for e in detections.extras], dtype=str)
    with open(path, "wb") as out:
        np.savez(out, boxes=detections.boxes, scores=detections.scores,
                 classes=detections.classes.astype(str), shapes=shapes, extras=extras)


def _load_detections(data: Any) -> Detections:
    """What :func:`_save_detections` wrote (files without shapes and extras too)."""
    n = len(data["scores"])
    shapes = extras = None
    if "shapes" in data and n:
        shapes = [shapely.from_wkb(s) if s else None for s in data["shapes"].tolist()]
        extras = [json.loads(e) if e else None for e in data["extras"].tolist()]
    return Detections(data["boxes"], data["scores"], data["classes"].astype(object), shapes, extras)
