"""The PostgreSQL vector store: pgvector for vectors, a postings table for BM25, one schema for all.

Each dataset gets its own pair of tables in the store's schema (``lamina_vectors`` by default):

- ``c_<dataset>``: one row per chunk, with ``embedding vector(dim)``, its filter tags (``text[]``, GIN
  index) and its BM25 length. A table per dataset, rather than one table with a dataset column, because
  a pgvector column and its HNSW index have one fixed dimension and one set of build parameters, datasets
  embedded by different models differ in both, and dropping a dataset is then a ``DROP TABLE``.
- ``t_<dataset>``: the postings, one row per (term, chunk) with the term frequency and chunk length,
  keyed ``(term, doc)`` so a query term's postings are one index range scan. BM25 is computed in SQL over
  them (``ts_rank`` is not BM25), with the analyser and formula every backend shares
  (``lamina.data.vectors._text``), so rankings match LanceDB's. Only the best-scored rows are joined back to
  their chunks.
- ``_lamina_datasets``: one row per dataset with its corpus statistics (chunk count, total length: BM25's N
  and average length), kept in step by every write, its index parameters, and ``generation``, a counter
  every write raises (the content token a graph index is checked against). A pinned version's
  statistics are computed over its chunks instead.

A ``GraphIndex`` (``lamina.data.vectors.graph``) needs a local directory (``graph_dir``): the graph and a
copy of the rows are built there from the table, next to a pgvector HNSW index with default parameters, which
answers whatever the graph cannot (another host without the files, writes since the build).

Every upsert and delete is one transaction. Vector queries use the HNSW index when one is built, with
pgvector's iterative scan so that filters are applied during the scan; if a filtered query still comes
back short of ``k``, it reruns as an exact scan.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa  # type: ignore[import-untyped]
from pgvector import Vector
from psycopg import sql

from lamina.data.vectors._base import GraphRows, VectorStoreBase
from lamina.data.vectors._pgschema import (
    CREATE_DATASET,
    DATASETS,
    FIELDS,
    HNSW,
    KEYWORD_SQL,
    Connection,
    Cursor,
    copy_chunks,
    copy_postings,
    psycopg_url,
)
from lamina.data.vectors._rows import Ranking, Scored, check_dim, prepare_chunks
from lamina.data.vectors._text import BM25_B, BM25_K1
from lamina.data.vectors._types import (
    CHUNK_FIELDS,
    MIN_INDEX_ROWS,
    Chunk,
    ExactIndex,
    GraphIndex,
    HnswIndex,
    IndexParams,
    check_dataset_name,
    index_params_from_json,
    index_params_to_json,
)
from lamina.data.vectors.graph import ROW_SCHEMA, GraphFiles
from lamina.errors import NotFoundError


def _chunk(dataset: str, row: dict[str, Any]) -> Chunk:
    vector: Vector | None = row.get("embedding")
    fields = {name: row[name] for name in CHUNK_FIELDS}
    return Chunk(dataset=dataset, **fields, vector=None if vector is None else vector.to_list())


class PgVectorStore(VectorStoreBase):
    """Chunks in PostgreSQL with pgvector, under ``schema`` of the database at ``url``.

    Two connections, opened on first use: one for writes and index builds, one for searches and reads, so
    a long index build never holds up retrieval. Each is used by one thread at a time; ``close()`` (or
    ``with``) releases them. ``graph_dir``: where graph indexes are kept (None: ``GraphIndex`` is refused).
    """

    backend = "pgvector"
    index_kinds = (GraphIndex, HnswIndex, ExactIndex)
    fallback_index = HnswIndex()

    def __init__(self, url: str, *, schema: str = "lamina_vectors", graph_dir: Path | None = None) -> None:
        super().__init__(None if graph_dir is None else GraphFiles(graph_dir))
        #: the database and schema this store keeps its tables in
        self.url, self.schema = url, schema
        migrated = threading.Event()
        self._writer = Connection(psycopg_url(url), schema, migrated)
        self._reader = Connection(psycopg_url(url), schema, migrated)

    def close(self) -> None:
        self._writer.close()
        self._reader.close()

    def _name(self, table: str) -> sql.Identifier:
        return sql.Identifier(self.schema, table)

    def _tables(self, dataset: str) -> tuple[sql.Identifier, sql.Identifier]:
        check_dataset_name(dataset)
        return self._name(f"c_{dataset}"), self._name(f"t_{dataset}")

    def _dim(self, cur: Cursor, dataset: str) -> int | None:
        """The dataset's vector dimension, or None when it has no table."""
        cur.execute(
            "SELECT a.atttypmod AS dim FROM pg_attribute a JOIN pg_class t ON t.oid = a.attrelid "
            "JOIN pg_namespace n ON n.oid = t.relnamespace "
            "WHERE n.nspname = %s AND t.relname = %s AND a.attname = 'embedding'",
            (self.schema, f"c_{dataset}"),
        )
        row = cur.fetchone()
        return None if row is None else int(row["dim"])

    def _require(self, cur: Cursor, dataset: str) -> int:
        dim = self._dim(cur, dataset)
        if dim is None:
            raise NotFoundError(f"dataset {dataset!r} has no vectors yet; ingest into it first")
        return dim

    def _remove(self, cur: Cursor, dataset: str, chunk_ids: list[str]) -> None:
        """Delete chunks and their postings, and take them out of the corpus statistics."""
        chunks, postings = self._tables(dataset)
        cur.execute(
            sql.SQL("DELETE FROM {} WHERE chunk_id = ANY(%s) RETURNING id, doc_len").format(chunks),
            (chunk_ids,),
        )
        gone = cur.fetchall()
        if gone:
            cur.execute(
                sql.SQL("DELETE FROM {} WHERE doc = ANY(%s)").format(postings), ([r["id"] for r in gone],)
            )
            self._add_stats(cur, dataset, -len(gone), -sum(int(r["doc_len"]) for r in gone))

    def _add_stats(self, cur: Cursor, dataset: str, n_docs: int, total_len: int) -> None:
        cur.execute(
            sql.SQL(
                "UPDATE {} SET n_docs = n_docs + %s, total_len = total_len + %s, generation = generation + 1 "
                "WHERE dataset = %s"
            ).format(self._name(DATASETS)),
            (n_docs, total_len, dataset),
        )

    def upsert(self, dataset: str, chunks: Sequence[Chunk]) -> None:
        prepared = prepare_chunks(check_dataset_name(dataset), chunks, self.analyzer)
        if not prepared:
            return
        dim = prepared[0].vector.shape[0]
        chunk_table, postings = self._tables(dataset)
        with self._writer.session() as cur:
            existing = self._dim(cur, dataset)
            if existing is None:
                names = {"tags_index": f"g_{dataset}", "doc_index": f"d_{dataset}"}
                identifiers = {key: sql.Identifier(name) for key, name in names.items()}
                literals = {"dim": sql.Literal(dim), "dataset": sql.Literal(dataset)}
                tables = {"chunks": chunk_table, "postings": postings, "datasets": self._name(DATASETS)}
                cur.execute(sql.SQL(CREATE_DATASET).format(**tables, **identifiers, **literals))
            else:
                check_dim(dataset, existing, dim)
            self._remove(cur, dataset, [p.chunk.chunk_id for p in prepared])
            cur.execute(
                "SELECT nextval(pg_get_serial_sequence(%s, 'id')) AS id FROM generate_series(1, %s)",
                (chunk_table.as_string(cur), len(prepared)),
            )
            ids = [int(row["id"]) for row in cur.fetchall()]
            copy_chunks(cur, chunk_table, ids, prepared)
            copy_postings(cur, postings, ids, prepared)
            self._add_stats(cur, dataset, len(prepared), sum(p.indexed.length for p in prepared))

    def delete(self, dataset: str, chunk_ids: Collection[str]) -> None:
        check_dataset_name(dataset)
        with self._writer.session() as cur:
            if chunk_ids and self._dim(cur, dataset) is not None:
                self._remove(cur, dataset, list(chunk_ids))

    def get(self, dataset: str, chunk_ids: Sequence[str], *, with_vectors: bool = False) -> list[Chunk]:
        chunk_table, _ = self._tables(dataset)
        columns = FIELDS + (", c.embedding" if with_vectors else "")
        with self._reader.session() as cur:
            if not chunk_ids or self._dim(cur, dataset) is None:
                return []
            query = sql.SQL("SELECT " + columns + " FROM {} c WHERE c.chunk_id = ANY(%s)").format(chunk_table)
            found = {row["chunk_id"]: _chunk(dataset, row) for row in cur.execute(query, (list(chunk_ids),))}
        return [found[i] for i in dict.fromkeys(chunk_ids) if i in found]

    def count(self, dataset: str) -> int:
        check_dataset_name(dataset)
        with self._reader.session() as cur:
            return self._count(cur, dataset)

    def chunk_ids(self, dataset: str) -> list[str]:
        chunk_table, _ = self._tables(dataset)
        with self._reader.session() as cur:
            if self._dim(cur, dataset) is None:
                return []
            query = sql.SQL("SELECT chunk_id FROM {} ORDER BY chunk_id").format(chunk_table)
            return [row["chunk_id"] for row in cur.execute(query)]

    def _drop_tables(self, dataset: str) -> None:
        chunk_table, postings = self._tables(dataset)
        with self._writer.session() as cur:
            cur.execute(sql.SQL("DROP TABLE IF EXISTS {}, {}").format(postings, chunk_table))
            cur.execute(sql.SQL("DELETE FROM {} WHERE dataset = %s").format(self._name(DATASETS)), (dataset,))

    def _build_native(self, dataset: str, params: IndexParams) -> IndexParams:
        """Build (or drop) the HNSW index, record its parameters, and refresh the planner's statistics.

        Below ``MIN_INDEX_ROWS`` chunks, or with ``ExactIndex``, any vector index is dropped: queries scan.
        ``GraphIndex`` keeps an HNSW index with default parameters beside the graph. Searches never wait:
        the new index is built under another name (``CREATE INDEX`` blocks writes, not reads), the old
        one dropped ``CONCURRENTLY``, and the new one renamed (neither blocks reads).
        """
        chunk_table, postings = self._tables(dataset)
        # "n_" + name: no dataset's own index can be called that (a "h_<name>_next" could be)
        current, staged = self._name(f"h_{dataset}"), self._name(f"n_{dataset}")
        with self._writer.session(transaction=False) as cur:  # one left by a build that died
            cur.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(staged))
        with self._writer.session() as cur:
            self._require(cur, dataset)
            if self._count(cur, dataset) < MIN_INDEX_ROWS:
                params = ExactIndex()
            native = _native(params)
            if isinstance(native, HnswIndex):
                cur.execute("SET LOCAL maintenance_work_mem = '1GB'")
                settings = (sql.Literal(native.m), sql.Literal(native.ef_construction))
                cur.execute(sql.SQL(HNSW).format(sql.Identifier(f"n_{dataset}"), chunk_table, *settings))
        with self._writer.session(transaction=False) as cur:
            cur.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(current))
            if isinstance(native, HnswIndex):
                cur.execute(
                    sql.SQL("ALTER INDEX {} RENAME TO {}").format(staged, sql.Identifier(f"h_{dataset}"))
                )
            cur.execute(
                sql.SQL("UPDATE {} SET index_params = %s WHERE dataset = %s").format(self._name(DATASETS)),
                (index_params_to_json(params), dataset),
            )
            cur.execute(sql.SQL("VACUUM (ANALYZE) {}, {}").format(chunk_table, postings))
        return params

    def _graph_source(self, dataset: str) -> tuple[str, GraphRows]:
        """Read in one snapshot, then build outside any transaction: writers wait only for the read."""
        chunk_table, _ = self._tables(dataset)
        with self._writer.session() as cur:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            token = self._generation(cur, dataset)
            batches = list(self._graph_rows(cur, chunk_table))
        return token, batches

    def _content_token(self, dataset: str) -> str | None:
        with self._reader.session(transaction=False) as cur:  # one statement: one round trip, not three
            return self._generation(cur, dataset)

    def _generation(self, cur: Cursor, dataset: str) -> str:
        query = sql.SQL("SELECT generation FROM {} WHERE dataset = %s").format(self._name(DATASETS))
        row = cur.execute(query, (dataset,)).fetchone()
        return "" if row is None else str(row["generation"])

    def _graph_rows(self, cur: Cursor, chunk_table: sql.Identifier) -> Iterator[tuple[Any, Any]]:
        """The table's rows and vectors in batches, for a graph build."""
        names = list(ROW_SCHEMA.names)
        columns = ", ".join(f"c.{n}" for n in names if n != "metadata")
        query = sql.SQL(
            "SELECT " + columns + ", c.metadata::text AS metadata, c.embedding FROM {} c ORDER BY c.id"
        ).format(chunk_table)
        cur.execute(query)
        while batch := cur.fetchmany(20_000):
            rows = pa.Table.from_pylist([{n: r[n] for n in names} for r in batch], schema=ROW_SCHEMA)
            vectors = np.stack([r["embedding"].to_numpy() for r in batch]).astype(np.float32)
            yield rows, vectors

    def _count(self, cur: Cursor, dataset: str) -> int:
        row = cur.execute(
            sql.SQL("SELECT n_docs FROM {} WHERE dataset = %s").format(self._name(DATASETS)), (dataset,)
        ).fetchone()
        return 0 if row is None else int(row["n_docs"])

    def _index_params(self, cur: Cursor, dataset: str) -> IndexParams:
        query = sql.SQL("SELECT index_params FROM {} WHERE dataset = %s").format(self._name(DATASETS))
        row = cur.execute(query, (dataset,)).fetchone()
        if row is None or row["index_params"] is None:
            return ExactIndex()
        return index_params_from_json(json.dumps(row["index_params"]))

    def _vector_ranking(
        self, ranking: Ranking, vector: npt.NDArray[np.float32], ef_search: int | None, *, exact: bool
    ) -> tuple[list[Scored], bool]:
        dataset, k, tags, scope = ranking.dataset, ranking.k, ranking.tags, ranking.scope
        chunk_table, _ = self._tables(dataset)
        clauses = [sql.SQL("true")]
        if tags:
            clauses.append(sql.SQL("c.tags @> %(tags)s::text[]"))
        if scope is not None:
            clauses.append(sql.SQL("c.chunk_id = ANY(%(scope)s)"))
        query = sql.SQL(
            "SELECT " + FIELDS + ", c.embedding <=> %(q)s AS distance FROM {} c WHERE {} "
            "ORDER BY c.embedding <=> %(q)s LIMIT %(k)s"
        ).format(chunk_table, sql.SQL(" AND ").join(clauses))
        args = {"q": vector, "k": k, "tags": tags, "scope": list(scope or ())}
        with self._reader.session() as cur:
            check_dim(dataset, self._require(cur, dataset), vector.shape[0])
            params = _native(self._index_params(cur, dataset))
            approximate = isinstance(params, HnswIndex) and not exact
            if isinstance(params, HnswIndex) and approximate:
                ef = max(ef_search or params.ef_search, k)
                cur.execute(sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(ef)))
                cur.execute("SET LOCAL hnsw.iterative_scan = strict_order")
            elif isinstance(params, HnswIndex):
                cur.execute("SET LOCAL enable_indexscan = off")  # a scan of every row
            rows = cur.execute(query, args).fetchall()
        rows.sort(key=lambda row: (row["distance"], row["chunk_id"]))
        return [Scored(_chunk(dataset, row), 1.0 - float(row["distance"])) for row in rows], approximate

    def _keyword_ranking(self, ranking: Ranking, terms: list[str], qtfs: list[int]) -> list[Scored]:
        dataset, k, tags, scope = ranking.dataset, ranking.k, ranking.tags, ranking.scope
        chunk_table, postings = self._tables(dataset)
        in_scope = "chunk_id = ANY(%(scope)s)"
        parts: dict[str, sql.Composable] = {
            "stats": sql.SQL(
                "SELECT n_docs::float8 AS n, total_len::float8 AS total FROM {} WHERE dataset = %(dataset)s"
            ).format(self._name(DATASETS)),
            "scoped_docs": sql.SQL("true"),
            "filtered_docs": sql.SQL("true"),
        }
        if scope is not None:
            parts["stats"] = sql.SQL(
                "SELECT count(*)::float8 AS n, coalesce(sum(doc_len), 0)::float8 AS total FROM {} WHERE "
                + in_scope
            ).format(chunk_table)
            parts["scoped_docs"] = sql.SQL("p.doc IN (SELECT id FROM {} WHERE " + in_scope + ")").format(
                chunk_table
            )
        if tags:
            parts["filtered_docs"] = sql.SQL(
                "h.doc IN (SELECT id FROM {} WHERE tags @> %(tags)s::text[])"
            ).format(chunk_table)
        query = sql.SQL(KEYWORD_SQL).format(
            chunks=chunk_table, postings=postings, fields=sql.SQL(FIELDS), **parts
        )
        args = {"terms": terms, "qtfs": qtfs, "k": k, "k1": BM25_K1, "b": BM25_B, "dataset": dataset}
        args |= {"tags": tags, "scope": list(scope or ())}
        with self._reader.session() as cur:
            self._require(cur, dataset)
            rows = cur.execute(query, args).fetchall()
        return [Scored(_chunk(dataset, row), float(row["score"])) for row in rows]


def _native(params: IndexParams) -> IndexParams:
    """The index pgvector itself holds: a graph index keeps an HNSW index with defaults beside it."""
    return HnswIndex() if isinstance(params, GraphIndex) else params
