"""Test data: text, vectors, chunks, and fresh vector stores on both backends."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
from psycopg import sql

from lamina.data import Chunk, ChunkLineage, Hit, LanceDBStore, PgVectorStore, Scalar
from tests.support.clock import T0

#: The two vector-store backends every data test runs on.
VectorBackend = LanceDBStore | PgVectorStore
BACKENDS = ("lancedb", "pgvector")

WORDS = ["river", "mountain", "cloud", "vector", "lamina", "store", "token", "model", "data", "search"]
WORDS += ["graph", "index", "query", "answer"]


def prose(seed: int, n: int = 120, words: Sequence[str] = WORDS) -> str:
    """Distinct text per seed: no two seeds give near-duplicates (each word carries a seeded number)."""
    return " ".join(
        f"{words[(seed * 7 + i * (seed + 3)) % len(words)]}{(seed * 31 + i) % 97}" for i in range(n)
    )


def unit_vectors(n: int, dim: int, seed: int = 0) -> npt.NDArray[np.float32]:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    normalized: npt.NDArray[np.float32] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return normalized


def chunk(
    text: str,
    vector: Sequence[float] | npt.NDArray[Any],
    *,
    dataset: str = "docs",
    source: str = "a.txt",
    version: str = "v1",
    **metadata: Scalar,
) -> Chunk:
    """A chunk whose id is a hash of its source and text, as an ingest makes them."""
    return Chunk(
        chunk_id=hashlib.sha256(f"{source}\0{text}".encode()).hexdigest(),
        dataset=dataset,
        version=version,
        text=text,
        source_uri=f"file:///corpus/{source}",
        byte_start=0,
        byte_end=len(text.encode()),
        content_sha256=hashlib.sha256(text.encode()).hexdigest(),
        metadata=dict(metadata),
        vector=[float(x) for x in vector],
    )


def exact_top(chunks: Sequence[Chunk], query: npt.NDArray[np.float32], k: int) -> list[str]:
    """The exact top-k chunk ids by inner product with ``query`` (stable for ties)."""
    matrix = np.asarray([c.vector for c in chunks], dtype=np.float32)
    order = np.argsort(-(matrix @ query), kind="stable")[:k]
    return [chunks[i].chunk_id for i in order]


def ids(hits: Sequence[Hit]) -> list[str]:
    return [h.chunk.chunk_id for h in hits]


def psycopg_url(sqlalchemy_url: str) -> str:
    return sqlalchemy_url.replace("+psycopg", "")


def open_vector_store(backend: str, tmp_path: Path, pg_url: str | None) -> Iterator[VectorBackend]:
    """A fresh, empty store: LanceDB in a new directory, or pgvector in a new schema (dropped afterwards)."""
    if backend == "lancedb":
        store: VectorBackend = LanceDBStore(tmp_path / f"vectors-{uuid.uuid4().hex[:6]}")
        yield store
        store.close()
        return
    assert pg_url is not None
    schema = f"test_{uuid.uuid4().hex[:12]}"
    store = PgVectorStore(pg_url, schema=schema, graph_dir=tmp_path / f"graphs-{schema}")
    yield store
    store.close()
    with psycopg.connect(psycopg_url(pg_url), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def lineage_row(chunk_id: str, uri: str, source_sha256: str, run_id: str) -> ChunkLineage:
    """The lineage of a chunk of dataset ``docs`` from ``uri``, for catalog tests that commit by hand."""
    return ChunkLineage(
        chunk_id=chunk_id,
        dataset="docs",
        source_uri=uri,
        source_file=uri,
        source_sha256=source_sha256,
        byte_start=0,
        byte_end=5,
        content_sha256="c" * 64,
        pipeline_version="p1",
        embedding_model="m@1",
        embedding_sha256="f" * 64,
        run_id=run_id,
        created_at=T0,
    )
