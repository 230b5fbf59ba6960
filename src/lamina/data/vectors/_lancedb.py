"""The embedded vector store: LanceDB tables in a directory, two per dataset.

- ``<dataset>``: one row per chunk with its vector (fixed-size float32 list, cosine distance), its filter
  tags (see ``_types``), its BM25 length, and ``doc``, a random 62-bit key drawn afresh each time the row
  is written.
- ``_postings_<dataset>``: the inverted index for BM25 (``_text``): rows of (term, docs, tfs), a term's
  postings as two parallel lists. Each upsert appends one row per term it holds; ``build_index``
  merges them into one row per term. A query reads only its terms' rows (a BTREE lookup), never the
  chunks' texts, and they are few and contiguous, which matters: one row per posting made LanceDB fetch
  tens of thousands of scattered rows per query. We do not use Lance's own full-text index: its
  analyser cannot be made Lucene's English one, and its statistics cannot be restricted to a version.

Atomicity: an upsert first appends the postings under fresh ``doc`` keys, then writes the chunks with one
``merge_insert`` (one Lance commit). A posting counts only while its ``doc`` is in the chunk table, so the
chunk commit alone decides what readers see: a crash before it leaves unreachable postings, and replaced
or deleted chunks leave theirs; ``build_index`` sweeps them all when it merges the postings. It must not
run while another process writes to the same dataset (the ingestion pipeline runs it under its lock).

Version scope: ``chunk_ids`` becomes ``doc IN (...)`` or, when shorter, ``doc NOT IN`` the table's other
keys (usually few: a pinned version holds most of its table). Filters are prefilters: an IVF index searches
more partitions until ``k`` rows pass, and if an index still returns fewer than ``k`` the query reruns as
an exact scan. Index parameters are kept in the vector column's field metadata, so every store opened on
the directory queries with the settings the index was built for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]

from lamina.data.vectors._base import GraphRows, VectorStoreBase
from lamina.data.vectors._lancetables import (
    FIELDS,
    POSTINGS,
    Snapshot,
    chunk_from_row,
    chunk_schema,
    flatten,
    inverted,
    sql_and,
    sql_in,
    tag_filter,
    upsert_tables,
)
from lamina.data.vectors._rows import Ranking, Scored, check_dim, prepare_chunks, top_with_ties
from lamina.data.vectors._text import bm25_scores
from lamina.data.vectors._types import (
    MIN_INDEX_ROWS,
    Chunk,
    ExactIndex,
    GraphIndex,
    IndexParams,
    IvfHnswSqIndex,
    IvfPqIndex,
    check_dataset_name,
    index_params_from_json,
    index_params_to_json,
)
from lamina.data.vectors.graph import ROW_SCHEMA, GraphFiles
from lamina.errors import NotFoundError, UnsupportedCapabilityError

if TYPE_CHECKING:
    from lancedb.index import HnswSq, IvfPq

_INDEX_KEY = "lamina.index"
#: The table token while a write is in flight: matches no graph.
_WRITING = "writing"
_VECTOR_INDEX = "vector_idx"


class LanceDBStore(VectorStoreBase):
    """The embedded default: LanceDB tables under ``path``.

    Several stores, in one process or several, may share a directory: every read sees the latest commit.
    Table handles are kept open, so a dataset dropped by another process must not be reused by this one
    until it is reopened.
    """

    backend = "LanceDB"
    index_kinds = (GraphIndex, IvfPqIndex, IvfHnswSqIndex, ExactIndex)

    def __init__(self, path: Path) -> None:
        self._graphs = GraphFiles(path / "_graphs")
        super().__init__(self._graphs)
        path.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._connection: Any = None
        self._open: dict[str, Any] = {}
        self._snapshots: dict[str, Snapshot] = {}
        self._metas: dict[str, tuple[int, int, IndexParams]] = {}

    @property
    def _db(self) -> Any:
        """The LanceDB connection, made on first use: importing LanceDB takes 1-2 s (its REST namespace
        client), which a process that never reads or writes a dataset (a CLI command, a stack that serves
        no dataset yet) does not pay. Two threads racing here make two equal connections; one is kept."""
        if self._connection is None:
            import lancedb

            # read_consistency_interval=0: every read sees the latest commit, also one made by another
            # process
            self._connection = lancedb.connect(self._path, read_consistency_interval=timedelta(0))
        return self._connection

    def close(self) -> None:
        self._open.clear()
        self._snapshots.clear()
        self._metas.clear()

    def _table(self, name: str) -> Any | None:
        table = self._open.get(name)
        if table is None:
            try:
                table = self._db.open_table(name)
            except ValueError:  # LanceDB's "Table ... was not found"
                return None
            self._open[name] = table
        return table

    def _pair(self, dataset: str) -> tuple[Any, Any] | None:
        chunks = self._table(check_dataset_name(dataset))
        return None if chunks is None else (chunks, self._table(f"_postings_{dataset}"))

    def _require(self, dataset: str) -> tuple[Any, Any]:
        pair = self._pair(dataset)
        if pair is None:
            raise NotFoundError(f"dataset {dataset!r} has no vectors yet; ingest into it first")
        return pair

    def upsert(self, dataset: str, chunks: Sequence[Chunk]) -> None:
        prepared = prepare_chunks(check_dataset_name(dataset), chunks, self.analyzer)
        if not prepared:
            return
        dim = prepared[0].vector.shape[0]
        if self._pair(dataset) is None:
            # the postings table first: a chunk table never exists without one
            self._db.create_table(f"_postings_{dataset}", schema=POSTINGS, exist_ok=True)
            self._db.create_table(dataset, schema=chunk_schema(dim), exist_ok=True)
        table, postings = self._require(dataset)
        check_dim(dataset, table.schema.field("vector").type.list_size, dim)
        docs = np.random.default_rng().integers(1, 2**62, size=len(prepared), dtype=np.int64)
        rows, posting_rows = upsert_tables(prepared, docs, dim)
        postings.add(posting_rows)
        # a crash between the commit and the token leaves "writing": the graph is not trusted unscoped
        self._graphs.write_token(dataset, _WRITING)
        table.merge_insert("chunk_id").when_matched_update_all().when_not_matched_insert_all().execute(rows)
        self._graphs.write_token(dataset, str(table.version))  # the latest version, other writers' too

    def delete(self, dataset: str, chunk_ids: Collection[str]) -> None:
        pair = self._pair(dataset)
        if pair is None or not chunk_ids:
            return
        self._graphs.write_token(dataset, _WRITING)
        pair[0].delete(sql_in("chunk_id", set(chunk_ids)))  # the postings become unreachable at once
        self._graphs.write_token(dataset, str(pair[0].version))

    def get(self, dataset: str, chunk_ids: Sequence[str], *, with_vectors: bool = False) -> list[Chunk]:
        pair = self._pair(dataset)
        if pair is None or not chunk_ids:
            return []
        wanted = set(chunk_ids)
        columns = [*FIELDS, "vector"] if with_vectors else FIELDS
        found = (
            pair[0].search().where(sql_in("chunk_id", wanted)).select(columns).limit(len(wanted)).to_arrow()
        )
        by_id = {row["chunk_id"]: chunk_from_row(dataset, row) for row in found.to_pylist()}
        return [by_id[i] for i in dict.fromkeys(chunk_ids) if i in by_id]

    def count(self, dataset: str) -> int:
        pair = self._pair(dataset)
        return 0 if pair is None else int(pair[0].count_rows())

    def chunk_ids(self, dataset: str) -> list[str]:
        pair = self._pair(dataset)
        if pair is None:
            return []
        ids: list[str] = (
            pair[0].search().select(["chunk_id"]).limit(None).to_arrow().column("chunk_id").to_pylist()
        )
        return sorted(ids)

    def _drop_tables(self, dataset: str) -> None:
        for name in (dataset, f"_postings_{dataset}"):
            self._open.pop(name, None)
            self._metas.pop(name, None)
            with contextlib.suppress(ValueError):  # LanceDB's "Table ... was not found": nothing to drop
                self._db.drop_table(name)
        self._snapshots.pop(dataset, None)

    def _build_native(self, dataset: str, params: IndexParams) -> IndexParams:
        """Compact both tables, drop unreachable postings, (re)build the scalar indexes and the vector index.

        Below ``MIN_INDEX_ROWS`` chunks, or with ``ExactIndex``, any vector index is dropped: queries scan.
        With a ``GraphIndex`` (built beside the table, in ``_graphs/``) LanceDB's own vector index is
        dropped too, so a query the graph cannot answer scans exactly until the next build.
        """
        table, postings = self._require(dataset)
        term, docs, tfs = flatten(postings.search().limit(None).to_arrow())
        live = np.isin(docs, self._snapshot(dataset, table).docs)
        # one commit: readers see the appended rows or the merged ones, never neither
        merged = inverted(term.filter(pa.array(live)), docs[live], tfs[live].astype(np.int32))
        postings.add(merged, mode="overwrite")
        from lancedb.index import BTree, LabelList

        for target, column, config in (
            (table, "chunk_id", BTree()),
            (table, "doc", BTree()),
            (table, "tags", LabelList()),
            (postings, "term", BTree()),
        ):
            target.create_index(column, config=config, replace=True)
        table.optimize()
        postings.optimize()
        if table.count_rows() < MIN_INDEX_ROWS:
            params = ExactIndex()
        if isinstance(params, ExactIndex | GraphIndex):
            if any(index.name == _VECTOR_INDEX for index in table.list_indices()):
                table.drop_index(_VECTOR_INDEX)
        else:
            assert isinstance(params, IvfPqIndex | IvfHnswSqIndex)  # index_kinds admits nothing else
            dim = table.schema.field("vector").type.list_size
            table.create_index("vector", config=_lance_index(params, dim), name=_VECTOR_INDEX, replace=True)
        table.update_field_metadata(
            {"path": "vector", "metadata": {_INDEX_KEY: index_params_to_json(params)}}
        )
        self._graphs.write_token(dataset, str(table.version))  # the last commit of this build
        return params

    def _graph_source(self, dataset: str) -> tuple[str, GraphRows]:
        table, _ = self._require(dataset)
        columns = list(ROW_SCHEMA.names)
        rows = table.search().select([*columns, "vector"]).limit(None).to_arrow()
        version = str(table.version)  # the version the rows were read at: nothing writes during a build
        vectors = rows.column("vector").combine_chunks().flatten().to_numpy()
        return version, [(rows.select(columns), vectors.reshape(len(rows), -1))]

    def _content_token(self, dataset: str) -> str | None:
        return self._graphs.read_token(dataset)

    def _meta(self, dataset: str, table: Any) -> tuple[int, IndexParams]:
        """The dataset's vector width and index parameters, read once per table version."""
        version = table.version
        cached = self._metas.get(dataset)
        if cached is None or cached[0] != version:
            field = table.schema.field("vector")
            raw = (field.metadata or {}).get(_INDEX_KEY.encode())
            params = ExactIndex() if raw is None else index_params_from_json(raw.decode())
            cached = self._metas[dataset] = (version, field.type.list_size, params)
        return cached[1], cached[2]

    def _snapshot(self, dataset: str, table: Any) -> Snapshot:
        version = table.version
        snapshot = self._snapshots.get(dataset)
        if snapshot is None or snapshot.version != version:
            columns = table.search().select(["doc", "doc_len", "chunk_id"]).limit(None).to_arrow()
            docs = columns.column("doc").to_numpy()
            order = np.argsort(docs)
            snapshot = Snapshot(
                version=version,
                docs=docs[order],
                doc_len=columns.column("doc_len").to_numpy().astype(np.int64)[order],
                chunk_ids=columns.column("chunk_id").combine_chunks().take(pa.array(order)),
            )
            self._snapshots[dataset] = snapshot
        return snapshot

    def _vector_ranking(
        self, ranking: Ranking, vector: npt.NDArray[np.float32], ef_search: int | None, *, exact: bool
    ) -> tuple[list[Scored], bool]:
        dataset, k, tags, scope = ranking.dataset, ranking.k, ranking.tags, ranking.scope
        table, _ = self._require(dataset)
        dim, params = self._meta(dataset, table)
        check_dim(dataset, dim, vector.shape[0])
        scope_where = None
        if scope is not None:
            snapshot = self._snapshot(dataset, table)
            inside = snapshot.inside(scope)
            if not inside.any():
                return [], False
            scope_where = snapshot.where(inside)
        where = sql_and(scope_where, tag_filter(tags))
        query = table.search(vector, vector_column_name="vector").distance_type("cosine").limit(k)
        query = query.select([*FIELDS, "_distance"])
        if where is not None:
            query = query.where(where, prefilter=True)
        if isinstance(params, IvfPqIndex | IvfHnswSqIndex):
            # maximum_nprobes(0): search further partitions while fewer than k rows passed the filters
            query = (
                query.minimum_nprobes(params.nprobes).maximum_nprobes(0).refine_factor(params.refine_factor)
            )
        if isinstance(params, IvfHnswSqIndex):
            query = query.ef(max(ef_search or params.ef, k))
        approximate = isinstance(params, IvfPqIndex | IvfHnswSqIndex) and not exact
        rows = (query if approximate else query.bypass_vector_index()).to_arrow().to_pylist()
        rows.sort(key=lambda row: (row["_distance"], row["chunk_id"]))
        return [
            Scored(chunk_from_row(dataset, row), 1.0 - float(row["_distance"])) for row in rows
        ], approximate

    def _keyword_ranking(self, ranking: Ranking, terms: list[str], qtfs: list[int]) -> list[Scored]:
        dataset, k, tags, scope = ranking.dataset, ranking.k, ranking.tags, ranking.scope
        table, postings = self._require(dataset)
        snapshot = self._snapshot(dataset, table)
        inside = snapshot.inside(scope)
        term, docs, tfs = flatten(postings.search().where(sql_in("term", terms)).limit(None).to_arrow())
        pos, live = snapshot.locate(docs)
        live &= inside[pos]
        term_idx = pc.index_in(term, value_set=pa.array(terms, pa.string())).to_numpy(zero_copy_only=False)
        n_docs = int(inside.sum())
        positions, scores = bm25_scores(
            term_idx=term_idx[live].astype(np.int64),
            doc=pos[live].astype(np.int64),
            tf=tfs[live],
            doc_len=snapshot.doc_len[pos[live]],
            qtfs=qtfs,
            n_docs=n_docs,
            avgdl=float(snapshot.doc_len[inside].sum()) / n_docs if n_docs else 0.0,
        )
        where = tag_filter(tags)
        if where is not None and len(positions):
            passing = table.search().where(where).select(["doc"]).limit(None).to_arrow()
            keep = np.isin(snapshot.docs[positions], passing.column("doc").to_numpy())
            positions, scores = positions[keep], scores[keep]
        top = top_with_ties(scores, k)
        ids = snapshot.chunk_ids.take(pa.array(positions[top])).to_pylist()
        best = dict(
            sorted(zip(ids, scores[top].tolist(), strict=True), key=lambda item: (-item[1], item[0]))[:k]
        )
        return [Scored(chunk, best[chunk.chunk_id]) for chunk in self.get(dataset, list(best))]


def _lance_index(params: IvfPqIndex | IvfHnswSqIndex, dim: int) -> IvfPq | HnswSq:
    from lancedb.index import HnswSq, IvfPq

    if isinstance(params, IvfPqIndex):
        sub_vectors = params.num_sub_vectors or max(1, dim // 8)
        if dim % sub_vectors:
            raise UnsupportedCapabilityError(
                f"num_sub_vectors={sub_vectors} must divide the vector dimension {dim}; pick a divisor"
            )
        return IvfPq(
            distance_type="cosine",
            num_partitions=params.num_partitions,
            num_sub_vectors=sub_vectors,
            num_bits=params.num_bits,
        )
    return HnswSq(
        distance_type="cosine",
        num_partitions=params.num_partitions,
        m=params.m,
        ef_construction=params.ef_construction,
    )
