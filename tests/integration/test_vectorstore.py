"""One suite, two real backends: LanceDB (embedded) and PostgreSQL + pgvector (a throwaway server).

Every test taking ``vstore`` runs against both; a few compare the backends with each other, or with a
brute-force reference computed here (exact cosine top-k, BM25 from its textbook formula).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
import pytest

from lamina.data import (
    HYBRID_DEPTH,
    MIN_INDEX_ROWS,
    Chunk,
    EnglishAnalyzer,
    ExactIndex,
    GraphIndex,
    HnswIndex,
    IndexParams,
    IvfHnswSqIndex,
    IvfPqIndex,
    LanceDBStore,
    PgVectorStore,
    VectorStore,
    reciprocal_rank_fusion,
)
from lamina.errors import InvalidRequestError, NotFoundError, UnsupportedCapabilityError
from lamina.models import EngineEmbedder
from tests.support import VectorBackend, chunk, exact_top, ids, open_vector_store, unit_vectors

Store = VectorBackend
Vectors = npt.NDArray[np.float32]


@pytest.fixture
def both(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Store, Store]]:
    lance = open_vector_store("lancedb", tmp_path, None)
    pg = open_vector_store("pgvector", tmp_path, request.getfixturevalue("pg_url"))
    yield next(lance), next(pg)
    for gen in (lance, pg):
        next(gen, None)


def numbered(n: int, dim: int = 16, seed: int = 0, **metadata: Any) -> list[Chunk]:
    vectors = unit_vectors(n, dim, seed)
    return [chunk(f"document number {i}", vectors[i], source=f"{i}.txt", **metadata) for i in range(n)]


# --- basics -------------------------------------------------------------------------------------------


def test_both_backends_implement_the_interface(vstore: Store) -> None:
    assert isinstance(vstore, VectorStore)


def test_upsert_get_count_delete(vstore: Store) -> None:
    chunks = numbered(5, lang="en", page=3)
    assert vstore.count("docs") == 0
    assert vstore.get("docs", [chunks[0].chunk_id]) == []
    vstore.upsert("docs", chunks)
    assert vstore.count("docs") == 5
    wanted = [chunks[3].chunk_id, "no-such-chunk", chunks[1].chunk_id]
    got = vstore.get("docs", wanted)
    assert [c.chunk_id for c in got] == [chunks[3].chunk_id, chunks[1].chunk_id]
    assert got[0].vector is None
    assert got[0].metadata == {"lang": "en", "page": 3}
    assert (got[0].text, got[0].source_uri, got[0].byte_end) == (
        "document number 3",
        "file:///corpus/3.txt",
        17,
    )
    assert got[0].dataset == "docs" and got[0].version == "v1"
    assert got[0].content_sha256 == chunks[3].content_sha256
    with_vectors = vstore.get("docs", [chunks[2].chunk_id], with_vectors=True)[0]
    assert with_vectors.vector == pytest.approx(chunks[2].vector, abs=1e-6)
    vstore.delete("docs", [chunks[0].chunk_id, chunks[4].chunk_id, "unknown"])
    assert vstore.count("docs") == 3
    assert vstore.get("docs", [chunks[0].chunk_id]) == []
    hits = vstore.search("docs", query_vector=chunks[0].vector, k=10)
    assert chunks[0].chunk_id not in ids(hits) and len(hits) == 3


def test_upsert_is_idempotent_and_replaces_by_chunk_id(vstore: Store) -> None:
    chunks = numbered(4)
    vstore.upsert("docs", chunks)
    vstore.upsert("docs", chunks)
    vstore.upsert("docs", [chunks[1], chunks[1]])
    assert vstore.count("docs") == 4
    replaced = dataclasses.replace(chunks[2], text="zebras everywhere", metadata={"edited": True})
    vstore.upsert("docs", [replaced])
    assert vstore.count("docs") == 4
    assert vstore.get("docs", [chunks[2].chunk_id])[0].metadata == {"edited": True}
    assert ids(vstore.search("docs", query_text="zebra", k=5, mode="keyword")) == [chunks[2].chunk_id]
    # the replaced text is gone from the keyword index, and the corpus statistics still count 4 chunks
    assert len(vstore.search("docs", query_text="document number", k=10, mode="keyword")) == 3


def test_a_failing_upsert_writes_nothing(vstore: Store) -> None:
    good = numbered(3)
    vstore.upsert("docs", good[:1])
    bad = dataclasses.replace(good[2], vector=[math.nan] * 16)
    with pytest.raises(InvalidRequestError, match="NaN"):
        vstore.upsert("docs", [good[1], bad])
    assert vstore.count("docs") == 1


def interrupt_the_commit(vstore: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in the middle of an upsert: after the postings are written, before the chunks commit."""

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    if isinstance(vstore, PgVectorStore):
        from lamina.data.vectors import _pgvector

        monkeypatch.setattr(_pgvector, "copy_postings", interrupted)  # inside the transaction
    else:
        from lancedb.table import LanceTable

        monkeypatch.setattr(LanceTable, "merge_insert", interrupted)  # the chunk commit


