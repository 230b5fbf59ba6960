"""One ingest run: read the files into a plan, then embed what is new and commit the version.

A run first plans the whole version: every file is hashed; a file whose hash the previous version holds
(under the same pipeline version and embedding model) is reused whole without being parsed, every other
one is loaded, de-duplicated and chunked (``_plan``). Only then does it know the version's manifest, so
an unchanged corpus embeds nothing and publishes nothing. New chunks already in the vector store (from
any version, or from an interrupted run) are reused; the rest reach the embedder in batches, their texts
read back from the spool.

A run that could read no file at all fails rather than publish an empty version over a good one.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from lamina.clock import Clock
from lamina.data.ingest._chunking import EmbeddingTokenizer
from lamina.data.ingest._dedupe import Deduplicator, StagedDeduplicator
from lamina.data.ingest._loaders import Unloadable, read_pieces
from lamina.data.ingest._plan import ChunkShape, FileLoad, Plan
from lamina.data.ingest._reading import HashedRead, open_source
from lamina.data.ingest._records import PlannedChunk, Skipped, SourceFile
from lamina.data.ingest._report import IngestOptions, IngestProgress, IngestReport
from lamina.data.ingest._spool import Spool
from lamina.data.vectors import Chunk, VectorStore
from lamina.data.versions import (
    ChunkLineage,
    DatasetCatalog,
    DatasetVersion,
    NewVersion,
    SourceRecord,
    chunks_digest,
    manifest_id,
    pipeline_version,
)
from lamina.errors import InvalidRequestError

_LOOKUP_BATCH = 2000
#: skipped paths a "nothing to ingest" error lists before "and N more"
_LISTED = 10

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Services:
    """What every run of a pipeline works against."""

    catalog: DatasetCatalog
    vectors: VectorStore
    embedder: EmbeddingTokenizer
    clock: Clock


def present_ids(store: VectorStore, dataset: str, chunk_ids: Sequence[str]) -> set[str]:
    """The ids among ``chunk_ids`` whose chunks ``store`` holds for ``dataset``."""
    found: set[str] = set()
    if store.count(dataset) == 0:
        return found
    for start in range(0, len(chunk_ids), _LOOKUP_BATCH):
        found |= {c.chunk_id for c in store.get(dataset, chunk_ids[start : start + _LOOKUP_BATCH])}
    return found


def nothing_read(dataset: str, skipped: Sequence[Skipped], previous: DatasetVersion | None) -> str:
    """The message of a run that found no readable input."""
    listed = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:_LISTED])
    more = f"; and {len(skipped) - _LISTED} more" if len(skipped) > _LISTED else ""
    found = f"{len(skipped)} skipped: {listed}{more}" if skipped else "no files found"
    kept = f"{previous.ref} stays the newest version" if previous else "no version was created"
    return (
        f"nothing to ingest into {dataset!r}: no source file could be read ({found}). Nothing was "
        f"published; {kept}. Fix or remove what was skipped, or give paths to readable files"
    )


class Run:
    """One ``IngestPipeline.ingest`` call: its dataset, options, pipeline version, report, progress,
    de-duplicator and plan; each step a method."""

    def __init__(
        self,
        services: Services,
        dataset: str,
        options: IngestOptions,
        report: IngestReport,
        progress: IngestProgress,
    ) -> None:
        self._s = services
        self.dataset = dataset
        self.options = options
        self.report = report
        self.progress = progress
        self.pipeline = pipeline_version(options.shaping())
        newest = services.catalog.log(dataset)[:1]
        self.previous = newest[0] if newest else None
        self.dedupe = Deduplicator(options.near_duplicate_bits)
        self.plan = Plan()
        self.spool = Spool()
        self.shape = ChunkShape(
            dataset=dataset,
            pipeline=self.pipeline,
            embedder=services.embedder,
            size=options.chunk_size,
            overlap=options.chunk_overlap,
            batch_chars=options.load.segment_bytes,
        )
        self._before, self._by_file = self._reusable()

    def _reusable(self) -> tuple[dict[str, SourceRecord], dict[str, list[str]]]:
        """The previous version's sources and chunk ids by file, if its chunks may be reused."""
        previous = self.previous
        if (
            previous is None
            or previous.pipeline_version != self.pipeline
            or previous.manifest["embedding_model"]["sha256"] != self._s.embedder.sha256
        ):
            return {}, {}
        sources = {s.uri: s for s in self._s.catalog.sources(previous)}
        return sources, self._s.catalog.chunks_by_file(previous)

    def execute(self, files: Sequence[SourceFile]) -> None:
        """Plan the version from ``files``; commit it unless it is the newest already."""
        try:
            self._read_all(files)
            if not self.plan.sources:
                raise InvalidRequestError(nothing_read(self.dataset, self.report.skipped, self.previous))
            self._publish()
        finally:
            self.spool.close()

    def _read_all(self, files: Sequence[SourceFile]) -> None:
        documents = 0
        for done, file in enumerate(files, start=1):
            self.progress.files(done, len(files))
            try:
                documents += self._read(file)
            except Unloadable as exc:
                self.report.skipped.append(Skipped(str(file.path), exc.reason))
        self.report.count("documents", documents)

    def _read(self, file: SourceFile) -> int:
        """Reuse or load one file; returns how many documents it added."""
        limit = self.options.max_file_bytes
        with open_source(file, limit) as raw:
            first = HashedRead(raw, limit)
            sha = first.finish()
            if first.size == 0:
                raise Unloadable("empty file")
            old = self._before.get(file.uri)
            if old is not None and old.sha256 == sha:
                self._reuse(file, old)
                return 0
            return self._load(file, sha, HashedRead(raw, limit))

    def _reuse(self, file: SourceFile, old: SourceRecord) -> None:
        self.plan.sources.append(replace(old, size_bytes=file.size, mtime=file.mtime))
        ids = self._by_file.get(file.uri, [])
        self.plan.reused_ids += ids
        self.report.count("chunks_reused", len(ids))
        for uri, doc_sha, sim in old.documents:
            self.dedupe.keep(uri, doc_sha, int(sim, 16))
        self.report.count("files_reused")

    def _load(self, file: SourceFile, sha: str, read: HashedRead) -> int:
        load = FileLoad(file, sha, self.shape, StagedDeduplicator(self.dedupe), self.spool)
        load.read(read_pieces(file.uri, file.path.suffix, read.stream, self.options.load))
        if read.finish() != sha:
            raise Unloadable("changed while it was read; ingest again")
        if not load.had_text:
            raise Unloadable("no text after cleaning (empty or whitespace only)")
        load.dedupe.commit()
        self.plan.sources.append(load.source())
        self.plan.planned += load.chunks
        self.report.skipped += load.skipped
        for kind, n in load.duplicates.items():
            if n:
                self.report.count(f"duplicates_{kind}", n)
        self.report.count("files_loaded")
        return len(load.documents)

    def _publish(self) -> None:
        chunk_ids = self.plan.chunk_ids()
        manifest = self._manifest(chunk_ids)
        version_id = manifest_id(manifest)
        self.report.count("chunks", len(set(chunk_ids)))
        if self.previous is not None and self.previous.version_id == version_id:
            self.report.state, self.report.version = "unchanged", self.previous
            self._s.catalog.runs.finish(
                self.report.run_id,
                "unchanged",
                counts=self.report.counts,
                skipped=self.report.skipped_pairs(),
                version_seq=self.previous.seq,
            )
            return
        written = self._embed(version_id)
        new = NewVersion(
            dataset=self.dataset,
            version_id=version_id,
            manifest=manifest,
            pipeline_version=self.pipeline,
            run_id=self.report.run_id,
            chunk_ids=chunk_ids,
            sources=self.plan.sources,
            lineage=self._lineage(),
        )
        if written:
            self._index()
        self.report.version = self._s.catalog.commit(
            new, counts=self.report.counts, skipped=self.report.skipped_pairs()
        )
        self.report.state = "completed"

    def _manifest(self, chunk_ids: list[str]) -> dict[str, Any]:
        listing = "\n".join(f"{s.uri} {s.sha256}" for s in sorted(self.plan.sources, key=lambda s: s.uri))
        embedder = self._s.embedder
        return {
            "format": 1,
            "dataset": self.dataset,
            "pipeline_version": self.pipeline,
            "pipeline_config": self.options.shaping(),
            "embedding_model": {"ref": embedder.name, "sha256": embedder.sha256},
            "chunks": len(set(chunk_ids)),
            "chunks_sha256": chunks_digest(sorted(set(chunk_ids))),
            "sources": len(self.plan.sources),
            "sources_sha256": hashlib.sha256(listing.encode()).hexdigest(),
        }

    def _embed(self, version_id: str) -> int:
        """Embed and write the planned chunks the store does not hold yet; returns how many were written."""
        unique = list({p.chunk_id: p for p in self.plan.planned}.values())
        have = present_ids(self._s.vectors, self.dataset, [p.chunk_id for p in unique])
        todo = [p for p in unique if p.chunk_id not in have]
        self.report.count("chunks_reused", len(unique) - len(todo))
        self.progress.chunks(0, len(todo))
        size = self.options.embed_batch_size
        for start in range(0, len(todo), size):
            batch = todo[start : start + size]
            texts = self.spool.read([p.text for p in batch])
            vectors = self._s.embedder.embed(texts)
            chunks = [
                _chunk(self.dataset, version_id, p, text, vector)
                for p, text, vector in zip(batch, texts, vectors, strict=True)
            ]
            self._s.vectors.upsert(self.dataset, chunks)
            self.report.count("chunks_embedded", len(batch))
            self.progress.chunks(start + len(batch), len(todo))
        return len(todo)

    def _index(self) -> None:
        """Rebuild the indexes before the commit, so the new version is fast from its first query.

        A failed build does not fail the run: the chunks are written, and searches the index cannot answer
        go to the store's own search until the next build (the next ingest, or ``data gc``).
        """
        try:
            self._s.vectors.reindex(self.dataset)
        except Exception as exc:
            message = f"index build failed ({type(exc).__name__}: {exc}); searches use the store's own search"
            _log.warning("dataset %s: %s", self.dataset, message)
            self.report.warnings.append(message)

    def _lineage(self) -> list[ChunkLineage]:
        now, embedder = self._s.clock(), self._s.embedder
        return [
            ChunkLineage(
                chunk_id=p.chunk_id,
                dataset=self.dataset,
                source_uri=p.doc.uri,
                source_file=p.doc.file_uri,
                source_sha256=p.doc.file_sha256,
                byte_start=p.byte_start,
                byte_end=p.byte_end,
                content_sha256=p.content_sha256,
                pipeline_version=self.pipeline,
                embedding_model=embedder.name,
                embedding_sha256=embedder.sha256,
                run_id=self.report.run_id,
                created_at=now,
            )
            for p in self.plan.planned
        ]


def _chunk(dataset: str, version_id: str, p: PlannedChunk, text: str, vector: list[float]) -> Chunk:
    return Chunk(
        chunk_id=p.chunk_id,
        dataset=dataset,
        version=version_id,
        text=text,
        source_uri=p.doc.uri,
        byte_start=p.byte_start,
        byte_end=p.byte_end,
        content_sha256=p.content_sha256,
        metadata=dict(p.doc.metadata),
        vector=vector,
    )
