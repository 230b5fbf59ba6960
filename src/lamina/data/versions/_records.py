"""The records the dataset catalog hands out: versions, pinned versions, sources, lineage, diffs, runs, gc."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class DatasetVersion:
    """One committed, immutable version of a dataset."""

    dataset: str
    seq: int
    version_id: str
    manifest: dict[str, Any]
    pipeline_version: str
    run_id: str
    created_at: datetime
    tags: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.dataset}@{self.seq}"

    @property
    def embedding_model(self) -> str:
        return str(self.manifest["embedding_model"]["ref"])

    def to_json(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "dataset": self.dataset,
            "seq": self.seq,
            "version_id": self.version_id,
            "tags": list(self.tags),
            "created_at": self.created_at.isoformat(),
            "pipeline_version": self.pipeline_version,
            "run_id": self.run_id,
            "manifest": self.manifest,
        }


@dataclass(frozen=True, slots=True)
class SourceRecord:
    """A source file as a version holds it; ``documents``: the kept ones, as (uri, sha256, simhash hex)."""

    uri: str
    sha256: str
    size_bytes: int
    mtime: datetime
    documents: list[tuple[str, str, str]]
    n_chunks: int

    def to_json(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "mtime": self.mtime.isoformat(),
            "documents": len(self.documents),
            "chunks": self.n_chunks,
        }


@dataclass(frozen=True, slots=True)
class ChunkLineage:
    """Where one chunk came from: source, span, hashes, pipeline and embedding model."""

    chunk_id: str
    dataset: str
    source_uri: str
    source_file: str
    source_sha256: str
    byte_start: int
    byte_end: int
    content_sha256: str
    pipeline_version: str
    embedding_model: str
    embedding_sha256: str
    run_id: str
    created_at: datetime
    #: the sequence numbers of the kept versions that hold it
    versions: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__slots__}
        return data | {"created_at": self.created_at.isoformat(), "versions": list(self.versions)}


@dataclass(frozen=True, slots=True)
class VersionDiff:
    """Source files added, removed and changed (different content) from ``old`` to ``new``."""

    old: DatasetVersion
    new: DatasetVersion
    added: list[str]
    removed: list[str]
    changed: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "old": self.old.ref,
            "new": self.new.ref,
            "added": self.added,
            "removed": self.removed,
            "changed": self.changed,
        }


@dataclass(frozen=True, slots=True)
class IngestRun:
    run_id: str
    dataset: str
    state: str
    pid: int
    started_at: datetime
    finished_at: datetime | None
    counts: dict[str, int]
    skipped: list[tuple[str, str]]
    error: str | None
    version_seq: int | None


@dataclass(frozen=True, slots=True)
class NewVersion:
    """What the pipeline commits: the manifest (whose hash is the id) and the rows it lists."""

    dataset: str
    version_id: str
    manifest: dict[str, Any]
    pipeline_version: str
    run_id: str
    chunk_ids: Sequence[str]
    sources: Sequence[SourceRecord]
    #: lineage of the chunks first embedded for this version (rows already present are kept)
    lineage: Sequence[ChunkLineage] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Collected:
    """What ``gc`` removed: version sequence numbers, and the chunk ids no kept version lists."""

    dataset: str
    versions: list[int]
    chunk_ids: list[str]
    #: how many of ``chunk_ids`` no version ever listed: vectors an interrupted ingest wrote
    orphans: int = 0


@dataclass(frozen=True)
class PinnedVersion:
    """One dataset version as retrieval needs it."""

    dataset: str
    version_id: str
    seq: int
    chunk_ids: frozenset[str]
    #: ``name@version`` of the model that embedded its chunks (None: unknown)
    embedding_model: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.dataset}@{self.seq}"