def test_an_interrupted_upsert_leaves_the_previous_state(
    vstore: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = keyword_chunks()
    vstore.upsert("docs", chunks[:4])
    interrupt_the_commit(vstore, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        vstore.upsert("docs", [*chunks[4:], chunk("zanzibar zanzibar", [1.0] * 16, source="z")])
    monkeypatch.undo()
    assert vstore.count("docs") == 4
    assert vstore.search("docs", query_text="zanzibar", k=5, mode="keyword") == []
    # half-written postings do not count in BM25's statistics either
    expected = reference_bm25(CORPUS[:4], "cat dogs")
    for hit in vstore.search("docs", query_text="cat dogs", k=10, mode="keyword"):
        assert hit.score == pytest.approx(expected[hit.chunk.metadata["n"]], rel=1e-9)  # type: ignore[index]
    vstore.build_index("docs", ExactIndex())  # also sweeps what the interrupted upsert left behind
    vstore.upsert("docs", chunks[4:])  # the next write completes cleanly
    assert vstore.count("docs") == len(CORPUS)
    expected = reference_bm25(CORPUS, "cat dogs")
    for hit in vstore.search("docs", query_text="cat dogs", k=10, mode="keyword"):
        assert hit.score == pytest.approx(expected[hit.chunk.metadata["n"]], rel=1e-9)  # type: ignore[index]


def test_errors_say_what_to_do(vstore: Store) -> None:
    with pytest.raises(NotFoundError, match="ingest"):
        vstore.search("nothing-here", query_vector=[1.0] * 16, k=3)
    with pytest.raises(InvalidRequestError, match="dataset name"):
        vstore.count("bad name!")
    vstore.upsert("docs", numbered(2))
    with pytest.raises(InvalidRequestError, match="16-d"):
        vstore.upsert("docs", numbered(1, dim=8, seed=5))
    with pytest.raises(InvalidRequestError, match="16-d"):
        vstore.search("docs", query_vector=[1.0] * 8, k=3)
    with pytest.raises(InvalidRequestError, match="query_vector"):
        vstore.search("docs", query_text="hello", k=3, mode="hybrid")
    with pytest.raises(InvalidRequestError, match="reserved"):
        vstore.upsert("docs", [chunk("x", [1.0] * 16, source_uri="file:///elsewhere")])
    with pytest.raises(InvalidRequestError, match="other"):
        vstore.upsert("docs", [chunk("x", [1.0] * 16, dataset="other")])


def test_drop(vstore: Store) -> None:
    vstore.upsert("docs", numbered(3))
    vstore.upsert("keep", [chunk("kept", [1.0] * 16, dataset="keep")])
    vstore.drop("docs")
    vstore.drop("docs")  # dropping what is gone is fine
    assert vstore.count("docs") == 0
    with pytest.raises(NotFoundError):
        vstore.search("docs", query_vector=[1.0] * 16, k=1)
    assert vstore.count("keep") == 1
    vstore.upsert("docs", numbered(2, dim=8))  # a dropped dataset can come back with another width
    assert vstore.count("docs") == 2


# --- vector search ------------------------------------------------------------------------------------


def test_vector_top_k_is_exact_without_an_index(vstore: Store) -> None:
    chunks = numbered(300, dim=16)
    vstore.upsert("docs", chunks[:150])
    vstore.upsert("docs", chunks[150:])
    for query in unit_vectors(5, 16, seed=99):
        hits = vstore.search("docs", query_vector=query, k=10)
        assert ids(hits) == exact_top(chunks, query, 10)
        assert [h.rank for h in hits] == list(range(1, 11))
        assert [h.vector_rank for h in hits] == list(range(1, 11))
        assert all(h.keyword_rank is None and h.chunk.vector is None for h in hits)
        best = np.asarray(chunks[[c.chunk_id for c in chunks].index(hits[0].chunk.chunk_id)].vector)
        assert hits[0].score == pytest.approx(float(best @ query), abs=1e-5)
        assert all(a.score >= b.score for a, b in itertools.pairwise(hits))


def test_k_larger_than_the_dataset_and_k_zero(vstore: Store) -> None:
    vstore.upsert("docs", numbered(3))
    assert len(vstore.search("docs", query_vector=[1.0] * 16, k=50)) == 3
    assert vstore.search("docs", query_vector=[1.0] * 16, k=0) == []


# --- keyword search -----------------------------------------------------------------------------------

CORPUS = [
    "The cat sat on the mat while the dog watched the cat.",
    "Dogs are loyal animals and a dog runs fast in the park.",
    "A quantum computer uses qubits; the qubit is fragile.",
    "She runs every morning; running keeps the runner healthy.",
    "The mat was red and the cat was black.",
    "Economic policy and monetary policy shape inflation.",
    "Cats and dogs can live together peacefully.",
    "Photosynthesis converts light into chemical energy in plants.",
]


def keyword_chunks(dim: int = 16) -> list[Chunk]:
    vectors = unit_vectors(len(CORPUS), dim, seed=3)
    return [chunk(text, vectors[i], source=f"k{i}.txt", n=i) for i, text in enumerate(CORPUS)]


def reference_bm25(texts: Sequence[str], query: str, k1: float = 0.9, b: float = 0.4) -> list[float]:
    """BM25 from its textbook formula (Lucene idf), over the analyser's terms."""
    analyzer = EnglishAnalyzer()
    docs = [Counter(analyzer.tokens(t)) for t in texts]
    avgdl = sum(sum(d.values()) for d in docs) / len(docs)
    scores = []
    for doc in docs:
        length = sum(doc.values())
        score = 0.0
        for term, qtf in Counter(analyzer.tokens(query)).items():
            df = sum(1 for d in docs if term in d)
            idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
            tf = doc[term]
            score += qtf * idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * length / avgdl))
        scores.append(score)
    return scores


