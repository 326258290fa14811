"""Part files and the manifest of finished chunks: what makes a job streamable and resumable.

A job's work directory (by default ``<first LOCAL output>/<jobId>.parts/``) holds, per
finished chunk, a GeoParquet part of its *settled* features (final, written as the chunk
arrives) and an ``.npz`` of its *border* detections (those that wait for the cross-chunk
merge), plus ``manifest.jsonl``: a header line with the request's fingerprint, then one line
per finished chunk, appended (and fsynced) only after its files are in place. Resuming reads
the manifest and skips those chunks.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np

from pipeline.detections import Detections
from pipeline.sinks import staged_file, write_parquet

MANIFEST = "manifest.jsonl"
#: version of the chunk layout (:class:`pipeline.tiling.TileGrid`): a manifest written under
#: another layout names other chunks, so it cannot be resumed
CHUNK_LAYOUT = 2


class ResumeError(RuntimeError):
    """A work directory that cannot be resumed; ``str()`` is one line."""


def fingerprint(request_wire: dict[str, Any], chunk_target: int) -> str:
    """What must not change between a run and its resume: everything but the outputs."""
    kept = {k: v for k, v in request_wire.items()
            if k not in ("outputs", "outputBucket", "outputPrefix", "jobName", "jobArn")}
    text = json.dumps([kept, chunk_target, CHUNK_LAYOUT], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _chunk_name(image: int, chunk: tuple[int, int]) -> str:
    return f"i{image:04d}-r{chunk[0]:05d}-c{chunk[1]:05d}"


class PartStore:
    """The part files and manifest of one job in ``directory``.

    ``resume=False`` starts afresh (the previous run's parts and manifest are removed);
    ``resume=True`` keeps the chunks the manifest lists, provided the fingerprint matches.
    """

    def __init__(self, directory: str | Path, job_id: str, fingerprint: str, resume: bool = False):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.records: dict[tuple[int, int, int], dict[str, Any]] = {}
        self.directory.mkdir(parents=True, exist_ok=True)
        manifest = self.directory / MANIFEST
        if resume and manifest.exists():
            self._load(manifest)
        else:
            self._clear()
            manifest.write_text(json.dumps({"jobId": job_id, "fingerprint": fingerprint}) + "\n")

    def _clear(self) -> None:
        for pattern in ("i*-r*-c*.parquet", "i*-r*-c*.npz", "i*-border.parquet", MANIFEST):
            for path in self.directory.glob(pattern):
                path.unlink()

    def _load(self, manifest: Path) -> None:
        lines = manifest.read_text().splitlines()
        try:
            header = json.loads(lines[0]) if lines else {}
        except json.JSONDecodeError:
            header = {}
        if header.get("fingerprint") != self.fingerprint:
            raise ResumeError(
                f"cannot resume: {manifest} belongs to a different request or chunk size "
                "(run without --resume to start again)"
            )
        for line in lines[1:]:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a crash: that chunk is redone
                continue
            files = [record.get("part"), record.get("border")]
            if all((self.directory / f).exists() for f in files if f):
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
            record["part"] = self._publish(f"{name}.parquet", lambda p: write_parquet(features, p))
        if len(border):
            record["border"] = self._publish(f"{name}.npz", lambda p: _save_detections(border, p))
        if complete:
            with open(self.directory / MANIFEST, "a", encoding="utf-8") as out:
                out.write(json.dumps(record) + "\n")
                out.flush()
                os.fsync(out.fileno())
        self.records[(image, *chunk)] = record
        return record

    def write_border(self, image: int, features: gpd.GeoDataFrame) -> str | None:
        """The merged border features of one image, as one more part."""
        if not len(features):
            return None
        return self._publish(f"i{image:04d}-border.parquet", lambda p: write_parquet(features, p))

    def border(self, record: dict[str, Any]) -> Detections:
        """The border detections a chunk left for the cross-chunk merge."""
        if not record.get("border"):
            return Detections()
        with np.load(self.directory / record["border"], allow_pickle=False) as data:
            return Detections(data["boxes"], data["scores"], data["classes"].astype(object))

    def parts(self, image: int) -> Iterator[Path]:
        """The settled part files of one image, in chunk order."""
        for key in sorted(self.records):
            part = self.records[key].get("part")
            if key[0] == image and part:
                yield self.directory / part

    def remove(self) -> None:
        """Remove the parts and the manifest (after the final files are written)."""
        self._clear()
        try:
            self.directory.rmdir()
        except OSError:  # not empty: something else lives there
            pass

    def _publish(self, name: str, write: Any) -> str:
        with staged_file(self.directory, Path(name).suffix) as staged:
            write(staged)
            os.replace(staged, self.directory / name)
        return name


def _save_detections(detections: Detections, path: Path) -> None:
    with open(path, "wb") as out:
        np.savez(out, boxes=detections.boxes, scores=detections.scores,
                 classes=detections.classes.astype(str))
