"""LanceDB's table layout for the embedded store: schemas, the rows of one upsert, postings, snapshots.

See ``lamina.data.vectors._lancedb`` for how the store uses them.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]

from lamina.data.vectors._rows import PreparedChunk
from lamina.data.vectors._types import CHUNK_FIELDS, Chunk

FIELDS = list(CHUNK_FIELDS)
POSTINGS = pa.schema([("term", pa.string()), ("docs", pa.list_(pa.int64())), ("tfs", pa.list_(pa.int32()))])


def chunk_schema(dim: int) -> pa.Schema:
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


def quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def sql_in(column: str, values: Collection[str] | Collection[int], *, negate: bool = False) -> str:
    """``column [NOT] IN (...)``: a BTREE lookup once ``build_index`` ran."""
    if not values:
        return "true" if negate else "false"
    literals = ",".join(quote(v) if isinstance(v, str) else str(int(v)) for v in values)
    return f"{column} {'NOT ' if negate else ''}IN ({literals})"


def tag_filter(tags: list[str]) -> str | None:
    return "array_has_all(tags, [" + ",".join(map(quote, tags)) + "])" if tags else None


def sql_and(*clauses: str | None) -> str | None:
    present = [f"({c})" for c in clauses if c]
    return " AND ".join(present) if present else None


def chunk_from_row(dataset: str, row: dict[str, Any]) -> Chunk:
    vector = row.get("vector")
    fields = {name: row[name] for name in CHUNK_FIELDS} | {"metadata": json.loads(row["metadata"])}
    return Chunk(dataset=dataset, **fields, vector=None if vector is None else [float(x) for x in vector])


def upsert_tables(
    prepared: list[PreparedChunk], docs: npt.NDArray[np.int64], dim: int
) -> tuple[pa.Table, pa.Table]:
    """The chunk rows and the postings rows of one upsert."""
    chunks = [p.chunk for p in prepared]
    columns: dict[str, Any] = {
        name: [getattr(c, name) for c in chunks] for name in FIELDS if name != "metadata"
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
    postings = inverted(
        pa.array([t for p in prepared for t in p.indexed.terms], pa.string()),
        np.repeat(docs, counts),
        np.asarray([tf for p in prepared for tf in p.indexed.tfs], dtype=np.int32),
    )
    return pa.table(columns, schema=chunk_schema(dim)), postings


def inverted(terms: pa.Array, docs: npt.NDArray[np.int64], tfs: npt.NDArray[np.int32]) -> pa.Table:
    """One row per term with its documents and frequencies, from one entry per posting."""
    flat = pa.table({"term": terms, "doc": docs, "tf": pa.array(tfs, pa.int32())})
    grouped = flat.group_by("term", use_threads=False).aggregate([("doc", "list"), ("tf", "list")])
    columns = [grouped.column("term"), grouped.column("doc_list"), grouped.column("tf_list")]
    return pa.Table.from_arrays(columns, schema=POSTINGS)


def flatten(rows: pa.Table) -> tuple[pa.Array, npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """One entry per posting (term, doc, tf) from rows of the postings table."""
    docs = rows.column("docs").combine_chunks()
    term = rows.column("term").combine_chunks().take(pc.list_parent_indices(docs))
    tfs = pc.list_flatten(rows.column("tfs").combine_chunks()).to_numpy().astype(np.int64)
    return term, pc.list_flatten(docs).to_numpy().astype(np.int64), tfs


@dataclass(frozen=True, slots=True)
class Snapshot:
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
            sql_in("doc", members.tolist())
            if len(members) <= len(others)
            else sql_in("doc", others.tolist(), negate=True)
        )