def test_the_analyser_is_lucenes_english_one() -> None:
    analyzer = EnglishAnalyzer()
    assert analyzer.tokens("The Runner's dogs are RUNNING, e.g. 3.5 times; it's 1,000 p53 T-cells.") == [
        "runner",
        "dog",
        "run",
        "e.g",
        "3.5",
        "time",
        "1,000",
        "p53",
        "t",
        "cell",
    ]
    assert analyzer.tokens("the and of to") == []


@pytest.mark.parametrize(
    "query", ["cat", "dog runs", "running runner", "qubits quantum", "the policy of policies", "mat cat dog"]
)
def test_keyword_scores_are_bm25(vstore: Store, query: str) -> None:
    chunks = keyword_chunks()
    vstore.upsert("docs", chunks)
    expected = reference_bm25(CORPUS, query)
    hits = vstore.search("docs", query_text=query, k=len(CORPUS), mode="keyword")
    assert hits, query
    for hit in hits:
        assert hit.score == pytest.approx(expected[hit.chunk.metadata["n"]], rel=1e-9)  # type: ignore[index]
    assert len(hits) == sum(1 for s in expected if s > 0)
    assert [h.keyword_rank for h in hits] == list(range(1, len(hits) + 1))


def test_keyword_ranks_the_rare_term_first_and_matches_stems(vstore: Store) -> None:
    vstore.upsert("docs", keyword_chunks())
    top = vstore.search("docs", query_text="cat photosynthesis", k=3, mode="keyword")
    assert top[0].chunk.text.startswith("Photosynthesis")  # rare term beats the common one
    running = vstore.search("docs", query_text="running", k=5, mode="keyword")
    texts = {h.chunk.text for h in running}
    assert CORPUS[1] in texts and CORPUS[3] in texts  # "runs" is found by "running"
    assert vstore.search("docs", query_text="the and of", k=5, mode="keyword") == []  # only stopwords
    assert vstore.search("docs", query_text="xylophone", k=5, mode="keyword") == []


