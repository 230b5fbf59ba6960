"""Several hosts on one PostgreSQL metadata store: the dataset lock excludes them from each other, gc never
deletes what a running ingest reuses, and version sequence numbers stay consecutive.

A "host" is a DataStack of its own state directory on the shared database (metadata and pgvector), as two
machines sharing one PostgreSQL would be. An ingest is held midway by its IngestProgress callback.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest

from lamina.config import LaminaConfig
from lamina.data import (
    DatasetCatalog,
    DatasetVersion,
    IngestOptions,
    IngestPipeline,
    IngestProgress,
    IngestReport,
    SourceRecord,
    collect_garbage,
)
from lamina.data.versions import NewVersion, manifest_id
from lamina.errors import ConflictError
from lamina.models import EngineEmbedder
from lamina.stack import DataStack, open_data_stack
from lamina.store import Store
from tests.support import T0, lineage_row

OPTIONS = IngestOptions(chunk_size=48, chunk_overlap=8, embed_batch_size=4)
WORDS = ["river", "mountain", "cloud", "vector", "lamina", "store", "token", "graph", "index", "query"]
BUSY = "another ingest or gc of dataset 'docs' is running"


def prose(seed: int, n: int = 100) -> str:
    return " ".join(
        f"{WORDS[(seed * 7 + i * (seed + 3)) % len(WORDS)]}{(seed * 31 + i) % 97}" for i in range(n)
    )


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(3):
        (root / f"f{i}.txt").write_text(prose(i))
    return root


@pytest.fixture
def hosts(pg_database: str, tmp_path: Path) -> Iterator[tuple[DataStack, DataStack]]:
    """Two hosts, each with its own state directory, sharing one PostgreSQL database."""
    config = LaminaConfig.model_validate(
        {"store": {"url": pg_database}, "data": {"vector_backend": "pgvector", "pgvector_url": pg_database}}
    )
    a = open_data_stack(config, tmp_path / "host-a")
    b = open_data_stack(config, tmp_path / "host-b")
    yield a, b
    a.close()
    b.close()


class Gate:
    """Holds an ingest at its first report of chunks (after it has looked up which chunks the vector store
    already holds, before it writes or commits anything) until ``release`` is set."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.release = threading.Event()

    def files(self, done: int, total: int) -> None:
        pass

    def chunks(self, done: int, total: int) -> None:
        if not self.reached.is_set():
            self.reached.set()
            self.release.wait(timeout=60)


class Interrupted(Exception):
    """Raised by ``InterruptWhenWritten``, as a crash would end the run."""


class InterruptWhenWritten:
    """Ends an ingest once every chunk is embedded and written, before its commit: an interrupted run."""

    def files(self, done: int, total: int) -> None:
        pass

    def chunks(self, done: int, total: int) -> None:
        if total and done == total:
            raise Interrupted


def ingest(
    host: DataStack, embedder: EngineEmbedder, corpus: Path, progress: IngestProgress | None = None
) -> IngestReport:
    pipeline = IngestPipeline(host.catalog, host.vectors, embedder, host.lineage)
    return pipeline.ingest([str(corpus)], "docs", OPTIONS, progress)


def gc(host: DataStack) -> Any:
    return collect_garbage(host.catalog, host.vectors, "docs", keep=1)


def libpq(url: str) -> str:
    return url.replace("+psycopg", "")


@pytest.mark.timeout(300)
def test_an_ingest_on_one_host_excludes_gc_and_ingest_on_another(
    hosts: tuple[DataStack, DataStack], corpus: Path, real_embedder: EngineEmbedder
) -> None:
    a, b = hosts
    gate = Gate()
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(ingest, a, real_embedder, corpus, gate)
        assert gate.reached.wait(timeout=120), running.exception(timeout=0) if running.done() else "stuck"
        started = time.monotonic()
        with pytest.raises(ConflictError, match=BUSY):
            gc(b)
        with pytest.raises(ConflictError, match=BUSY):
            ingest(b, real_embedder, corpus)
        assert time.monotonic() - started < 10  # refused at once, not after waiting for the lock
        gate.release.set()
        report = running.result(timeout=120)
    assert report.state == "completed" and report.version is not None
    # the holder finished: the lock is free for the other host
    assert gc(b).versions == []
    assert ingest(b, real_embedder, corpus).state == "unchanged"


