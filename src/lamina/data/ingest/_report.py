"""One ingest's settings, what it reports as it goes (progress) and when it is done (the report)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from lamina.config import DataConfig
from lamina.data.ingest._loaders import LoadOptions
from lamina.data.ingest._records import Skipped
from lamina.data.versions import DatasetVersion


@dataclass(frozen=True, slots=True)
class IngestOptions:
    """One ingest's settings (defaults from ``DataConfig``; the CLI overrides some per run)."""

    chunk_size: int = 200
    chunk_overlap: int = 32
    max_file_bytes: int = 50_000_000
    near_duplicate_bits: int = 6
    embed_batch_size: int = 256
    load: LoadOptions = field(default_factory=LoadOptions)

    @classmethod
    def from_config(cls, config: DataConfig, **overrides: Any) -> IngestOptions:
        base = cls(
            chunk_size=config.chunk_size,
            chunk_overlap=config.chunk_overlap,
            max_file_bytes=config.max_file_bytes,
            near_duplicate_bits=config.near_duplicate_bits,
            embed_batch_size=config.embed_batch_size,
        )
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def shaping(self) -> dict[str, Any]:
        """What changes the chunks produced from the same input: hashed into the pipeline version."""
        return {
            "chunk_size": self.chunk_size,
            "chunk_overlap": self.chunk_overlap,
            "near_duplicate_bits": self.near_duplicate_bits,
            "text_field": self.load.text_field,
            "meta_fields": list(self.load.meta_fields),
            "segment_bytes": self.load.segment_bytes,  # a chunk never crosses a segment's end
            "cleaning": "nfkc+whitespace",
        }


class IngestProgress(Protocol):
    """Where the pipeline reports how far it got (the CLI draws a progress bar from it)."""

    def files(self, done: int, total: int) -> None: ...
    def chunks(self, done: int, total: int) -> None: ...


class Silent:
    """Progress nobody watches."""

    def files(self, done: int, total: int) -> None:
        pass

    def chunks(self, done: int, total: int) -> None:
        pass


@dataclass
class IngestReport:
    """What one run did. ``state``: completed (a new version) or unchanged (same manifest as the newest)."""

    run_id: str
    dataset: str
    state: str = "running"
    version: DatasetVersion | None = None
    counts: dict[str, int] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)
    seconds: float = 0.0
    #: problems that did not stop the run (an index build that failed: searches fall back to the store)
    warnings: list[str] = field(default_factory=list)

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def skipped_pairs(self) -> list[tuple[str, str]]:
        """``(path, reason)`` of everything skipped, as the run log stores it."""
        return [s.as_pair() for s in self.skipped]

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "dataset": self.dataset,
            "state": self.state,
            "version": None if self.version is None else self.version.to_json(),
            "counts": self.counts,
            "skipped": [list(s.as_pair()) for s in self.skipped],
            "seconds": self.seconds,
            "warnings": self.warnings,
        }
