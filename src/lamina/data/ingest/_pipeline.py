"""The ingestion pipeline: discover, load, clean, de-duplicate, chunk, embed in batches, write, commit.

Incremental by content. Every file is hashed before it is parsed; a file whose hash the newest version
already holds (under the same pipeline version and embedding model) reuses that version's chunks without
being read again. Every other document is chunked, and a chunk id is a hash of everything that shapes the
chunk (``lamina.data.versions._lineage``), so chunks already in the vector store (from any version, or from an
interrupted run) are reused rather than embedded again. Only new chunks reach the embedder, in batches.

Safe against interruption. Nothing a reader sees changes until the last step: new vectors are added under
new chunk ids (never replacing a chunk another version holds), and the version, its members, sources and
lineage are committed in one metadata transaction. A run killed before that (SIGKILL, Ctrl-C, a crashing
engine) leaves the previous version exactly as it was; its run is marked failed (or, if the process died,
abandoned by the next run), and the vectors it wrote are reused or collected later. One ingest or gc per
dataset at a time: a lock file in the state directory (released by the OS if the process dies).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from lamina.clock import Clock, utcnow
from lamina.config import DataConfig
from lamina.data.ingest._chunking import ChunkTokenizer, chunk_spans
from lamina.data.ingest._dedupe import Deduplicator, content_sha256, simhash
from lamina.data.ingest._discover import SourceFile, discover
from lamina.data.ingest._loaders import Document, LoadOptions, Unloadable, load_source
from lamina.data.ingest._openlineage import LineageEmitter
from lamina.data.vectors import Chunk, Embedder, VectorStore, check_dataset_name
from lamina.data.versions import (
    ChunkLineage,
    DatasetCatalog,
    DatasetVersion,
    NewVersion,
    SourceRecord,
    chunk_id,
    chunks_digest,
    manifest_id,
    pipeline_version,
)

_TOKENIZE_BATCH = 256
_LOOKUP_BATCH = 2000


def present_ids(store: VectorStore, dataset: str, chunk_ids: Sequence[str]) -> set[str]:
    """The ids among ``chunk_ids`` whose chunks ``store`` holds for ``dataset``."""
    found: set[str] = set()
    if store.count(dataset) == 0:
        return found
    for start in range(0, len(chunk_ids), _LOOKUP_BATCH):
        found |= {c.chunk_id for c in store.get(dataset, chunk_ids[start : start + _LOOKUP_BATCH])}
    return found


class IngestProgress(Protocol):
    """Where the pipeline reports how far it got (the CLI draws a progress bar from it)."""

    def files(self, done: int, total: int) -> None: ...
    def chunks(self, done: int, total: int) -> None: ...


class _Silent:
    def files(self, done: int, total: int) -> None:
        pass

    def chunks(self, done: int, total: int) -> None:
        pass


_log = logging.getLogger(__name__)


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
            chunk_size=config.chunk_size, chunk_overlap=config.chunk_overlap,
            max_file_bytes=config.max_file_bytes, near_duplicate_bits=config.near_duplicate_bits,
            embed_batch_size=config.embed_batch_size,
        )  # fmt: skip
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def shaping(self) -> dict[str, Any]:
        """What changes the chunks produced from the same input: hashed into the pipeline version."""
        return {
            "chunk_size": self.chunk_size, "chunk_overlap": self.chunk_overlap,
            "near_duplicate_bits": self.near_duplicate_bits, "text_field": self.load.text_field,
            "meta_fields": list(self.load.meta_fields), "cleaning": "nfkc+whitespace",
        }  # fmt: skip


@dataclass
class IngestReport:
    """What one run did. ``state``: completed (a new version) or unchanged (same manifest as the newest)."""

    run_id: str
    dataset: str
    state: str = "running"
    version: DatasetVersion | None = None
    counts: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    #: problems that did not stop the run (an index build that failed: searches fall back to the store)
    warnings: list[str] = field(default_factory=list)

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "dataset": self.dataset, "state": self.state,
            "version": None if self.version is None else self.version.to_json(),
            "counts": self.counts, "skipped": [list(s) for s in self.skipped], "seconds": self.seconds,
            "warnings": self.warnings,
        }  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Planned:
    """A chunk this version holds that was not reused whole from the previous version's file."""

    chunk_id: str
    doc: Document
    file: SourceFile
    file_sha256: str
    doc_sha256: str
    start: int
    end: int

    @property
    def text(self) -> str:
        return self.doc.text[self.start : self.end]


