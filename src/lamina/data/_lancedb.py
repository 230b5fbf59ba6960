"""The embedded vector store: LanceDB tables in a directory, two per dataset.

- ``<dataset>``: one row per chunk with its vector (fixed-size float32 list, cosine distance), its filter
  tags (see ``lamina.data._vectors``), its BM25 length, and ``doc``, a random 62-bit key drawn afresh each
  time the row is written.
- ``_postings_<dataset>``: the inverted index for BM25 (``lamina.data._text``): rows of (term, docs, tfs),
  a term's postings as two parallel lists. Each upsert appends one row per term it holds; ``build_index``
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
import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import lancedb
import numpy as np
import numpy.typing as npt
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]
from lancedb.index import BTree, HnswSq, IvfPq, LabelList

from lamina.data._graph import ROW_SCHEMA, GraphFiles, GraphView
from lamina.data._text import bm25_scores
from lamina.data._vectors import (
    CHUNK_FIELDS,
    MIN_INDEX_ROWS,
    Chunk,
    ExactIndex,
    GraphIndex,
    IndexParams,
    IvfHnswSqIndex,
    IvfPqIndex,
    PreparedChunk,
    Scored,
    SearchingStore,
    check_dataset_name,
    check_dim,
    index_params_from_json,
    index_params_to_json,
    prepare_chunks,
    top_with_ties,
)
from lamina.errors import NotFoundError, UnsupportedCapabilityError

_INDEX_KEY = "lamina.index"
#: The table token while a write is in flight: matches no graph.
_WRITING = "writing"
_VECTOR_INDEX = "vector_idx"
_FIELDS = list(CHUNK_FIELDS)
_POSTINGS = pa.schema([("term", pa.string()), ("docs", pa.list_(pa.int64())), ("tfs", pa.list_(pa.int32()))])


def _chunk_schema(dim: int) -> pa.Schema:
    text, i64 = pa.string(), pa.int64()
    return pa.schema(
        [
            *((name, text) for name in ("chunk_id", "version", "text", "metadata", "source_uri")),
            ("byte_start", i64),
            ("byte_end", i64),
            ("content_sha256", text),
            ("vector", pa.list_(pa.float32(), dim)),
            ("doc", i64),
            ("doc_len", pa.int32()),
            ("tags", pa.list_(text)),
        ]
    )


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _in(column: str, values: Collection[str] | Collection[int], *, negate: bool = False) -> str:
    """``column [NOT] IN (...)``: a BTREE lookup once ``build_index`` ran."""
    if not values:
        return "true" if negate else "false"
    literals = ",".join(_quote(v) if isinstance(v, str) else str(int(v)) for v in values)
    return f"{column} {'NOT ' if negate else ''}IN ({literals})"


def _tag_filter(tags: list[str]) -> str | None:
    return "array_has_all(tags, [" + ",".join(map(_quote, tags)) + "])" if tags else None


def _and(*clauses: str | None) -> str | None:
    present = [f"({c})" for c in clauses if c]
    return " AND ".join(present) if present else None


def _chunk(dataset: str, row: dict[str, Any]) -> Chunk:
    vector = row.get("vector")
    fields = {name: row[name] for name in CHUNK_FIELDS} | {"metadata": json.loads(row["metadata"])}
    return Chunk(dataset=dataset, **fields, vector=None if vector is None else [float(x) for x in vector])


def _tables(
    prepared: list[PreparedChunk], docs: npt.NDArray[np.int64], dim: int
) -> tuple[pa.Table, pa.Table]:
    """The chunk rows and the postings rows of one upsert."""
    chunks = [p.chunk for p in prepared]
    columns: dict[str, Any] = {
        name: [getattr(c, name) for c in chunks] for name in _FIELDS if name != "metadata"
    }
    columns["metadata"] = [p.metadata_json for p in prepared]
    columns["vector"] = pa.FixedSizeListArray.from_arrays(
        pa.array(np.stack([p.vector for p in prepared]).ravel(), pa.float32()), dim
    )
    columns |= {
        "doc": docs,
        "doc_len": [p.indexed.length for p in prepared],
        "tags": [p.tags for p in prepared],
    }
    counts = [len(p.indexed.terms) for p in prepared]
    postings = _inverted(
        pa.array([t for p in prepared for t in p.indexed.terms], pa.string()),
        np.repeat(docs, counts),
        np.asarray([tf for p in prepared for tf in p.indexed.tfs], dtype=np.int32),
    )
    return pa.table(columns, schema=_chunk_schema(dim)), postings


def _inverted(terms: pa.Array, docs: npt.NDArray[np.int64], tfs: npt.NDArray[np.int32]) -> pa.Table:
    """One row per term with its documents and frequencies, from one entry per posting."""
    flat = pa.table({"term": terms, "doc": docs, "tf": pa.array(tfs, pa.int32())})
    grouped = flat.group_by("term", use_threads=False).aggregate([("doc", "list"), ("tf", "list")])
    columns = [grouped.column("term"), grouped.column("doc_list"), grouped.column("tf_list")]
    return pa.Table.from_arrays(columns, schema=_POSTINGS)


def _flatten(rows: pa.Table) -> tuple[pa.Array, npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """One entry per posting (term, doc, tf) from rows of the postings table."""
    docs = rows.column("docs").combine_chunks()
    term = rows.column("term").combine_chunks().take(pc.list_parent_indices(docs))
    tfs = pc.list_flatten(rows.column("tfs").combine_chunks()).to_numpy().astype(np.int64)
    return term, pc.list_flatten(docs).to_numpy().astype(np.int64), tfs


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """One version of a chunk table's keys and lengths, sorted by ``doc``: what BM25 and scopes need."""

    version: int
    docs: npt.NDArray[np.int64]
    doc_len: npt.NDArray[np.int64]
    chunk_ids: pa.Array

    def locate(self, docs: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.bool_]]:
        """Positions of ``docs`` in the snapshot, and which of them are there at all."""
        pos = np.minimum(np.searchsorted(self.docs, docs), max(len(self.docs) - 1, 0))
        return pos, (self.docs[pos] == docs) if len(self.docs) else np.zeros(len(docs), dtype=bool)

    def inside(self, scope: frozenset[str] | None) -> npt.NDArray[np.bool_]:
        if scope is None:
            return np.ones(len(self.docs), dtype=bool)
        value_set = pa.array(list(scope), pa.string())
        inside: npt.NDArray[np.bool_] = pc.is_in(self.chunk_ids, value_set=value_set).to_numpy(
            zero_copy_only=False
        )
        return inside

    def where(self, inside: npt.NDArray[np.bool_]) -> str | None:
        """The scope as a predicate on ``doc``: the shorter of the members and the others."""
        members, others = self.docs[inside], self.docs[~inside]
        if len(others) == 0:
            return None
        return (
            _in("doc", members.tolist())
            if len(members) <= len(others)
            else _in("doc", others.tolist(), negate=True)
        )


