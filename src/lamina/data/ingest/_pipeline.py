"""The ingestion pipeline: discover, load, clean, de-duplicate, chunk, embed in batches, write, commit.

Incremental by content. Every file is hashed before it is parsed; a file whose hash the newest version
already holds (under the same pipeline version and embedding model) reuses that version's chunks without
being read again. Every other document is chunked, and a chunk id is a hash of everything that shapes the
chunk (``lamina.data.versions.chunk_id``), so chunks already in the vector store (from any version, or
from an interrupted run) are reused rather than embedded again. Only new chunks reach the embedder, in
batches. Each call is one ``Run`` (``_run``); a file's part of it is a ``FileLoad`` (``_plan``).

Bounded in memory per file. A file is streamed: hashed in blocks, and text read, cleaned, chunked and
spooled a segment (about ``segment_bytes``) at a time, records one at a time; a run keeps a small record
per chunk, not its text.

Safe against interruption. Nothing a reader sees changes until the last step: new vectors are added under
new chunk ids (never replacing a chunk another version holds), and the version, its members, sources and
lineage are committed in one metadata transaction. A run killed before that (SIGKILL, Ctrl-C, a crashing
engine) leaves the previous version exactly as it was; its run is marked failed (or, if the process died,
abandoned by the next run), and the vectors it wrote are reused or collected later. One ingest or gc per
dataset at a time: ``DatasetCatalog.lock`` (released if the process dies). A run that reads no file at
all fails, so that it never publishes an empty version over a good one.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Sequence

from lamina.clock import Clock, utcnow
from lamina.data.ingest._chunking import EmbeddingTokenizer
from lamina.data.ingest._discover import discover
from lamina.data.ingest._openlineage import LineageEmitter
from lamina.data.ingest._report import IngestOptions, IngestProgress, IngestReport, Silent
from lamina.data.ingest._run import Run, Services
from lamina.data.vectors import VectorStore, check_dataset_name
from lamina.data.versions import DatasetCatalog


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
        self._services = Services(catalog=catalog, vectors=vectors, embedder=embedder, clock=clock)
        self._lineage = lineage

    def ingest(
        self,
        patterns: Sequence[str],
        dataset: str,
        options: IngestOptions = IngestOptions(),
        progress: IngestProgress | None = None,
    ) -> IngestReport:
        """Ingest the files ``patterns`` name into a new version of ``dataset``."""
        check_dataset_name(dataset)
        catalog = self._services.catalog
        report = IngestReport(run_id=str(uuid.uuid4()), dataset=dataset)
        started = time.perf_counter()
        with catalog.lock(dataset):
            report.count("abandoned_runs", catalog.runs.start(dataset, report.run_id, os.getpid()))
            found = discover(patterns)
            report.skipped += found.refused
            self._lineage.event("START", report.run_id, dataset, inputs=found.roots)
            try:
                Run(self._services, dataset, options, report, progress or Silent()).execute(found.files)
            except BaseException as exc:
                self._failed(report, exc, found.roots)
                raise
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
            self._services.catalog.runs.finish(
                report.run_id, "failed", counts=report.counts, skipped=report.skipped_pairs(), error=error
            )
        finally:
            self._lineage.event("FAIL", report.run_id, report.dataset, inputs=roots, error=error)
