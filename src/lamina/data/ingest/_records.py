"""The records ingestion passes between its steps (frozen, so a step cannot change what another saw)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from lamina.data.vectors import Scalar


@dataclass(frozen=True, slots=True)
class Skipped:
    """Something an ingest passed over, and why: a path, a file, a record or a duplicate document."""

    path: str
    reason: str

    def as_pair(self) -> tuple[str, str]:
        """``(path, reason)``, as the run log stores it."""
        return self.path, self.reason


@dataclass(frozen=True, slots=True)
class SourceFile:
    """A regular file discovery found, with the identity that opening it must find again."""

    path: Path
    uri: str
    size: int
    mtime: datetime
    #: ``st_dev`` and ``st_ino`` when it was discovered
    device: int
    inode: int


@dataclass(frozen=True, slots=True)
class KeptDocument:
    """A document an ingest keeps (not a duplicate): what its chunks and the version record of it."""

    uri: str
    sha256: str
    simhash: int
    metadata: Mapping[str, Scalar]
    file_uri: str
    file_sha256: str

    def as_triple(self) -> tuple[str, str, str]:
        """``(uri, sha256, simhash hex)``, as a version's source record lists its documents."""
        return self.uri, self.sha256, f"{self.simhash:016x}"


@dataclass(frozen=True, slots=True)
class SpoolSlice:
    """Where a chunk's text lies in the run's spool file."""

    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class PlannedChunk:
    """A chunk a new version holds that was not reused whole with its file; its text waits in the spool."""

    chunk_id: str
    doc: KeptDocument
    byte_start: int
    byte_end: int
    content_sha256: str
    text: SpoolSlice