class LanceDBStore(SearchingStore):
    """The embedded default: LanceDB tables under ``path``.

    Several stores, in one process or several, may share a directory: every read sees the latest commit.
    Table handles are kept open, so a dataset dropped by another process must not be reused by this one
    until it is reopened.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        path.mkdir(parents=True, exist_ok=True)
        # read_consistency_interval=0: every read sees the latest commit, also one made by another process.
        self._db = lancedb.connect(path, read_consistency_interval=timedelta(0))
        self._open: dict[str, Any] = {}
        self._snapshots: dict[str, _Snapshot] = {}
        self._metas: dict[str, tuple[int, int, IndexParams]] = {}
        self.graphs = GraphFiles(path / "_graphs")

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
            self._db.create_table(f"_postings_{dataset}", schema=_POSTINGS, exist_ok=True)
            self._db.create_table(dataset, schema=_chunk_schema(dim), exist_ok=True)
        table, postings = self._require(dataset)
        check_dim(dataset, table.schema.field("vector").type.list_size, dim)
        docs = np.random.default_rng().integers(1, 2**62, size=len(prepared), dtype=np.int64)
        rows, posting_rows = _tables(prepared, docs, dim)
        postings.add(posting_rows)
        # a crash between the commit and the token leaves "writing": the graph is not trusted unscoped
        self.graphs.write_token(dataset, _WRITING)
        table.merge_insert("chunk_id").when_matched_update_all().when_not_matched_insert_all().execute(rows)
        self.graphs.write_token(dataset, str(table.version))  # the latest version, other writers' too

    def delete(self, dataset: str, chunk_ids: Collection[str]) -> None:
        pair = self._pair(dataset)
        if pair is None or not chunk_ids:
            return
        self.graphs.write_token(dataset, _WRITING)
        pair[0].delete(_in("chunk_id", set(chunk_ids)))  # the postings become unreachable at once
        self.graphs.write_token(dataset, str(pair[0].version))

    def get(self, dataset: str, chunk_ids: Sequence[str], *, with_vectors: bool = False) -> list[Chunk]:
        pair = self._pair(dataset)
        if pair is None or not chunk_ids:
            return []
        wanted = set(chunk_ids)
        columns = [*_FIELDS, "vector"] if with_vectors else _FIELDS
        found = pair[0].search().where(_in("chunk_id", wanted)).select(columns).limit(len(wanted)).to_arrow()
        by_id = {row["chunk_id"]: _chunk(dataset, row) for row in found.to_pylist()}
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

    def drop(self, dataset: str) -> None:
        for name in (check_dataset_name(dataset), f"_postings_{dataset}"):
            self._open.pop(name, None)
            self._metas.pop(name, None)
            with contextlib.suppress(ValueError):  # LanceDB's "Table ... was not found": nothing to drop
                self._db.drop_table(name)
        self._snapshots.pop(dataset, None)
        self.graphs.drop(dataset)

    def build_index(self, dataset: str, params: IndexParams) -> IndexParams:
        """Compact both tables, drop unreachable postings, (re)build the scalar indexes and the vector index.

        Below ``MIN_INDEX_ROWS`` chunks, or with ``ExactIndex``, any vector index is dropped: queries scan.
        A ``GraphIndex`` lives beside the table (``_graphs/``); LanceDB's own vector index is then dropped,
        so a query the graph cannot answer scans exactly until the next build.
        """
        if not isinstance(params, ExactIndex | IvfPqIndex | IvfHnswSqIndex | GraphIndex):
            raise UnsupportedCapabilityError(
                f"LanceDB has no {params.kind} index; "
                "use GraphIndex, IvfPqIndex, IvfHnswSqIndex or ExactIndex"
            )
        table, postings = self._require(dataset)
        term, docs, tfs = _flatten(postings.search().limit(None).to_arrow())
        live = np.isin(docs, self._snapshot(dataset, table).docs)
        # one commit: readers see the appended rows or the merged ones, never neither
        merged = _inverted(term.filter(pa.array(live)), docs[live], tfs[live].astype(np.int32))
        postings.add(merged, mode="overwrite")
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
            dim = table.schema.field("vector").type.list_size
            table.create_index("vector", config=_lance_index(params, dim), name=_VECTOR_INDEX, replace=True)
        table.update_field_metadata(
            {"path": "vector", "metadata": {_INDEX_KEY: index_params_to_json(params)}}
        )
        token = str(table.version)
        if isinstance(params, GraphIndex):
            columns = list(ROW_SCHEMA.names)
            rows = table.search().select([*columns, "vector"]).limit(None).to_arrow()
            vectors = rows.column("vector").combine_chunks().flatten().to_numpy()
            batches = [(rows.select(columns), vectors.reshape(len(rows), -1))]
            self.graphs.build(dataset, token, params, batches, self.analyzer)
        else:
            self.graphs.drop(dataset)
        self.graphs.write_token(dataset, token)
        return params

    def warm(self, dataset: str) -> bool:
        return self.graphs.current(check_dataset_name(dataset)) is not None

    def _graph_view(self, dataset: str, tags: list[str], scope: frozenset[str] | None) -> GraphView | None:
        return self.graphs.view(dataset, tags, scope, lambda: self.graphs.read_token(dataset))

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

    def _snapshot(self, dataset: str, table: Any) -> _Snapshot:
        version = table.version
        snapshot = self._snapshots.get(dataset)
        if snapshot is None or snapshot.version != version:
            columns = table.search().select(["doc", "doc_len", "chunk_id"]).limit(None).to_arrow()
            docs = columns.column("doc").to_numpy()
            order = np.argsort(docs)
            snapshot = _Snapshot(
                version=version,
                docs=docs[order],
                doc_len=columns.column("doc_len").to_numpy().astype(np.int64)[order],
                chunk_ids=columns.column("chunk_id").combine_chunks().take(pa.array(order)),
            )
            self._snapshots[dataset] = snapshot
        return snapshot

    def _vector_ranking(
        self,
        dataset: str,
        vector: npt.NDArray[np.float32],
        k: int,
        tags: list[str],
        scope: frozenset[str] | None,
        ef_search: int | None,
    ) -> list[Scored]:
        table, _ = self._require(dataset)
        dim, params = self._meta(dataset, table)
        check_dim(dataset, dim, vector.shape[0])
        scope_where = None
        if scope is not None:
            snapshot = self._snapshot(dataset, table)
            inside = snapshot.inside(scope)
            if not inside.any():
                return []
            scope_where = snapshot.where(inside)
        where = _and(scope_where, _tag_filter(tags))
        query = table.search(vector, vector_column_name="vector").distance_type("cosine").limit(k)
        query = query.select([*_FIELDS, "_distance"])
        if where is not None:
            query = query.where(where, prefilter=True)
        if isinstance(params, IvfPqIndex | IvfHnswSqIndex):
            # maximum_nprobes(0): search further partitions while fewer than k rows passed the filters
            query = (
                query.minimum_nprobes(params.nprobes).maximum_nprobes(0).refine_factor(params.refine_factor)
            )
        if isinstance(params, IvfHnswSqIndex):
            query = query.ef(max(ef_search or params.ef, k))
        rows = query.to_arrow().to_pylist()
        if where is not None and len(rows) < k and not isinstance(params, ExactIndex):
            rows = query.bypass_vector_index().to_arrow().to_pylist()
        rows.sort(key=lambda row: (row["_distance"], row["chunk_id"]))
        return [Scored(_chunk(dataset, row), 1.0 - float(row["_distance"])) for row in rows]

    def _keyword_ranking(
        self,
        dataset: str,
        terms: list[str],
        qtfs: list[int],
        k: int,
        tags: list[str],
        scope: frozenset[str] | None,
    ) -> list[Scored]:
        table, postings = self._require(dataset)
        snapshot = self._snapshot(dataset, table)
        inside = snapshot.inside(scope)
        term, docs, tfs = _flatten(postings.search().where(_in("term", terms)).limit(None).to_arrow())
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
        tag_filter = _tag_filter(tags)
        if tag_filter is not None and len(positions):
            passing = table.search().where(tag_filter).select(["doc"]).limit(None).to_arrow()
            keep = np.isin(snapshot.docs[positions], passing.column("doc").to_numpy())
            positions, scores = positions[keep], scores[keep]
        top = top_with_ties(scores, k)
        ids = snapshot.chunk_ids.take(pa.array(positions[top])).to_pylist()
        best = dict(
            sorted(zip(ids, scores[top].tolist(), strict=True), key=lambda item: (-item[1], item[0]))[:k]
        )
        return [Scored(chunk, best[chunk.chunk_id]) for chunk in self.get(dataset, list(best))]


def _lance_index(params: IvfPqIndex | IvfHnswSqIndex, dim: int) -> IvfPq | HnswSq:
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
