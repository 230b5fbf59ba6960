"""The graph index (lamina.data.vectors.graph) on both backends: when it answers, when the backend does, and
that either way the answer is the same one the backend would give."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lamina.data import GraphIndex, LanceDBStore, PgVectorStore
from lamina.data.vectors.graph import GraphFiles
from lamina.errors import InvalidRequestError, UnsupportedCapabilityError
from tests.support import VectorBackend, chunk, exact_top, ids, unit_vectors

Store = VectorBackend
N, DIM = 1500, 24


@pytest.fixture
def indexed(vstore: Store) -> tuple[Store, list[Any], np.ndarray[Any, Any]]:
    vectors = unit_vectors(N, DIM, seed=3)
    chunks = [chunk(f"row {i}", vectors[i] * (1 + i % 3), source=f"s{i}", part=i % 5) for i in range(N)]
    vstore.upsert("docs", chunks)
    # float32: these tests compare orders with an exact float32 ranking (float16 is tested on its own)
    params = GraphIndex(m=16, ef_construction=80, ef_search=64, vectors="float32")
    assert vstore.build_index("docs", params) == params
    return vstore, chunks, vectors


def cosine_top(chunks: list[Any], vectors: Any, query: Any, k: int, rows: Any = None) -> list[str]:
    """The exact top-k by cosine (the stored vectors are scaled; ``vectors`` are their unit versions)."""
    rows = np.arange(len(chunks)) if rows is None else np.asarray(rows)
    order = rows[np.argsort(-(vectors[rows] @ query), kind="stable")[:k]]
    return [chunks[i].chunk_id for i in order]


def _graphs(store: Store) -> GraphFiles:
    assert store.graphs is not None
    return store.graphs


def reopen(store: Store) -> Store:
    """Another store on the same files and database: what another process opening them would see."""
    if isinstance(store, LanceDBStore):
        return LanceDBStore(_graphs(store).root.parent)
    return PgVectorStore(store.url, schema=store.schema, graph_dir=_graphs(store).root)


def _backend_refuses(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the backend was asked; the graph should have answered")

    monkeypatch.setattr(store, "_vector_ranking", refuse)
    monkeypatch.setattr(store, "_keyword_ranking", refuse)


def test_graph_answers_with_cosine_scores_and_ties_by_id(
    indexed: tuple[Store, list[Any], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, chunks, vectors = indexed
    _backend_refuses(store, monkeypatch)
    queries = unit_vectors(15, DIM, seed=4)
    recall = np.mean(
        [
            len(
                set(ids(store.search("docs", query_vector=q, k=10))) & set(cosine_top(chunks, vectors, q, 10))
            )
            / 10
            for q in queries
        ]
    )
    assert recall >= 0.9
    hits = store.search("docs", query_vector=vectors[7] * 5, k=3)  # stored vectors are not unit length
    assert hits[0].chunk.chunk_id == chunks[7].chunk_id
    assert hits[0].score == pytest.approx(1.0, abs=1e-3)  # cosine (float16 vectors), whatever the lengths
    assert hits[0].chunk.text == "row 7" and hits[0].chunk.metadata == {"part": 2}
    assert hits[0].chunk.source_uri == "file:///corpus/s7" and hits[0].chunk.vector is None
    assert [h.rank for h in hits] == [1, 2, 3]
    # filters and scopes: before top-k, exactly when they leave few rows
    part = store.search("docs", query_vector=queries[0], k=10, filters={"part": 1})
    assert len(part) == 10 and all(h.chunk.metadata["part"] == 1 for h in part)
    few = frozenset(c.chunk_id for c in chunks[:9])
    assert ids(store.search("docs", query_vector=queries[0], k=4, chunk_ids=few)) == exact_top(
        chunks[:9], queries[0], 4
    )
    assert store.search("docs", query_vector=queries[0], k=4, filters={"part": 99}) == []
    # a wide scope goes through the graph's selector
    wide = frozenset(c.chunk_id for c in chunks[::2])
    found = ids(store.search("docs", query_vector=queries[1], k=10, chunk_ids=wide))
    assert len(found) == 10 and set(found) <= wide
    # hybrid takes its vector half from the graph too
    hybrid = store.search("docs", query_text="row", query_vector=queries[2], k=5, mode="hybrid")
    assert len(hybrid) == 5


WORDS = (
    "river",
    "mountain",
    "policy",
    "report",
    "running",
    "dogs",
    "cat",
    "cats",
    "forest",
    "storm",
    "harbour",
    "engine",
    "budget",
    "clinic",
    "vaccine",
    "protein",
    "galaxy",
    "orbit",
    "ferment",
    "bread",
    "tea",
    "steep",
    "drum",
    "cymbal",
    "snare",
    "garden",
    "rose",
    "prune",
)


def test_keyword_and_hybrid_from_the_graph_equal_the_stores_own(
    vstore: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(8)
    vectors = unit_vectors(N, DIM, seed=11)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 14)))) + f" item{i}" for i in range(N)]
    chunks = [chunk(t, vectors[i], source=f"k{i}", part=i % 3) for i, t in enumerate(texts)]
    vstore.upsert("docs", chunks)
    version = frozenset(c.chunk_id for c in chunks[: N // 2])
    q = unit_vectors(1, DIM, seed=12)[0]
    cases: list[dict[str, Any]] = [
        {"mode": "keyword", "query_text": "running dogs in the storm"},
        {"mode": "keyword", "query_text": "cats and cat", "chunk_ids": version},
        {"mode": "keyword", "query_text": "galaxy orbit", "filters": {"part": 1}},
        {"mode": "keyword", "query_text": "tea steep bread", "chunk_ids": version, "filters": {"part": 2}},
        {"mode": "keyword", "query_text": "item7 unknownword"},
        {"mode": "keyword", "query_text": "unknownword"},
        {"mode": "hybrid", "query_text": "rose garden prune", "query_vector": q},
        {"mode": "hybrid", "query_text": "drum snare", "query_vector": q, "chunk_ids": version},
    ]
    own = [vstore.search("docs", k=10, **case) for case in cases]  # no graph yet: the store answers
    vstore.build_index("docs", GraphIndex(m=16, ef_construction=200, ef_search=400, vectors="float32"))
    with monkeypatch.context() as patch:
        _backend_refuses(vstore, patch)
        from_graph = [vstore.search("docs", k=10, **case) for case in cases]
    for case, mine, theirs in zip(cases, from_graph, own, strict=True):
        assert ids(mine) == ids(theirs), case
        assert [h.score for h in mine] == pytest.approx([h.score for h in theirs], rel=1e-9), case
        assert [(h.vector_rank, h.keyword_rank) for h in mine] == [
            (h.vector_rank, h.keyword_rank) for h in theirs
        ], case
    assert own[0] and own[1] and own[5] == []


def test_float16_graphs_keep_recall_and_scores_to_three_digits(vstore: Store) -> None:
    vectors = unit_vectors(N, DIM, seed=17)
    chunks = [chunk(f"half {i}", vectors[i], source=f"h{i}") for i in range(N)]
    vstore.upsert("docs", chunks)
    built = vstore.build_index("docs", GraphIndex(m=16, ef_construction=100))
    assert isinstance(built, GraphIndex) and built.vectors == "float16"
    queries = unit_vectors(20, DIM, seed=18)
    recall = []
    for q in queries:
        hits = vstore.search("docs", query_vector=q, k=10, ef_search=200)
        truth = cosine_top(chunks, vectors, q, 10)
        recall.append(len(set(ids(hits)) & set(truth)) / 10)
        exact = {c.chunk_id: float(vectors[i] @ q) for i, c in enumerate(chunks)}
        assert all(abs(h.score - exact[h.chunk.chunk_id]) < 2e-3 for h in hits)
    assert np.mean(recall) >= 0.95


def test_ef_search_is_a_query_time_knob(indexed: tuple[Store, list[Any], Any]) -> None:
    store, chunks, vectors = indexed
    q = unit_vectors(1, DIM, seed=9)[0]
    assert ids(store.search("docs", query_vector=q, k=10, ef_search=400)) == cosine_top(
        chunks, vectors, q, 10
    )
    with pytest.raises(InvalidRequestError, match="ef_search"):
        store.search("docs", query_vector=q, k=10, ef_search=0)


def test_writes_after_the_build_go_to_the_backend_unless_the_scope_is_in_the_graph(
    indexed: tuple[Store, list[Any], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, chunks, vectors = indexed
    late = chunk("written after the build", vectors[0], source="late")
    store.upsert("docs", [late])
    # unscoped: the graph is stale, so the backend answers and sees the new row
    assert late.chunk_id in ids(store.search("docs", query_vector=vectors[0], k=2))
    # a version whose chunks are all in the graph is still answered by the graph (an ingest in progress)
    version = frozenset(c.chunk_id for c in chunks)
    with monkeypatch.context() as patch:
        _backend_refuses(store, patch)
        assert ids(store.search("docs", query_vector=vectors[0], k=1, chunk_ids=version)) == [
            chunks[0].chunk_id
        ]
    # a version holding the new chunk is not: the backend answers
    newer = version | {late.chunk_id}
    assert late.chunk_id in ids(store.search("docs", query_vector=vectors[0], k=2, chunk_ids=newer))
    # after the next build the graph answers everything again
    store.build_index("docs", GraphIndex(m=16, ef_construction=80, vectors="float32"))
    with monkeypatch.context() as patch:
        _backend_refuses(store, patch)
        assert late.chunk_id in ids(store.search("docs", query_vector=vectors[0], k=2))
    # deleting makes the graph stale: the deleted row is never returned
    store.delete("docs", [late.chunk_id])
    assert late.chunk_id not in ids(store.search("docs", query_vector=vectors[0], k=2))


def test_a_writer_that_dies_after_its_commit_never_leaves_the_graph_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LanceDB only: pgvector raises its generation inside the write's own transaction."""
    store = LanceDBStore(tmp_path / "vectors")
    vectors = unit_vectors(N, DIM, seed=3)
    store.upsert("docs", [chunk(f"row {i}", vectors[i], source=f"s{i}") for i in range(N)])
    store.build_index("docs", GraphIndex(m=16, ef_construction=80, vectors="float32"))
    late = chunk("committed by a writer that then died", vectors[9], source="died")
    graphs = _graphs(store)
    real_write = graphs.write_token

    def die_after_commit(dataset: str, token: str) -> None:
        if token.isdigit():  # recording the committed version: the process dies first
            raise KeyboardInterrupt
        real_write(dataset, token)

    monkeypatch.setattr(graphs, "write_token", die_after_commit)
    with pytest.raises(KeyboardInterrupt):
        store.upsert("docs", [late])
    monkeypatch.setattr(graphs, "write_token", real_write)
    reader = LanceDBStore(graphs.root.parent)  # a fresh process reading the same directory
    assert late.chunk_id in ids(reader.search("docs", query_vector=vectors[9], k=2))


