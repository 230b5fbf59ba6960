"""A pgvector index rebuild never holds up retrieval, and each dataset's index keeps its own name.

The rebuild is made to wait: another connection holds ROW EXCLUSIVE on the chunk table (as an open write
transaction does), which conflicts with CREATE INDEX. Searches through the same store object must still
answer meanwhile: they run on the store's other connection, and nothing the build holds or waits for
conflicts with their ACCESS SHARE lock.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psycopg
import pytest
from psycopg import sql

from lamina.data import MIN_INDEX_ROWS, Chunk, HnswIndex, PgVectorStore
from tests.support import unit_vectors

DIM = 16
ROWS = MIN_INDEX_ROWS + 76
#: how long a search may take while the build waits (they take milliseconds; a blocked one never returns)
PROMPT_S = 10.0


def libpq(url: str) -> str:
    return url.replace("+psycopg", "")


@pytest.fixture
def pg(pg_url: str) -> Iterator[PgVectorStore]:
    """A pgvector store without a graph directory: vector searches run in PostgreSQL on the HNSW index."""
    schema = f"rebuild_{uuid.uuid4().hex[:10]}"
    store = PgVectorStore(pg_url, schema=schema)
    yield store
    store.close()
    with psycopg.connect(libpq(pg_url), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def chunks(dataset: str, vectors: np.ndarray) -> list[Chunk]:
    return [
        Chunk(
            chunk_id=f"{dataset}-{i:05d}",
            dataset=dataset,
            version="v1",
            text=f"passage {i} about {'rivers' if i % 2 else 'mountains'} and word{i}",
            source_uri=f"file:///{i}.txt",
            byte_start=0,
            byte_end=10,
            content_sha256=f"{i:064x}",
            vector=vectors[i].tolist(),
        )
        for i in range(len(vectors))
    ]


def indexes(url: str, schema: str) -> dict[str, str]:
    with psycopg.connect(libpq(url)) as conn:
        rows = conn.execute("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %s", (schema,))
        return {str(name): str(definition) for name, definition in rows}


def wait_until_the_build_waits(url: str, table: sql.Identifier, deadline_s: float = 60.0) -> None:
    """Until some statement waits for a lock on ``table`` (polling pg_locks: there is no event to wait on)."""
    query = sql.SQL("SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = {}::regclass")
    with psycopg.connect(libpq(url), autocommit=True) as conn:
        query_text = query.format(sql.Literal(table.as_string(conn)))
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            waiting = conn.execute(query_text).fetchone()
            if waiting and waiting[0]:
                return
            time.sleep(0.02)
    raise AssertionError("the rebuild never waited for the lock the test holds")


@pytest.mark.timeout(180)
def test_searches_answer_while_an_index_rebuild_waits(pg: PgVectorStore, pg_url: str) -> None:
    vectors = unit_vectors(ROWS, DIM, seed=1)
    pg.upsert("docs", chunks("docs", vectors))
    assert pg.build_index("docs", HnswIndex()) == HnswIndex()
    table = sql.Identifier(pg.schema, "c_docs")
    with psycopg.connect(libpq(pg_url)) as writer, ThreadPoolExecutor(2) as pool:
        writer.execute(sql.SQL("LOCK TABLE {} IN ROW EXCLUSIVE MODE").format(table))  # an open write
        build = pool.submit(pg.build_index, "docs", HnswIndex(m=8, ef_construction=40))
        try:
            wait_until_the_build_waits(pg_url, table)
            started = time.monotonic()
            searching = pool.submit(
                lambda: (
                    pg.search("docs", query_vector=vectors[7], k=5),
                    pg.search("docs", query_text="rivers word7", k=5, mode="keyword"),
                    pg.search("docs", query_text="word7", query_vector=vectors[7], k=5, mode="hybrid"),
                    pg.get("docs", ["docs-00007"]),
                    pg.count("docs"),
                )
            )
            by_vector, by_keyword, hybrid, got, count = searching.result(timeout=PROMPT_S)
            assert time.monotonic() - started < PROMPT_S
            assert not build.done()  # the searches ran while the build was still waiting
        finally:
            writer.rollback()  # releases the lock: the build goes on
        assert build.result(timeout=120) == HnswIndex(m=8, ef_construction=40)
    assert by_vector[0].chunk.chunk_id == "docs-00007"
    assert by_keyword[0].chunk.chunk_id == "docs-00007" and hybrid[0].chunk.chunk_id == "docs-00007"
    assert [c.chunk_id for c in got] == ["docs-00007"] and count == ROWS
    built = indexes(pg_url, pg.schema)
    assert "m='8'" in built["h_docs"] and "ef_construction='40'" in built["h_docs"]
    assert "USING hnsw" in built["h_docs"] and "n_docs" not in built  # the staged name is gone
    assert pg.search("docs", query_vector=vectors[11], k=1)[0].chunk.chunk_id == "docs-00011"


@pytest.mark.timeout(180)
def test_a_rebuild_leaves_the_index_of_a_dataset_with_a_longer_name_alone(
    pg: PgVectorStore, pg_url: str
) -> None:
    # "h_<name>_next" would be both the staged index of "a" and the index of "a_next"
    for dataset, seed in (("a_next", 2), ("a", 3)):
        pg.upsert(dataset, chunks(dataset, unit_vectors(ROWS, DIM, seed)))
        pg.build_index(dataset, HnswIndex())
    pg.build_index("a", HnswIndex(m=8))
    built = indexes(pg_url, pg.schema)
    assert "USING hnsw" in built["h_a_next"] and "m='8'" in built["h_a"]
