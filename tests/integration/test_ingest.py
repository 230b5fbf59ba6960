"""The ingestion pipeline end to end with the real MiniLM embedder, on LanceDB and on pgvector.

The embedder is wrapped in a counter (the real one inside), so "embeds nothing again" is a count of
texts that reached the model, and an engine crash is the same wrapper raising mid-run.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from lamina.data import LanceDBStore, PgVectorStore, VectorStore, collect_garbage
from lamina.data.ingest import (
    IngestOptions,
    IngestPipeline,
    IngestReport,
    LineageEmitter,
    LoadOptions,
    clean_text,
)
from lamina.data.versions import DatasetCatalog
from lamina.errors import ConflictError, EngineCrashedError
from lamina.models._embedder import EngineEmbedder
from lamina.store import Store

WORDS = ["river", "mountain", "cloud", "vector", "lamina", "store", "token"]
WORDS += ["model", "data", "search", "graph", "index", "query", "answer"]
OPTIONS = IngestOptions(chunk_size=48, chunk_overlap=8, embed_batch_size=4)


def prose(seed: int, n: int = 120) -> str:
    """Distinct text per seed (so no two files are near-duplicates)."""
    words = [f"{WORDS[(seed * 7 + i * (seed + 3)) % len(WORDS)]}{(seed * 31 + i) % 97}" for i in range(n)]
    return " ".join(words) + "."


class Counting:
    """The real embedder, counting texts embedded; raises EngineCrashedError after ``fail_after`` calls."""

    def __init__(self, inner: EngineEmbedder, fail_after: int | None = None) -> None:
        self.inner, self.fail_after = inner, fail_after
        self.calls = self.texts = 0

    dim = property(lambda self: self.inner.dim)
    name = property(lambda self: self.inner.name)
    sha256 = property(lambda self: self.inner.sha256)
    max_tokens = property(lambda self: self.inner.max_tokens)

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise EngineCrashedError("the embedding engine crashed (test)")
        self.texts += len(texts)
        return self.inner.embed(texts)

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def token_offsets(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        return self.inner.token_offsets(texts)


@pytest.fixture(params=["lancedb", "pgvector"])
def vectors(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VectorStore]:
    if request.param == "lancedb":
        yield LanceDBStore(tmp_path / "vectors")
        return
    pg_url = request.getfixturevalue("pg_url")
    schema = f"ingest_{uuid.uuid4().hex[:10]}"
    store = PgVectorStore(pg_url, schema=schema)
    yield store
    store.close()
    with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture
def lance(tmp_path: Path) -> VectorStore:
    return LanceDBStore(tmp_path / "vectors")


class Env:
    def __init__(self, tmp_path: Path, vectors: VectorStore, embedder: EngineEmbedder) -> None:
        self.root = tmp_path / "corpus"
        self.root.mkdir()
        self.meta = Store(f"sqlite:///{tmp_path / 'lamina.db'}")
        self.meta.migrate()
        self.catalog = DatasetCatalog(self.meta)
        self.vectors = vectors
        self.real = embedder
        self.log = tmp_path / "lineage.jsonl"
        self.locks = tmp_path / "locks"

    def pipeline(self, embedder: Counting) -> IngestPipeline:
        lineage = LineageEmitter(self.log)
        return IngestPipeline(self.catalog, self.vectors, embedder, lineage)

    def write(self, name: str, text: str) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    def ingest(self, fail_after: int | None = None) -> tuple[Counting, IngestReport]:
        counting = Counting(self.real, fail_after)
        return counting, self.pipeline(counting).ingest([str(self.root)], "docs", OPTIONS)

    def search(self, version_ref: str, query: str) -> list[str]:
        version = self.catalog.resolve(version_ref)
        ids = self.catalog.members(version)
        hits = self.vectors.search(
            "docs", query_vector=self.real.embed([query])[0], k=50, chunk_ids=ids, mode="vector"
        )
        return sorted({h.chunk.source_uri for h in hits})


@pytest.fixture
def env(tmp_path: Path, vectors: VectorStore, real_embedder: EngineEmbedder) -> Iterator[Env]:
    e = Env(tmp_path, vectors, real_embedder)
    yield e
    e.meta.close()


def test_incremental_ingest_reuses_unchanged_and_keeps_old_versions(env: Env) -> None:
    for i in range(4):
        env.write(f"f{i}.txt", prose(i))
    first, report1 = env.ingest()
    v1 = env.catalog.resolve("docs")
    assert v1.seq == 1 and report1.state == "completed"
    assert first.texts == len(env.catalog.members(v1)) > 4

    again, report2 = env.ingest()
    assert again.texts == 0 and report2.state == "unchanged"
    assert [v.seq for v in env.catalog.log("docs")] == [1]

    env.write("f1.txt", prose(11))  # changed
    (env.root / "f3.txt").unlink()  # gone
    env.write("f9.txt", prose(9))  # new
    third, _ = env.ingest()
    v2 = env.catalog.resolve("docs")
    changed_chunks = [cid for cid in env.catalog.members(v2) if cid not in set(env.catalog.members(v1))]
    assert third.texts == len(changed_chunks) > 0  # only f1's and f9's chunks were embedded
    uri = (env.root / "f3.txt").resolve().as_uri()
    assert uri not in env.search("docs@2", prose(3)) and uri in env.search("docs@1", prose(3))
    diff = env.catalog.diff(v1, v2)
    assert [Path(u).name for u in diff.added] == ["f9.txt"]
    assert [Path(u).name for u in diff.removed] == ["f3.txt"]
    assert [Path(u).name for u in diff.changed] == ["f1.txt"]
    assert env.catalog.members(env.catalog.resolve("docs@1")) == env.catalog.members(v1)  # immutable


def test_engine_crash_leaves_previous_version_and_next_run_completes(env: Env) -> None:
    for i in range(3):
        env.write(f"f{i}.txt", prose(i))
    env.ingest()
    v1 = env.catalog.resolve("docs")
    for i in range(3, 8):
        env.write(f"g{i}.txt", prose(i, 200))
    with pytest.raises(EngineCrashedError):
        env.ingest(fail_after=2)
    assert env.catalog.resolve("docs") == v1
    assert env.search("docs", prose(1)) == env.search("docs@1", prose(1))
    failed = env.catalog.runs.of("docs")[0]
    assert failed.state == "failed" and "crashed" in (failed.error or "")

    resumed, report = env.ingest()
    v2 = env.catalog.resolve("docs")
    new_chunks = set(env.catalog.members(v2)) - set(env.catalog.members(v1))
    assert v2.seq == 2 and report.state == "completed"
    assert 0 < resumed.texts < len(new_chunks)  # the 2 batches embedded before the crash were reused
    events = [json.loads(line)["eventType"] for line in env.log.read_text().splitlines()]
    assert events == ["START", "COMPLETE", "START", "FAIL", "START", "COMPLETE"]


def test_a_failed_index_build_does_not_fail_the_ingest(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    env.write("a.txt", prose(1))

    def broken(dataset: str, params: object) -> object:
        raise MemoryError("simulated: the index build ran out of memory")

    monkeypatch.setattr(env.vectors, "build_index", broken)
    _, report = env.ingest()
    assert report.state == "completed" and report.version is not None
    assert "index build failed (MemoryError" in report.warnings[0]
    assert report.to_json()["warnings"] == report.warnings
    assert env.search("docs", prose(1)) == [(env.root / "a.txt").as_uri()]  # the store's own search


def test_gc_deletes_the_vectors_an_interrupted_ingest_left(env: Env) -> None:
    for i in range(3):
        env.write(f"f{i}.txt", prose(i))
    env.ingest()
    kept = env.catalog.members(env.catalog.resolve("docs"))
    for i in range(3, 8):
        env.write(f"g{i}.txt", prose(i, 200))
    with pytest.raises(EngineCrashedError):
        env.ingest(fail_after=2)  # two batches reached the store; no version lists them
    assert len(env.vectors.chunk_ids("docs")) > len(kept)
    collected = collect_garbage(env.catalog, env.vectors, "docs", keep=5)
    assert collected.versions == [] and collected.orphans == len(collected.chunk_ids) > 0
    assert env.vectors.chunk_ids("docs") == sorted(kept)
    assert env.search("docs", prose(1)) == sorted((env.root / f"f{i}.txt").as_uri() for i in range(3))
    again = collect_garbage(env.catalog, env.vectors, "docs", keep=5)
    assert (again.chunk_ids, again.orphans) == ([], 0)


def test_every_chunk_records_its_lineage(env: Env) -> None:
    text = "Ünïcode  prose\u00a0here. " + prose(5)
    path = env.write("u.txt", "\ufeff" + text)
    env.ingest()
    version = env.catalog.resolve("docs")
    raw = path.read_bytes()
    chunks = env.vectors.get("docs", env.catalog.members(version))
    assert chunks
    for chunk in chunks:
        row = env.catalog.lineage(chunk.chunk_id)
        assert row.source_uri == path.resolve().as_uri() and row.versions == (1,)
        assert (row.byte_start, row.byte_end) == (chunk.byte_start, chunk.byte_end)
        source_words = raw[row.byte_start : row.byte_end].decode("utf-8").split()
        assert " ".join(source_words).replace("\u00a0", " ") == chunk.text
        assert row.embedding_model == env.real.name and row.embedding_sha256 == env.real.sha256
        assert row.pipeline_version == version.pipeline_version
        assert chunk.version == version.version_id


def test_lineage_of_a_file_read_in_segments_points_at_its_bytes(env: Env) -> None:
    lines = [f"Ünïcode  line {i}\u00a0with ﬁne words: " + prose(i, 12) for i in range(300)]
    path = env.write(
        "seg.md",
        "\ufeff" + "".join(line + ("\r\n\r\n" if i % 5 == 4 else "\r\n") for i, line in enumerate(lines)),
    )
    options = IngestOptions(chunk_size=48, chunk_overlap=8, load=LoadOptions(segment_bytes=4096))
    raw = path.read_bytes()
    assert len(raw) > 10 * options.load.segment_bytes
    env.pipeline(Counting(env.real)).ingest([str(env.root)], "docs", options)
    chunks = env.vectors.get("docs", env.catalog.members(env.catalog.resolve("docs")))
    assert len(chunks) > 50
    for chunk in chunks:
        row = env.catalog.lineage(chunk.chunk_id)
        assert (row.byte_start, row.byte_end) == (chunk.byte_start, chunk.byte_end)
        assert clean_text(raw[row.byte_start : row.byte_end].decode("utf-8")).text == chunk.text


def test_bad_inputs_are_skipped_with_reasons_and_symlinks_refused(
    tmp_path: Path, lance: VectorStore, real_embedder: EngineEmbedder
) -> None:
    env = Env(tmp_path, lance, real_embedder)
    env.write("good.txt", prose(1))
    env.write("empty.txt", "")
    (env.root / "binary.txt").write_bytes(b"\x00\x01\x02 binary")
    (env.root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    env.write("big.txt", prose(2, 3000))
    env.write("image.png", "not really")
    outside = env.write("../outside.txt", prose(3))
    (env.root / "link.txt").symlink_to(outside)
    (env.root / "linkdir").symlink_to(tmp_path)
    options = IngestOptions(chunk_size=48, chunk_overlap=8, max_file_bytes=5000)
    report = env.pipeline(Counting(real_embedder)).ingest([str(env.root)], "docs", options)
    reasons = {Path(s.path).name: s.reason for s in report.skipped}
    assert "empty" in reasons["empty.txt"] and "binary" in reasons["binary.txt"]
    assert "UTF-8" in reasons["latin1.txt"] and "too large" in reasons["big.txt"]
    assert "symbolic link" in reasons["link.txt"] and "symbolic link" in reasons["linkdir"]
    assert "unsupported" in reasons["image.png"]
    sources = env.catalog.sources(env.catalog.resolve("docs"))
    assert [Path(s.uri).name for s in sources] == ["good.txt"]
    env.meta.close()


def test_duplicates_are_dropped_and_a_second_ingest_waits_for_the_lock(
    tmp_path: Path, lance: VectorStore, real_embedder: EngineEmbedder
) -> None:
    env = Env(tmp_path, lance, real_embedder)
    env.write("a.txt", prose(1, 300))
    env.write("b.txt", prose(1, 300))
    text = prose(1, 300)
    env.write("c.txt", "changed " + text.split(" ", 1)[1])
    _, report = env.ingest()
    skipped = dict(report.skipped_pairs())
    assert "exact duplicate" in skipped[(env.root / "b.txt").as_uri()]
    assert "near duplicate" in skipped[(env.root / "c.txt").as_uri()]
    with env.catalog.lock("docs"), pytest.raises(ConflictError):
        env.ingest()
    env.meta.close()


def test_gc_keeps_tagged_versions_and_deletes_unreferenced_vectors(
    tmp_path: Path, lance: VectorStore, real_embedder: EngineEmbedder
) -> None:
    env = Env(tmp_path, lance, real_embedder)
    for seed in range(3):
        env.write("f.txt", prose(seed + 20))
        env.ingest()
    env.catalog.tag("docs@1", "prod")
    only_v2 = set(env.catalog.members(env.catalog.resolve("docs@2")))
    collected = collect_garbage(env.catalog, env.vectors, "docs", keep=1)
    assert collected.versions == [2]
    assert [v.seq for v in env.catalog.log("docs")] == [3, 1]
    assert env.vectors.get("docs", sorted(only_v2)) == []
    assert env.search("docs@prod", prose(20)) == [(env.root / "f.txt").as_uri()]
    env.meta.close()


class Recording:
    """An IngestProgress that keeps every update."""

    def __init__(self) -> None:
        self.updates: list[tuple[str, int, int]] = []

    def files(self, done: int, total: int) -> None:
        self.updates.append(("files", done, total))

    def chunks(self, done: int, total: int) -> None:
        self.updates.append(("chunks", done, total))


def test_progress_reports_files_then_chunks_up_to_their_totals(env: Env) -> None:
    for i in range(3):
        env.write(f"f{i}.txt", prose(i))
    progress = Recording()
    counting = Counting(env.real)
    report = env.pipeline(counting).ingest([str(env.root)], "docs", OPTIONS, progress=progress)
    files = [(d, t) for kind, d, t in progress.updates if kind == "files"]
    chunks = [(d, t) for kind, d, t in progress.updates if kind == "chunks"]
    assert files[-1] == (3, 3) and [d for d, _ in files] == sorted(d for d, _ in files)
    embedded = report.counts["chunks_embedded"]
    assert chunks[0] == (0, embedded) and chunks[-1] == (embedded, embedded)
    assert len(chunks) == 1 + -(-embedded // OPTIONS.embed_batch_size)  # one update per batch
    last_file = max(i for i, u in enumerate(progress.updates) if u[0] == "files")
    assert last_file < min(i for i, u in enumerate(progress.updates) if u[0] == "chunks")