@pytest.mark.timeout(300)
def test_a_lock_whose_connection_dies_is_released_and_its_holder_commits_nothing(
    hosts: tuple[DataStack, DataStack], corpus: Path, real_embedder: EngineEmbedder, pg_database: str
) -> None:
    a, b = hosts
    gate = Gate()
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(ingest, a, real_embedder, corpus, gate)
        assert gate.reached.wait(timeout=120)
        with psycopg.connect(libpq(pg_database), autocommit=True) as admin:
            holders = admin.execute(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ).fetchall()
            assert len(holders) == 1  # host a's dataset lock
            ended = admin.execute("SELECT pg_terminate_backend(%s, 30000)", (holders[0][0],)).fetchone()
            assert ended == (True,)
        # the server released the lock with the session: host b takes it at once
        assert ingest(b, real_embedder, corpus).state == "completed"
        gate.release.set()
        with pytest.raises(ConflictError, match="lost the lock 'dataset:docs'"):
            running.result(timeout=120)
    runs = {r.state: r.run_id for r in a.catalog.runs.of("docs")}
    assert sorted(runs) == ["completed", "failed"]  # host b's run, and host a's
    assert [(v.seq, v.run_id) for v in b.catalog.log("docs")] == [(1, runs["completed"])]


@pytest.mark.timeout(300)
def test_gc_on_another_host_cannot_delete_vectors_a_running_ingest_reuses(
    hosts: tuple[DataStack, DataStack], corpus: Path, real_embedder: EngineEmbedder
) -> None:
    a, b = hosts
    with pytest.raises(Interrupted):
        ingest(a, real_embedder, corpus, InterruptWhenWritten())
    orphans = set(a.vectors.chunk_ids("docs"))  # written by the interrupted run, in no version
    assert orphans and a.catalog.log("docs") == []

    gate = Gate()
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(ingest, a, real_embedder, corpus, gate)  # reuses every one of them
        assert gate.reached.wait(timeout=120)
        with pytest.raises(ConflictError, match=BUSY):
            gc(b)
        assert set(b.vectors.chunk_ids("docs")) == orphans
        gate.release.set()
        report = running.result(timeout=120)
    assert report.state == "completed"
    assert report.counts["chunks_reused"] == len(orphans) and "chunks_embedded" not in report.counts

    version = b.catalog.pin("docs")
    assert version.chunk_ids == orphans
    assert gc(b).orphans == 0 and set(b.vectors.chunk_ids("docs")) == orphans
    chunk = b.vectors.get("docs", [sorted(orphans)[0]])[0]
    query = real_embedder.embed([chunk.text])[0]
    hits = b.vectors.search("docs", query_vector=query, k=3, chunk_ids=version.chunk_ids)
    assert hits[0].chunk.chunk_id == chunk.chunk_id


# -- version sequence numbers across hosts -----------------------------------------------------------------


def new_version(i: int, run_id: str) -> NewVersion:
    """A version of dataset docs of its own (chunks and source differ by ``i``)."""
    uri, sha = f"file:///f{i}.txt", f"{i:064x}"
    ids = [f"c{i}-{j}" for j in range(3)]
    manifest = {"dataset": "docs", "ids": ids, "embedding_model": {"ref": "m@1", "sha256": "f" * 64}}
    lineage = [lineage_row(c, uri, sha, run_id) for c in ids]
    source = SourceRecord(uri, sha, 10, T0, [(uri, sha, "0" * 16)], len(ids))
    return NewVersion("docs", manifest_id(manifest), manifest, "p1", run_id, ids, [source], lineage)


def run_together(n: int, work: Callable[[int, threading.Barrier], Any]) -> list[Any]:
    """``work(i, barrier)`` for i in 0..n-1 in n threads; the barrier lines them up at any step."""
    barrier = threading.Barrier(n)
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(work, i, barrier) for i in range(n)]
        return [f.result(timeout=120) for f in futures]


@pytest.mark.timeout(180)
def test_hosts_committing_one_dataset_at_once_get_consecutive_sequence_numbers(pg_database: str) -> None:
    setup = Store(pg_database)
    setup.migrate()
    setup.close()

    def commit(i: int, barrier: threading.Barrier) -> DatasetVersion:
        store = Store(pg_database)  # a host of its own, which does not take the dataset lock
        try:
            catalog = DatasetCatalog(store)
            barrier.wait(timeout=60)
            catalog.runs.start("docs", f"run-{i}", pid=os.getpid())  # the first also records the dataset
            barrier.wait(timeout=60)
            return catalog.commit(new_version(i, f"run-{i}"), counts={"chunks": 3}, skipped=[])
        finally:
            store.close()

    n = 8
    committed = run_together(n, commit)
    assert sorted(v.seq for v in committed) == list(range(1, n + 1))
    store = Store(pg_database)
    try:
        catalog = DatasetCatalog(store)
        log = {v.seq: v.version_id for v in catalog.log("docs")}
        assert log == {v.seq: v.version_id for v in committed}
        assert len(set(log.values())) == n
        runs = {r.run_id: (r.state, r.version_seq) for r in catalog.runs.of("docs")}
        assert runs == {v.run_id: ("completed", v.seq) for v in committed}
        for v in committed:
            assert catalog.members(v) == sorted(f"c{v.run_id.removeprefix('run-')}-{j}" for j in range(3))
    finally:
        store.close()