# --- hybrid -------------------------------------------------------------------------------------------


def test_hybrid_is_rrf_of_the_two_rankings(vstore: Store) -> None:
    chunks = keyword_chunks()
    vstore.upsert("docs", chunks)
    query_vector = np.asarray(chunks[6].vector) + 0.3 * np.asarray(chunks[0].vector)
    query_vector /= np.linalg.norm(query_vector)
    by_vector = vstore.search("docs", query_vector=query_vector, k=HYBRID_DEPTH)
    by_keyword = vstore.search("docs", query_text="dogs", k=HYBRID_DEPTH, mode="keyword")
    hybrid = vstore.search("docs", query_text="dogs", query_vector=query_vector, k=4, mode="hybrid")
    expected = reciprocal_rank_fusion([ids(by_vector), ids(by_keyword)], limit=4)
    assert ids(hybrid) == [f.key for f in expected]
    assert [(h.vector_rank, h.keyword_rank) for h in hybrid] == [f.ranks for f in expected]
    assert [h.score for h in hybrid] == pytest.approx([f.score for f in expected])
    assert hybrid[0].chunk.chunk_id == chunks[6].chunk_id  # first by vector and among the "dog" texts


# --- filters and versions -----------------------------------------------------------------------------


def filtered_chunks() -> list[Chunk]:
    vectors = unit_vectors(200, 16, seed=7)
    return [
        chunk(
            f"report {i} about {'rivers' if i % 2 else 'mountains'}",
            vectors[i],
            source=f"r{i % 4}.txt",
            lang="fr" if i % 10 == 0 else "en",
            year=2020 + i % 3,
            draft=i % 5 == 0,
        )
        for i in range(200)
    ]


def test_filters_are_applied_before_top_k(vstore: Store) -> None:
    chunks = filtered_chunks()
    vstore.upsert("docs", chunks)
    query = unit_vectors(1, 16, seed=11)[0]
    french = [c for c in chunks if c.metadata["lang"] == "fr"]
    hits = vstore.search("docs", query_vector=query, k=10, filters={"lang": "fr"})
    assert ids(hits) == exact_top(french, query, 10)  # 20 match: k of them come back, the exact best
    both_match = [c for c in chunks if c.metadata["lang"] == "en" and c.metadata["year"] == 2021]
    hits = vstore.search("docs", query_vector=query, k=5, filters={"lang": "en", "year": 2021})
    assert ids(hits) == exact_top(both_match, query, 5)
    kw = vstore.search("docs", query_text="rivers", k=50, mode="keyword", filters={"lang": "fr"})
    assert kw == []  # every French report is an even number, about mountains
    kw = vstore.search("docs", query_text="mountains", k=50, mode="keyword", filters={"lang": "fr"})
    assert len(kw) == 20 and all(h.chunk.metadata["lang"] == "fr" for h in kw)


@pytest.mark.parametrize(
    ("filters", "count"),
    [
        ({"year": 2021}, 67),
        ({"year": 2021.0}, 67),  # numbers compare by value
        ({"year": "2021"}, 0),  # a string is not a number
        ({"draft": True}, 40),
        ({"draft": 1}, 0),  # a boolean is not a number
        ({"draft": True, "lang": "fr"}, 20),
        ({"draft": False, "lang": "fr"}, 0),  # every French report is a draft
        ({"source_uri": "file:///corpus/r1.txt"}, 50),
        ({"source_uri": "file:///corpus/r1.txt", "year": 2020}, 16),
        ({"colour": "red"}, 0),  # an unknown key matches nothing
        ({"lang": 'it\'s "quoted" \\ text'}, 0),
        ({}, 200),
    ],
)
def test_filter_semantics(vstore: Store, filters: dict[str, object], count: int) -> None:
    chunks = filtered_chunks()
    vstore.upsert("docs", chunks)
    hits = vstore.search("docs", query_vector=chunks[0].vector, k=500, filters=filters)  # type: ignore[arg-type]
    assert len(hits) == count