@dataclass
class _Plan:
    sources: list[SourceRecord] = field(default_factory=list)
    reused_ids: list[str] = field(default_factory=list)
    planned: list[_Planned] = field(default_factory=list)


class EmbeddingTokenizer(Embedder, ChunkTokenizer, Protocol):
    """An embedder that also exposes its tokenizer for chunking (the models layer's embedders do)."""


class IngestPipeline:
    """Ingests files into versioned datasets of a catalog and a vector store."""

    def __init__(
        self,
        catalog: DatasetCatalog,
        vectors: VectorStore,
        embedder: EmbeddingTokenizer,
        lineage: LineageEmitter,
        *,
        clock: Clock = utcnow,
    ) -> None:
        self._catalog = catalog
        self._vectors = vectors
        self._embedder = embedder
        self._lineage = lineage
        self._clock = clock

    def ingest(
        self,
        patterns: Sequence[str],
        dataset: str,
        options: IngestOptions = IngestOptions(),
        progress: IngestProgress | None = None,
    ) -> IngestReport:
        """Ingest the files ``patterns`` name into a new version of ``dataset``."""
        check_dataset_name(dataset)
        report = IngestReport(run_id=str(uuid.uuid4()), dataset=dataset)
        started = time.perf_counter()
        with self._catalog.lock(dataset):
            report.count("abandoned_runs", self._catalog.runs.start(dataset, report.run_id, os.getpid()))
            found = discover(patterns)
            self._lineage.event("START", report.run_id, dataset, inputs=found.roots)
            try:
                self._run(found.files, dataset, options, report, progress or _Silent())
            except BaseException as exc:
                report.skipped[:0] = found.refused
                self._failed(report, exc, found.roots)
                raise
            report.skipped[:0] = found.refused
            report.seconds = time.perf_counter() - started
            version_id = None if report.version is None else report.version.version_id
            self._lineage.event("COMPLETE", report.run_id, dataset, inputs=found.roots, version_id=version_id)
        return report

    def _failed(self, report: IngestReport, exc: BaseException, roots: list[str]) -> None:
        error = (
            "interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
        )
        report.state = "failed"
        try:
            self._catalog.runs.finish(
                report.run_id, "failed", counts=report.counts, skipped=report.skipped, error=error
            )
        finally:
            self._lineage.event("FAIL", report.run_id, report.dataset, inputs=roots, error=error)

    def _run(
        self, files: list[SourceFile], dataset: str, options: IngestOptions, report: IngestReport,
        progress: IngestProgress,
    ) -> None:  # fmt: skip
        pipeline = pipeline_version(options.shaping())
        previous = self._catalog.log(dataset)[:1]
        plan = self._plan(
            files, dataset, options, pipeline, previous[0] if previous else None, report, progress
        )
        chunk_ids = plan.reused_ids + [p.chunk_id for p in plan.planned]
        manifest = self._manifest(dataset, pipeline, options, chunk_ids, plan.sources)
        version_id = manifest_id(manifest)
        report.count("chunks", len(set(chunk_ids)))
        if previous and previous[0].version_id == version_id:
            report.state, report.version = "unchanged", previous[0]
            self._catalog.runs.finish(
                report.run_id, "unchanged", counts=report.counts, skipped=report.skipped,
                version_seq=previous[0].seq,
            )  # fmt: skip
            return
        written = self._embed(dataset, version_id, plan.planned, options, report, progress)
        new = NewVersion(
            dataset=dataset, version_id=version_id, manifest=manifest, pipeline_version=pipeline,
            run_id=report.run_id, chunk_ids=chunk_ids, sources=plan.sources,
            lineage=[self._lineage_row(dataset, p, pipeline, report.run_id) for p in plan.planned],
        )  # fmt: skip
        if written:
            self._index(dataset, report)
        report.version = self._catalog.commit(new, counts=report.counts, skipped=report.skipped)
        report.state = "completed"

    def _index(self, dataset: str, report: IngestReport) -> None:
        """Rebuild the indexes before the commit, so the new version is fast from its first query.

        A failed build does not fail the run: the chunks are written, and searches the index cannot answer
        go to the store's own search until the next build (the next ingest, or ``data gc``).
        """
        try:
            self._vectors.reindex(dataset)
        except Exception as exc:
            message = f"index build failed ({type(exc).__name__}: {exc}); searches use the store's own search"
            _log.warning("dataset %s: %s", dataset, message)
            report.warnings.append(message)

    def _manifest(
        self, dataset: str, pipeline: str, options: IngestOptions, chunk_ids: list[str],
        sources: list[SourceRecord],
    ) -> dict[str, Any]:  # fmt: skip
        listing = "\n".join(f"{s.uri} {s.sha256}" for s in sorted(sources, key=lambda s: s.uri))
        return {
            "format": 1,
            "dataset": dataset,
            "pipeline_version": pipeline,
            "pipeline_config": options.shaping(),
            "embedding_model": {"ref": self._embedder.name, "sha256": self._embedder.sha256},
            "chunks": len(set(chunk_ids)),
            "chunks_sha256": chunks_digest(sorted(set(chunk_ids))),
            "sources": len(sources),
            "sources_sha256": hashlib.sha256(listing.encode()).hexdigest(),
        }

    def _plan(
        self, files: list[SourceFile], dataset: str, options: IngestOptions, pipeline: str,
        previous: DatasetVersion | None, report: IngestReport, progress: IngestProgress,
    ) -> _Plan:  # fmt: skip
        """Hash every file; reuse unchanged ones whole, load the others; de-duplicate; chunk."""
        reusable = (
            previous is not None
            and previous.pipeline_version == pipeline
            and previous.manifest["embedding_model"]["sha256"] == self._embedder.sha256
        )
        before = {s.uri: s for s in self._catalog.sources(previous)} if reusable and previous else {}
        by_file = self._catalog.chunks_by_file(previous) if reusable and previous else {}
        plan, dedupe = _Plan(), Deduplicator(options.near_duplicate_bits)
        fresh: list[tuple[SourceFile, str, list[Document]]] = []
        for done, file in enumerate(files, start=1):
            progress.files(done, len(files))
            loaded = self._read(file, options, report)
            if loaded is None:
                continue
            sha, data = loaded
            old = before.get(file.uri)
            if old is not None and old.sha256 == sha:
                plan.sources.append(replace(old, size_bytes=file.size, mtime=file.mtime))
                plan.reused_ids += by_file.get(file.uri, [])
                report.count("chunks_reused", len(by_file.get(file.uri, [])))
                for uri, doc_sha, sim in old.documents:
                    dedupe.keep(uri, doc_sha, int(sim, 16))
                report.count("files_reused")
                continue
            try:
                result = load_source(file.uri, file.path.suffix, data, options.load)
            except Unloadable as exc:
                report.skipped.append((str(file.path), exc.reason))
                continue
            report.skipped += result.skipped
            fresh.append((file, sha, result.documents))
            report.count("files_loaded")
        self._chunk_fresh(fresh, dataset, options, pipeline, dedupe, plan, report)
        return plan

    def _read(
        self, file: SourceFile, options: IngestOptions, report: IngestReport
    ) -> tuple[str, bytes] | None:
        if file.size > options.max_file_bytes:
            report.skipped.append(
                (str(file.path), f"too large ({file.size} bytes > max_file_bytes {options.max_file_bytes})")
            )
            return None
        try:
            data = file.path.read_bytes()
        except OSError as exc:
            report.skipped.append((str(file.path), f"unreadable ({exc.strerror or exc})"))
            return None
        if len(data) > options.max_file_bytes:  # it grew since it was listed
            report.skipped.append((str(file.path), f"too large ({len(data)} bytes)"))
            return None
        return hashlib.sha256(data).hexdigest(), data

    def _chunk_fresh(
        self, fresh: list[tuple[SourceFile, str, list[Document]]], dataset: str, options: IngestOptions,
        pipeline: str, dedupe: Deduplicator, plan: _Plan, report: IngestReport,
    ) -> None:  # fmt: skip
        """De-duplicate the loaded documents against everything kept so far, then chunk the survivors."""
        kept: list[tuple[SourceFile, str, Document, str]] = []
        for file, sha, documents in fresh:
            kept_docs: list[tuple[str, str, str]] = []
            for doc in documents:
                doc_sha, sim = content_sha256(doc.text), simhash(doc.text)
                dup = dedupe.duplicate_of(doc.uri, doc_sha, sim)
                if dup is not None:
                    report.skipped.append((doc.uri, f"{dup[1]} duplicate of {dup[0]}"))
                    report.count(f"duplicates_{dup[1]}")
                    continue
                dedupe.keep(doc.uri, doc_sha, sim)
                kept_docs.append((doc.uri, doc_sha, f"{sim:016x}"))
                kept.append((file, sha, doc, doc_sha))
            plan.sources.append(SourceRecord(
                uri=file.uri, sha256=sha, size_bytes=file.size, mtime=file.mtime,
                documents=kept_docs, n_chunks=0,
            ))  # fmt: skip
        report.count("documents", len(kept))
        n_chunks: dict[str, int] = {}
        for start in range(0, len(kept), _TOKENIZE_BATCH):
            batch = kept[start : start + _TOKENIZE_BATCH]
            spans = chunk_spans([d.text for _, _, d, _ in batch], self._embedder, options.chunk_size,
                                options.chunk_overlap)  # fmt: skip
            for (file, sha, doc, doc_sha), doc_spans in zip(batch, spans, strict=True):
                for span in doc_spans:
                    cid = chunk_id(dataset, doc.uri, doc_sha, (span.start, span.end), pipeline,
                                   self._embedder.sha256)  # fmt: skip
                    plan.planned.append(_Planned(cid, doc, file, sha, doc_sha, span.start, span.end))
                n_chunks[file.uri] = n_chunks.get(file.uri, 0) + len(doc_spans)
        plan.sources = [replace(s, n_chunks=n_chunks.get(s.uri, s.n_chunks)) for s in plan.sources]

    def _embed(
        self, dataset: str, version_id: str, planned: list[_Planned], options: IngestOptions,
        report: IngestReport, progress: IngestProgress,
    ) -> int:  # fmt: skip
        """Embed and write the planned chunks the store does not hold yet; returns how many were written."""
        unique = list({p.chunk_id: p for p in planned}.values())
        have = present_ids(self._vectors, dataset, [p.chunk_id for p in unique])
        todo = [p for p in unique if p.chunk_id not in have]
        report.count("chunks_reused", len(unique) - len(todo))
        progress.chunks(0, len(todo))
        for start in range(0, len(todo), options.embed_batch_size):
            batch = todo[start : start + options.embed_batch_size]
            vectors = self._embedder.embed([p.text for p in batch])
            chunks = [_chunk(dataset, version_id, p, v) for p, v in zip(batch, vectors, strict=True)]
            self._vectors.upsert(dataset, chunks)
            report.count("chunks_embedded", len(batch))
            progress.chunks(start + len(batch), len(todo))
        return len(todo)

    def _lineage_row(self, dataset: str, p: _Planned, pipeline: str, run_id: str) -> ChunkLineage:
        start, end = p.doc.clean.byte_span(p.start, p.end)
        return ChunkLineage(
            chunk_id=p.chunk_id, dataset=dataset, source_uri=p.doc.uri, source_file=p.file.uri,
            source_sha256=p.file_sha256, byte_start=start, byte_end=end,
            content_sha256=content_sha256(p.text), pipeline_version=pipeline,
            embedding_model=self._embedder.name, embedding_sha256=self._embedder.sha256,
            run_id=run_id, created_at=self._clock(),
        )  # fmt: skip


def _chunk(dataset: str, version_id: str, p: _Planned, vector: list[float]) -> Chunk:
    start, end = p.doc.clean.byte_span(p.start, p.end)
    text = p.text
    return Chunk(
        chunk_id=p.chunk_id, dataset=dataset, version=version_id, text=text, source_uri=p.doc.uri,
        byte_start=start, byte_end=end, content_sha256=content_sha256(text), metadata=dict(p.doc.metadata),
        vector=vector,
    )  # fmt: skip
