"""The graph index (lamina.data._graph) on both backends: when it answers, when the backend does, and
that either way the answer is the same one the backend would give."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lamina.data import GraphIndex, LanceDBStore, PgVectorStore
from lamina.data._graph import GraphFiles
from lamina.errors import InvalidRequestError, UnsupportedCapabilityError
from tests.test_vectorstore import chunk, exact_top, ids, open_store, unit_vectors

Store = LanceDBStore | PgVectorStore
N, DIM = 1500, 24


@pytest.fixture(params=["lancedb", "pgvector"])
def gstore(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    yield from open_store(str(request.param), tmp_path, request)


@pytest.fixture
def indexed(gstore: Store) -> tuple[Store, list[Any], np.ndarray[Any, Any]]:
    vectors = unit_vectors(N, DIM, seed=3)
    chunks = [chunk(f"row {i}", vectors[i] * (1 + i % 3), source=f"s{i}", part=i % 5) for i in range(N)]
    gstore.upsert("docs", chunks)
    assert gstore.build_index("docs", GraphIndex(m=16, ef_construction=80, ef_search=64)) == GraphIndex(
        m=16, ef_construction=80, ef_search=64
    )
    return gstore, chunks, vectors


def cosine_top(chunks: list[Any], vectors: Any, query: Any, k: int, rows: Any = None) -> list[str]:
    """The exact top-k by cosine (the stored vectors are scaled; ``vectors`` are their unit versions)."""
    rows = np.arange(len(chunks)) if rows is None else np.asarray(rows)
    order = rows[np.argsort(-(vectors[rows] @ query), kind="stable")[:k]]
    return [chunks[i].chunk_id for i in order]


def _graphs(store: Store) -> GraphFiles:
    assert store.graphs is not None
    return store.graphs


def _backend_refuses(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the backend was asked; the graph should have answered")

    monkeypatch.setattr(store, "_vector_ranking", refuse)


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
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)  # cosine, whatever the lengths
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
    store.build_index("docs", GraphIndex(m=16, ef_construction=80))
    with monkeypatch.context() as patch:
        _backend_refuses(store, patch)
        assert late.chunk_id in ids(store.search("docs", query_vector=vectors[0], k=2))
    # deleting makes the graph stale: the deleted row is never returned
    store.delete("docs", [late.chunk_id])
    assert late.chunk_id not in ids(store.search("docs", query_vector=vectors[0], k=2))


def test_another_store_on_the_same_files_uses_the_new_build(
    indexed: tuple[Store, list[Any], Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, chunks, vectors = indexed
    other: Store
    if isinstance(store, LanceDBStore):
        other = LanceDBStore(_graphs(store).root.parent)
    else:
        other = PgVectorStore(store._url, schema=store._schema, graph_dir=_graphs(store).root)
    _backend_refuses(other, monkeypatch)
    first = ids(other.search("docs", query_vector=vectors[3], k=1))
    assert first == [chunks[3].chunk_id]
    moved = chunk("row 3 moved", vectors[3], source="moved")
    store.upsert("docs", [moved])
    store.delete("docs", [chunks[3].chunk_id])
    store.build_index("docs", GraphIndex(m=16, ef_construction=80))
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
    fresh: Store
    if isinstance(store, LanceDBStore):
        fresh = LanceDBStore(graphs.root.parent)
    else:
        fresh = PgVectorStore(store._url, schema=store._schema, graph_dir=graphs.root)
    assert ids(fresh.search("docs", query_vector=vectors[5], k=1)) == [chunks[5].chunk_id]

    # a failing build leaves the store searchable and the next build publishes a working graph
    def explode(*args: object, **kwargs: object) -> None:
        raise MemoryError("simulated: the build ran out of memory")

    original = graphs.build
    graphs.build = explode  # type: ignore[method-assign]
    with pytest.raises(MemoryError):
        store.build_index("docs", GraphIndex(m=16, ef_construction=80))
    assert ids(store.search("docs", query_vector=vectors[5], k=1)) == [chunks[5].chunk_id]
    graphs.build = original  # type: ignore[method-assign]
    store.build_index("docs", GraphIndex(m=16, ef_construction=80))
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