def test_chunk_ids_pin_a_version(vstore: Store) -> None:
    chunks = keyword_chunks()
    vstore.upsert("docs", chunks)
    version = {c.chunk_id for c in chunks[:4]}
    query = np.asarray(chunks[6].vector)
    hits = vstore.search("docs", query_vector=query, k=3, chunk_ids=version)
    assert ids(hits) == exact_top(chunks[:4], query, 3)
    kw = vstore.search("docs", query_text="dog cat", k=10, mode="keyword", chunk_ids=version)
    assert {h.chunk.chunk_id for h in kw} <= version
    # BM25 statistics are those of the pinned version, as if it were the only data
    expected = reference_bm25(CORPUS[:4], "dog cat")
    for hit in kw:
        assert hit.score == pytest.approx(expected[hit.chunk.metadata["n"]], rel=1e-9)  # type: ignore[index]
    most = {c.chunk_id for c in chunks[1:]}  # larger than its complement: the other branch of the scope
    assert chunks[0].chunk_id not in ids(
        vstore.search("docs", query_vector=chunks[0].vector, k=8, chunk_ids=most)
    )
    assert vstore.search("docs", query_vector=query, k=3, chunk_ids=set()) == []
    assert vstore.search("docs", query_vector=query, k=3, chunk_ids={"unknown"}) == []
    hybrid = vstore.search(
        "docs", query_text="cat", query_vector=query, k=10, mode="hybrid", chunk_ids=version, filters={"n": 0}
    )
    assert ids(hybrid) == [chunks[0].chunk_id]


# --- indexes ------------------------------------------------------------------------------------------

INDEXES: dict[str, list[IndexParams]] = {
    "lancedb": [
        IvfPqIndex(num_partitions=8, num_sub_vectors=8, nprobes=4, refine_factor=10),
        IvfHnswSqIndex(),
        GraphIndex(m=16, ef_construction=100, ef_search=64),
    ],
    "pgvector": [HnswIndex(m=16, ef_construction=64, ef_search=100), GraphIndex()],
}


def test_index_build_keeps_recall(vstore: Store, backend: str) -> None:
    n, dim, k = 2000, 32, 10
    vectors = unit_vectors(n, dim, seed=21)
    chunks = [chunk(f"vector {i}", vectors[i], source=f"v{i}", part=i % 4) for i in range(n)]
    vstore.upsert("docs", chunks)
    queries = unit_vectors(20, dim, seed=22)
    for params in INDEXES[backend]:
        assert vstore.build_index("docs", params) == params
        found = [set(ids(vstore.search("docs", query_vector=q, k=k))) for q in queries]
        recall = np.mean(
            [len(f & set(exact_top(chunks, q, k))) / k for f, q in zip(found, queries, strict=True)]
        )
        assert recall >= 0.9, (params, recall)
        # a filtered query on the index still returns k hits, and a narrow scope its exact best
        assert len(vstore.search("docs", query_vector=queries[0], k=k, filters={"part": 3})) == k
        few = chunks[:7]
        scoped = vstore.search("docs", query_vector=queries[0], k=5, chunk_ids={c.chunk_id for c in few})
        assert ids(scoped) == exact_top(few, queries[0], 5)
        vstore.upsert("docs", [chunk("added after the index", vectors[0], source="late")])  # unindexed rows
        assert "added after the index" in {
            h.chunk.text for h in vstore.search("docs", query_vector=vectors[0], k=2)
        }
        vstore.delete("docs", [chunk("added after the index", vectors[0], source="late").chunk_id])
    assert vstore.build_index("docs", ExactIndex()) == ExactIndex()
    assert ids(vstore.search("docs", query_vector=queries[1], k=k)) == exact_top(chunks, queries[1], k)


def test_small_tables_stay_exact_and_foreign_index_types_are_refused(vstore: Store, backend: str) -> None:
    chunks = numbered(50)
    vstore.upsert("docs", chunks)
    assert vstore.build_index("docs", INDEXES[backend][0]) == ExactIndex()
    assert ids(vstore.search("docs", query_vector=chunks[3].vector, k=1)) == [chunks[3].chunk_id]
    foreign = HnswIndex() if backend == "lancedb" else IvfPqIndex()
    with pytest.raises(UnsupportedCapabilityError):
        vstore.build_index("docs", foreign)