def test_another_store_on_the_same_files_uses_the_new_build(
    indexed: tuple[Store, list[Any], Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, chunks, vectors = indexed
    other = reopen(store)
    _backend_refuses(other, monkeypatch)
    first = ids(other.search("docs", query_vector=vectors[3], k=1))
    assert first == [chunks[3].chunk_id]
    moved = chunk("row 3 moved", vectors[3], source="moved")
    store.upsert("docs", [moved])
    store.delete("docs", [chunks[3].chunk_id])
    store.build_index("docs", GraphIndex(m=16, ef_construction=80, vectors="float32"))
    assert ids(other.search("docs", query_vector=vectors[3], k=1)) == [moved.chunk_id]
    if isinstance(other, PgVectorStore):
        other.close()


def test_broken_or_missing_graph_files_fall_back_to_the_backend(
    indexed: tuple[Store, list[Any], Any],
) -> None:
    store, chunks, vectors = indexed
    graphs = _graphs(store)
    build = next(p for p in (graphs.root / "docs").iterdir() if p.is_dir())
    shutil.rmtree(build)  # the published build vanished (disk cleanup, a half-copied state dir)
    fresh = reopen(store)
    assert ids(fresh.search("docs", query_vector=vectors[5], k=1)) == [chunks[5].chunk_id]

    # a failing build leaves the store searchable and the next build publishes a working graph
    def explode(*args: object, **kwargs: object) -> None:
        raise MemoryError("simulated: the build ran out of memory")

    original = graphs.build
    graphs.build = explode  # type: ignore[method-assign]
    with pytest.raises(MemoryError):
        store.build_index("docs", GraphIndex(m=16, ef_construction=80, vectors="float32"))
    assert ids(store.search("docs", query_vector=vectors[5], k=1)) == [chunks[5].chunk_id]
    graphs.build = original  # type: ignore[method-assign]
    store.build_index("docs", GraphIndex(m=16, ef_construction=80, vectors="float32"))
    assert ids(fresh.search("docs", query_vector=vectors[5], k=1)) == [chunks[5].chunk_id]
    assert [p.name for p in (graphs.root / "docs").iterdir() if p.is_dir()] != [build.name]
    if isinstance(fresh, PgVectorStore):
        fresh.close()


def test_drop_removes_the_graph_and_small_tables_have_none(indexed: tuple[Store, list[Any], Any]) -> None:
    store, chunks, _ = indexed
    store.drop("docs")
    assert not (_graphs(store).root / "docs").exists()
    store.upsert("docs", chunks[:10])
    assert store.build_index("docs", GraphIndex()) != GraphIndex()  # below MIN_INDEX_ROWS: exact
    assert not (_graphs(store).root / "docs" / "current.json").exists()


def test_pgvector_without_a_graph_dir_refuses_graph_indexes(pg_url: str) -> None:
    store = PgVectorStore(pg_url, schema="graphless")
    try:
        with pytest.raises(UnsupportedCapabilityError, match="graph_dir"):
            store.build_index("docs", GraphIndex())
    finally:
        store.close()


def test_a_build_after_a_few_writes_extends_the_graph_and_answers_as_the_store(
    vstore: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(5)
    vectors = unit_vectors(N + 40, DIM, seed=13)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))) + f" row{i}" for i in range(N + 40)]
    chunks = [chunk(t, vectors[i], source=f"x{i}", part=i % 3) for i, t in enumerate(texts)]
    params = GraphIndex(m=16, ef_construction=200, ef_search=400, vectors="float32")
    vstore.upsert("docs", chunks[:N])
    vstore.build_index("docs", params)
    current = _graphs(vstore).root / "docs" / "current.json"
    first = json.loads(current.read_text())["build"]
    gone = [c.chunk_id for c in chunks[:25]]
    vstore.upsert("docs", chunks[N:])  # 40 new rows
    vstore.delete("docs", gone)
    vstore.build_index("docs", params)
    manifest = json.loads(current.read_text())
    assert (manifest["extends"], manifest["deleted"]) == (first, 25)

    live = list(range(25, N + 40))
    version = frozenset(chunks[i].chunk_id for i in live[::2])
    cases: list[dict[str, Any]] = [
        {"mode": "keyword", "query_text": "river mountain row3"},
        {"mode": "keyword", "query_text": "cats cat", "chunk_ids": version},
        {"mode": "keyword", "query_text": "galaxy", "filters": {"part": 2}},
    ]
    with monkeypatch.context() as patch:
        patch.setattr(vstore, "_graph_view", lambda *args: None)
        own = [vstore.search("docs", k=10, **case) for case in cases]
    with monkeypatch.context() as patch:
        _backend_refuses(vstore, patch)
        for case, theirs in zip(cases, own, strict=True):
            mine = vstore.search("docs", k=10, **case)
            assert ids(mine) == ids(theirs), case
            assert [h.score for h in mine] == pytest.approx([h.score for h in theirs], rel=1e-9), case
        for i in (0, 3, N + 5, N + 30):  # deleted rows never come back; new rows are found
            found = ids(vstore.search("docs", query_vector=vectors[i], k=10))
            assert found == cosine_top(chunks, vectors, vectors[i], 10, live)
        scoped = ids(vstore.search("docs", query_vector=vectors[40], k=5, chunk_ids=version))
        assert scoped == cosine_top(chunks, vectors, vectors[40], 5, live[::2])
    # past MAX_DELETED of the rows deleted, the next build starts afresh
    vstore.delete("docs", [c.chunk_id for c in chunks[25:500]])
    vstore.build_index("docs", params)
    manifest = json.loads(current.read_text())
    assert (manifest["extends"], manifest["deleted"]) == (None, 0)
    with monkeypatch.context() as patch:
        _backend_refuses(vstore, patch)
        found = ids(vstore.search("docs", query_vector=vectors[600], k=10))
    assert found == cosine_top(chunks, vectors, vectors[600], 10, list(range(500, N + 40)))


def test_warming_loads_the_index_before_the_first_search(indexed: tuple[Store, list[Any], Any]) -> None:
    from lamina.data import PinnedVersion, Retriever
    from lamina.errors import NotFoundError

    store, chunks, _ = indexed
    fresh = reopen(store)

    class Versions:
        def pin(self, ref: str) -> PinnedVersion:
            if not ref.startswith("docs"):
                raise NotFoundError(f"dataset {ref!r} has no versions")
            return PinnedVersion("docs", "v1", 1, frozenset(c.chunk_id for c in chunks))

    retriever = Retriever(Versions(), fresh, embedder=None)  # type: ignore[arg-type]
    assert _graphs(fresh)._loaded == {}
    assert retriever.warm(["docs@1", "nope"]) == ["nope"]
    assert "docs" in _graphs(fresh)._loaded
    assert fresh.warm("docs") and not fresh.warm("empty")
    if isinstance(fresh, PgVectorStore):
        fresh.close()