def test_the_index_policy_is_the_stores_own_and_reindex_applies_it(vstore: Store, backend: str) -> None:
    """Exact below MIN_INDEX_ROWS; above, the graph (pgvector's own HNSW where it has no graph directory)."""
    assert vstore.default_index(MIN_INDEX_ROWS - 1) == ExactIndex()
    assert vstore.default_index(MIN_INDEX_ROWS) == GraphIndex()
    vstore.upsert("docs", numbered(40))
    assert vstore.reindex("docs") == ExactIndex()
    if isinstance(vstore, PgVectorStore):
        with PgVectorStore(vstore.url, schema=vstore.schema) as no_graphs:
            assert no_graphs.default_index(MIN_INDEX_ROWS) == HnswIndex()
            with pytest.raises(UnsupportedCapabilityError, match="graph_dir"):
                no_graphs.build_index("docs", GraphIndex())


def test_a_closed_store_can_be_opened_again_on_the_same_data(
    vstore: Store, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    chunks = numbered(12)
    vstore.upsert("docs", chunks)
    assert vstore.count("docs") == 12  # both connections are open now
    if isinstance(vstore, PgVectorStore):
        assert _connections_of(vstore) == 2
    vstore.close()
    vstore.close()  # closing twice is harmless
    if isinstance(vstore, PgVectorStore):
        assert _connections_of(vstore) == 0, "close() left a connection of the store open"
        again: Store = PgVectorStore(vstore.url, schema=vstore.schema)
    else:
        again = LanceDBStore(vstore.graphs.root.parent if vstore.graphs else tmp_path)
    with again:
        assert again.count("docs") == 12
        assert ids(again.search("docs", query_vector=chunks[5].vector, k=1)) == [chunks[5].chunk_id]


def _connections_of(store: PgVectorStore) -> int:
    """Connections the server holds for ``store`` (they carry its schema in their application name)."""
    with psycopg.connect(store.url.replace("+psycopg", "")) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (f"lamina-vectors/{store.schema}",),
        ).fetchone()
    return int(row[0]) if row else 0


# --- the two backends agree ---------------------------------------------------------------------------


def test_both_backends_rank_identically(both: tuple[Store, Store]) -> None:
    lance, pg = both
    chunks = filtered_chunks() + keyword_chunks()
    for store in both:
        store.upsert("docs", chunks)
    queries = unit_vectors(3, 16, seed=5)
    texts = ["rivers cat", "mountains report dogs", "running policy"]
    scope = {c.chunk_id for c in chunks[::3]}
    for query, text in zip(queries, texts, strict=True):
        cases: list[dict[str, Any]] = [
            {"mode": "vector", "query_vector": query},
            {"mode": "keyword", "query_text": text},
            {"mode": "hybrid", "query_vector": query, "query_text": text},
            {"mode": "hybrid", "query_vector": query, "query_text": text, "filters": {"lang": "en"}},
            {"mode": "keyword", "query_text": text, "chunk_ids": scope},
        ]
        for kwargs in cases:
            a = lance.search("docs", k=15, **kwargs)
            b = pg.search("docs", k=15, **kwargs)
            assert ids(a) == ids(b), kwargs
            assert [h.score for h in a] == pytest.approx([h.score for h in b], rel=1e-5), kwargs


# --- with the real embedder ---------------------------------------------------------------------------


SENTENCES = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris.",
    "Photosynthesis lets plants turn sunlight into chemical energy.",
    "The stock market fell sharply after the interest rate decision.",
    "A golden retriever is a friendly and loyal breed of dog.",
    "Python is a popular programming language for data science.",
]


@pytest.mark.slow
def test_semantic_retrieval_with_the_real_embedder(vstore: Store, real_embedder: EngineEmbedder) -> None:
    vectors = real_embedder.embed(SENTENCES)
    vstore.upsert(
        "docs", [chunk(s, v, source=f"s{i}") for i, (s, v) in enumerate(zip(SENTENCES, vectors, strict=True))]
    )
    for question, expected in [
        ("Which famous landmark stands in the French capital?", 0),
        ("How do leaves make food from light?", 1),
        ("Why did share prices drop?", 2),
        ("What kind of pet is good with children?", 3),
        ("Which language should I learn for machine learning?", 4),
    ]:
        query = real_embedder.embed([question])[0]
        assert vstore.search("docs", query_vector=query, k=1)[0].chunk.text == SENTENCES[expected], question
        hybrid = vstore.search("docs", query_vector=query, query_text=question, k=1, mode="hybrid")
        assert hybrid[0].chunk.text == SENTENCES[expected], question
