"""The graph index: an in-process HNSW graph (FAISS) beside a store's table, the fast path of vector search.

Why it exists: on 100k MiniLM vectors (``bench/ann_recall.py``) a query through LanceDB costs about 9 ms
whatever its index settings, and one through pgvector about 3 ms (a server round trip and the executor),
while FAISS's HNSW answers in about 0.2 ms. Both costs are fixed per query, so no index setting helps. The
graph index keeps the store as the source of truth and adds a read-optimised copy next to it:

- ``graph.faiss``: a FAISS HNSW index on inner product over unit-normalised vectors (so the score is the
  cosine similarity the backends report), labels = row positions. Vectors are kept as float16 by default
  (``IndexHNSWSQ``, ``QT_fp16``): half the memory of float32 and about 25% faster on 100k MiniLM vectors,
  with the same recall@10 there; scores then carry about three significant digits;
- ``rows.arrow``: the rows' chunk fields and filter tags as an Arrow IPC file, read into memory, so a hit
  costs a few slices of k rows (tens of microseconds), never a store query;
- ``keywords.npz`` and ``terms.json``: the rows' BM25 postings (compressed sparse rows: per term, the
  rows holding it and their term frequencies) and row lengths, built with the analyser the store uses,
  so keyword search, and the keyword half of hybrid search, is a few array operations too. Scores and
  ties equal the store's BM25 (statistics over the searched scope, filters after them).

A build extends the published one when its parameters are the same and at most ``MAX_DELETED`` of the
rows would be deleted: the table's new rows are added to a copy of the graph and the postings, and rows
no longer in the table are listed in ``deleted.npy`` (masked out of every search and statistic). So an
ingest that changes a few files of a large dataset costs a few inserts, not a rebuild. Otherwise it
starts afresh. A build writes a fresh directory ``<graphs>/<dataset>/<build id>/`` and then replaces
``<dataset>/current.json``, which names the build and the *token* of the table content it was built from
(LanceDB: the table version; pgvector: a write counter). Readers in any process load a build once and
keep it while ``current.json`` is unchanged (one ``stat`` per query). Old build directories are removed;
a reader that still maps one keeps reading it (POSIX unlink semantics).

When is the graph used? When it was built from the table as it is now (same token); or, whatever writes
came since, when the query is scoped to a dataset version whose chunks are all in the graph. Chunk ids
are content hashes, so such a version's rows in the graph are exactly its rows in the table: an ingest
in progress (its chunks already written, its version not yet committed) does not slow retrieval down.
Otherwise the backend's own search answers, correctly but slower, until the next ``build_index``.

The same rule holds for keyword search, whose statistics then come from the same rows as the store's.

Filters and version scopes become a row mask, cached per (filter, scope) and per build. A mask holding
few rows is searched exactly (a dot product over those rows); a larger one is passed to the HNSW search
as a FAISS bitmap selector, with an exact rerun if the graph walk finds fewer than ``k`` rows inside it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]
import pyarrow.ipc as ipc  # type: ignore[import-untyped]

from lamina.data._text import EnglishAnalyzer, bm25_scores
from lamina.data._vectors import (
    Chunk,
    GraphIndex,
    Scored,
    index_params_from_json,
    index_params_to_json,
    top_with_ties,
)

#: The columns of ``rows.arrow``: every chunk field (``metadata`` as JSON text) and the filter tags.
ROW_SCHEMA = pa.schema(
    [
        *((name, pa.large_string()) for name in ("chunk_id", "version", "text", "metadata", "source_uri")),
        ("byte_start", pa.int64()),
        ("byte_end", pa.int64()),
        ("content_sha256", pa.large_string()),
        ("tags", pa.list_(pa.large_string())),
    ]
)
_log = logging.getLogger(__name__)

#: The columns a hit is built from, in ``_chunk``'s order.
_PAYLOAD = (
    "chunk_id",
    "version",
    "text",
    "metadata",
    "source_uri",
    "byte_start",
    "byte_end",
    "content_sha256",
)
#: A mask with at most this many rows (or this fraction of the graph) is searched exactly.
EXACT_ROWS, EXACT_FRACTION = 4096, 0.02
_MASKS_KEPT = 16


def _faiss() -> Any:
    import faiss  # imported on first use: it takes a moment to load

    return faiss


@dataclass(frozen=True, slots=True)
class _Mask:
    """Rows allowed by a filter and scope: a bool per row, and what searching them needs."""

    allowed: npt.NDArray[np.bool_]
    positions: npt.NDArray[np.intp]
    #: FAISS's selector over ``bits`` (which it reads by pointer, so both are kept together)
    bits: npt.NDArray[np.uint8]
    selector: Any
    #: every chunk of the scope is in the graph (always true without a scope)
    covers_scope: bool
    #: every row passes: the search needs no selector (a pinned version holding the whole graph)
    every: bool
    #: rows in the scope alone (filters aside), their count and total length: BM25's statistics
    in_scope: npt.NDArray[np.bool_]
    scope_rows: int
    scope_length: int


class Graph:
    """One loaded build: the HNSW graph, the rows it labels, and cached masks."""

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        faiss = _faiss()
        self.build_id: str = manifest["build"]
        self.token: str = manifest["token"]
        params = index_params_from_json(json.dumps(manifest["params"]))
        if not isinstance(params, GraphIndex):
            raise RuntimeError(f"{directory} holds a {params.kind} index, not a graph")
        self.params: GraphIndex = params
        # the vectors are memory-mapped: processes on one machine share them through the page cache
        self.index = faiss.read_index(str(directory / "graph.faiss"), getattr(faiss, "IO_FLAG_MMAP_IFC", 0))
        self.index.hnsw.efSearch = self.params.ef_search
        self.dim: int = self.index.d
        self.size: int = self.index.ntotal
        storage = faiss.downcast_index(self.index.storage)
        if isinstance(storage, faiss.IndexScalarQuantizer):  # float16 codes, read in place
            codes = faiss.rev_swig_ptr(storage.codes.data(), self.size * self.dim * 2)
            self.vectors = np.asarray(codes).view(np.float16).reshape(self.size, self.dim)
        else:
            self.vectors = faiss.rev_swig_ptr(storage.get_xb(), self.size * self.dim).reshape(
                self.size, self.dim
            )
        # read into memory, not mapped: a hit then never waits on a page fault
        with pa.OSFile(str(directory / "rows.arrow")) as f:
            reader = ipc.open_file(f.read_buffer())
        rows = pa.Table.from_batches([reader.get_batch(i) for i in range(reader.num_record_batches)])
        rows = rows.combine_chunks().to_batches()[0]
        self.directory = directory
        self.batch: pa.RecordBatch = rows
        self.tags: pa.Array = rows.column("tags")
        self.chunk_ids: pa.Array = rows.column("chunk_id")
        self._columns = [_Column(rows.column(name)) for name in _PAYLOAD]
        keywords = np.load(directory / "keywords.npz")
        self.offsets: npt.NDArray[np.int64] = keywords["offsets"]
        self.posting_rows: npt.NDArray[np.int64] = keywords["rows"]
        self.posting_tfs: npt.NDArray[np.int64] = keywords["tfs"]
        self.doc_len: npt.NDArray[np.int64] = keywords["doc_len"]
        self.terms: list[str] = json.loads((directory / "terms.json").read_text(encoding="utf-8"))
        self._vocabulary: dict[str, int] = {term: i for i, term in enumerate(self.terms)}
        # rows an incremental build left behind (deleted or replaced since): never answered, never counted
        self.live = np.ones(self.size, dtype=bool)
        deleted = directory / "deleted.npy"
        if deleted.exists():
            self.live[np.load(deleted)] = False
        self.all_live = bool(self.live.all())
        self._total_length = int(self.doc_len[self.live].sum())
        self._masks: OrderedDict[tuple[tuple[str, ...], frozenset[str] | None], _Mask] = OrderedDict()
        self._ef_params: dict[int, Any] = {}
        self._lock = threading.Lock()

    def mask(self, tags: list[str], scope: frozenset[str] | None) -> _Mask | None:
        """The live rows passing ``tags`` and inside ``scope``; None when that is every row."""
        if not tags and scope is None and self.all_live:
            return None
        key = (tuple(tags), scope)
        with self._lock:
            found = self._masks.get(key)
            if found is not None:
                self._masks.move_to_end(key)
                return found
        allowed = self.live.copy()
        covers = True
        if scope is not None:
            value_set = pa.array(list(scope), pa.large_string())
            allowed &= pc.is_in(self.chunk_ids, value_set=value_set).to_numpy(zero_copy_only=False)
            covers = int(allowed.sum()) == len(scope)
        in_scope = allowed.copy()
        for tag in tags:
            allowed &= self._rows_with(tag)
        bits = np.packbits(allowed, bitorder="little")
        faiss = _faiss()
        mask = _Mask(
            allowed=allowed,
            positions=np.flatnonzero(allowed),
            bits=bits,
            selector=faiss.IDSelectorBitmap(self.size, faiss.swig_ptr(bits)),
            covers_scope=covers,
            every=bool(allowed.all()),
            in_scope=in_scope,
            scope_rows=int(in_scope.sum()),
            scope_length=int(self.doc_len[in_scope].sum()),
        )
        with self._lock:
            self._masks[key] = mask
            while len(self._masks) > _MASKS_KEPT:
                self._masks.popitem(last=False)
        return mask

    def _rows_with(self, tag: str) -> npt.NDArray[np.bool_]:
        tags = self.tags
        parents = pc.list_parent_indices(tags).to_numpy()
        hit = pc.equal(pc.list_flatten(tags), tag).to_numpy(zero_copy_only=False)
        out = np.zeros(self.size, dtype=bool)
        out[parents[hit]] = True
        return out

    def search(
        self, dataset: str, vector: npt.NDArray[np.float32], k: int, mask: _Mask | None, ef_search: int
    ) -> list[Scored]:
        """The best ``k`` rows by cosine similarity, ties by chunk id; ``mask`` applied before top-k."""
        norm = float(np.sqrt(np.dot(vector, vector)))
        query = (vector / norm if norm > 0 else vector).astype(np.float32, copy=False)
        if mask is not None and (
            len(mask.positions) <= max(EXACT_ROWS, EXACT_FRACTION * self.size) or len(mask.positions) <= k
        ):
            return self._exact(dataset, query, k, mask.positions)
        ef = max(ef_search, k)
        if mask is None:
            params = self._params(ef)
        else:
            params = _faiss().SearchParametersHNSW(efSearch=ef)
            params.sel = mask.selector
        scores, labels = self._knn(np.ascontiguousarray(query), k, params)
        found = k if labels[0, k - 1] >= 0 else int((labels[0] >= 0).sum())  # FAISS pads the end with -1
        if mask is not None and found < k:
            return self._exact(dataset, query, k, mask.positions)
        return self._scored(dataset, labels[0, :found], scores[0, :found], k)

    def keyword(
        self, dataset: str, terms: list[str], qtfs: list[int], k: int, mask: _Mask | None
    ) -> list[Scored]:
        """BM25 over the rows in scope (its statistics), then filters, then the best ``k``, ties by id."""
        found = [(j, self._vocabulary[t]) for j, t in enumerate(terms) if t in self._vocabulary]
        if not found:
            return []
        spans = [(j, int(self.offsets[i]), int(self.offsets[i + 1])) for j, i in found]
        rows = np.concatenate([self.posting_rows[a:b] for _, a, b in spans])
        tfs = np.concatenate([self.posting_tfs[a:b] for _, a, b in spans])
        term_idx = np.concatenate([np.full(b - a, j, dtype=np.int64) for j, a, b in spans])
        n_docs, total = self.size, self._total_length  # mask None: every row is live
        if mask is not None:
            inside = mask.in_scope[rows]
            rows, tfs, term_idx = rows[inside], tfs[inside], term_idx[inside]
            n_docs, total = mask.scope_rows, mask.scope_length
        positions, scores = bm25_scores(
            term_idx=term_idx, doc=rows, tf=tfs, doc_len=self.doc_len[rows], qtfs=qtfs,
            n_docs=n_docs, avgdl=total / n_docs if n_docs else 0.0,
        )  # fmt: skip
        if mask is not None:
            keep = mask.allowed[positions]
            positions, scores = positions[keep], scores[keep]
        top = top_with_ties(scores, k)
        return self._scored(dataset, positions[top], scores[top], k)

    def _knn(
        self, query: npt.NDArray[np.float32], k: int, params: Any
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """FAISS's search of one query, called below its Python wrapper (which costs more than the call)."""
        ptr = _faiss().swig_ptr
        scores, labels = np.empty((1, k), dtype=np.float32), np.empty((1, k), dtype=np.int64)
        self.index.search_c(1, ptr(query), k, ptr(scores), ptr(labels), params)
        return scores, labels

    def _params(self, ef: int) -> Any:
        """FAISS's search parameters for ``ef``, made once (they cost a few microseconds to build)."""
        params = self._ef_params.get(ef)
        if params is None:
            params = self._ef_params[ef] = _faiss().SearchParametersHNSW(efSearch=ef)
        return params

    def _exact(
        self, dataset: str, query: npt.NDArray[np.float32], k: int, positions: npt.NDArray[np.intp]
    ) -> list[Scored]:
        scores = (self.vectors[positions].astype(np.float32) @ query).astype(np.float64)
        top = top_with_ties(scores, k)
        return self._scored(dataset, positions[top], scores[top], k)

    def _scored(
        self, dataset: str, positions: npt.NDArray[Any], scores: npt.NDArray[Any], k: int
    ) -> list[Scored]:
        at = positions.astype(np.intp)
        after = at + 1
        rows = zip(*(column.values(at, after) for column in self._columns), strict=True)
        ranked = sorted(zip(scores.tolist(), rows, strict=True), key=lambda item: (-item[0], item[1][0]))[:k]
        return [Scored(_chunk(dataset, row), float(score)) for score, row in ranked]


class _Column:
    """One payload column, read straight from its Arrow buffers: k values cost k slices, not a ``take``
    (which costs tens of microseconds of kernel dispatch per call, more than the values themselves).

    A string column with few distinct values (a version, a source URI, metadata) keeps them decoded once
    and a code per row, so a hit costs a list lookup there.
    """

    def __init__(self, array: pa.Array) -> None:
        self._strings = pa.types.is_large_string(array.type)
        self._distinct: list[Any] | None = None
        if self._strings:
            if array.null_count:
                raise ValueError("graph rows hold no nulls")
            encoded = pc.dictionary_encode(array)
            if len(encoded.dictionary) <= len(array) // 4:
                self._distinct = encoded.dictionary.to_pylist()
                self._codes = encoded.indices.to_numpy()
                return
            _, offsets, data = array.buffers()
            self.offsets = np.frombuffer(offsets, dtype=np.int64)[
                array.offset : array.offset + len(array) + 1
            ]
            self._data = memoryview(data) if data is not None else memoryview(b"")
        else:
            self._numbers = array.to_numpy()

    def values(self, at: npt.NDArray[np.intp], after: npt.NDArray[np.intp]) -> list[Any]:
        """The values at rows ``at`` (``after``: ``at + 1``, computed once for all columns)."""
        if not self._strings:
            values: list[Any] = self._numbers[at].tolist()
            return values
        if self._distinct is not None:
            distinct = self._distinct
            return [distinct[code] for code in self._codes[at].tolist()]
        data = self._data
        starts, ends = self.offsets[at].tolist(), self.offsets[after].tolist()
        return [str(data[a:b], "utf-8") for a, b in zip(starts, ends, strict=True)]


#: An extending build starts afresh once this fraction of its rows is deleted (they cost search time).
MAX_DELETED = 0.2


def _write_fresh(
    table: pa.Table,
    matrix: npt.NDArray[np.float32],
    params: GraphIndex,
    target: Path,
    analyzer: EnglishAnalyzer,
) -> None:
    faiss = _faiss()
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    if params.vectors == "float16":
        index = faiss.IndexHNSWSQ(
            matrix.shape[1], faiss.ScalarQuantizer.QT_fp16, params.m, faiss.METRIC_INNER_PRODUCT
        )
        index.train(matrix)  # float16 needs no statistics; FAISS asks for the call
    else:
        index = faiss.IndexHNSWFlat(matrix.shape[1], params.m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = params.ef_construction
    index.add(matrix)
    vocabulary: dict[str, int] = {}
    postings = _analyze(table.column("text").to_pylist(), analyzer, vocabulary, first_row=0)
    _save(target, table, index, vocabulary, *postings)


def _extend(
    previous: Graph, table: pa.Table, matrix: npt.NDArray[np.float32], target: Path, analyzer: EnglishAnalyzer
) -> int | None:
    """Write ``previous`` plus the table's new rows, rows gone from the table marked deleted; returns how
    many are deleted, or None (nothing written) when too many would be."""
    live_ids = previous.chunk_ids.filter(pa.array(previous.live))
    added = ~pc.is_in(table.column("chunk_id"), value_set=live_ids).to_numpy(zero_copy_only=False)
    kept = pc.is_in(previous.chunk_ids, value_set=table.column("chunk_id").combine_chunks())
    dead = ~(previous.live & kept.to_numpy(zero_copy_only=False))
    size = previous.size + int(added.sum())
    if int(dead.sum()) > MAX_DELETED * size:
        return None
    faiss = _faiss()
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    index = faiss.read_index(str(previous.directory / "graph.faiss"))  # a copy: the published one stays
    new_rows = table.filter(pa.array(added))
    if len(new_rows):
        index.add(np.ascontiguousarray(matrix[added]))
    vocabulary = {term: i for i, term in enumerate(previous.terms)}
    term_ids, rows, tfs, doc_len = _analyze(
        new_rows.column("text").to_pylist(), analyzer, vocabulary, first_row=previous.size
    )
    old_terms = np.repeat(np.arange(len(previous.terms), dtype=np.int64), np.diff(previous.offsets))
    merged = pa.concat_tables([pa.Table.from_batches([previous.batch]), new_rows]).combine_chunks()
    _save(
        target, merged, index, vocabulary,
        np.concatenate([old_terms, term_ids]),
        np.concatenate([previous.posting_rows, rows]),
        np.concatenate([previous.posting_tfs, tfs]),
        np.concatenate([previous.doc_len, doc_len]),
    )  # fmt: skip
    np.save(target / "deleted.npy", np.flatnonzero(dead))
    return int(dead.sum())


def _analyze(
    texts: list[str], analyzer: EnglishAnalyzer, vocabulary: dict[str, int], first_row: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Postings (term id, row, tf) and lengths of ``texts``, rows numbered from ``first_row``; new terms
    are added to ``vocabulary``."""
    term_ids: list[int] = []
    tfs: list[int] = []
    rows: list[int] = []
    doc_len = np.zeros(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        indexed = analyzer.index(text)
        doc_len[i] = indexed.length
        term_ids.extend(vocabulary.setdefault(term, len(vocabulary)) for term in indexed.terms)
        tfs.extend(indexed.tfs)
        rows.extend([first_row + i] * len(indexed.terms))
    as_array = [np.asarray(values, dtype=np.int64) for values in (term_ids, rows, tfs)]
    return as_array[0], as_array[1], as_array[2], doc_len


def _save(
    target: Path, table: pa.Table, index: Any, vocabulary: dict[str, int],
    term_ids: npt.NDArray[np.int64], rows: npt.NDArray[np.int64], tfs: npt.NDArray[np.int64],
    doc_len: npt.NDArray[np.int64],
) -> None:  # fmt: skip
    """Write a build: the graph, the rows, and the postings as compressed sparse rows by term."""
    order = np.argsort(term_ids, kind="stable")
    offsets = np.zeros(len(vocabulary) + 1, dtype=np.int64)
    np.cumsum(np.bincount(term_ids, minlength=len(vocabulary)), out=offsets[1:])
    np.savez(target / "keywords.npz", offsets=offsets, rows=rows[order], tfs=tfs[order], doc_len=doc_len)
    (target / "terms.json").write_text(json.dumps(list(vocabulary)), encoding="utf-8")
    with ipc.new_file(str(target / "rows.arrow"), ROW_SCHEMA) as writer:
        writer.write_batch(table.combine_chunks().to_batches()[0])
    _faiss().write_index(index, str(target / "graph.faiss"))


def _chunk(dataset: str, row: tuple[Any, ...]) -> Chunk:
    chunk_id, version, text, metadata, source_uri, byte_start, byte_end, content_sha256 = row
    return Chunk(
        chunk_id, dataset, version, text, source_uri, byte_start, byte_end, content_sha256,
        {} if metadata == "{}" else json.loads(metadata),
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class GraphView:
    """One query's access to a graph: its rows, already narrowed by the query's filters and scope."""

    dataset: str
    graph: Graph
    mask: _Mask | None

    @property
    def dim(self) -> int:
        return self.graph.dim

    def vector(self, vector: npt.NDArray[np.float32], k: int, ef_search: int | None) -> list[Scored]:
        mask = None if self.mask is not None and self.mask.every else self.mask
        return self.graph.search(self.dataset, vector, k, mask, ef_search or self.graph.params.ef_search)

    def keyword(self, terms: list[str], qtfs: list[int], k: int) -> list[Scored]:
        return self.graph.keyword(self.dataset, terms, qtfs, k, self.mask)


class GraphFiles:
    """The graph indexes of one store, one directory per dataset under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._loaded: dict[str, tuple[tuple[int, int, int], Graph | None]] = {}
        self._tokens: dict[str, tuple[tuple[int, int, int], str]] = {}
        self._paths: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def _dir(self, dataset: str) -> Path:
        return self.root / dataset

    def _file(self, dataset: str, name: str) -> str:
        """``<root>/<dataset>/<name>`` as a string, built once (a query stats two such files)."""
        key = (dataset, name)
        path = self._paths.get(key)
        if path is None:
            path = self._paths[key] = str(self._dir(dataset) / name)
        return path

    def build(
        self,
        dataset: str,
        token: str,
        params: GraphIndex,
        batches: Iterable[tuple[pa.Table, npt.NDArray[Any]]],
        analyzer: EnglishAnalyzer,
    ) -> None:
        """Build the graph over ``batches`` (rows in ``ROW_SCHEMA`` order, their vectors), then publish it.

        When the published graph has the same parameters and most of its rows are still in the table, the
        build extends it instead: the new rows are added to a copy of its graph and postings, and rows gone
        from the table are marked deleted. Past ``MAX_DELETED`` of the rows deleted, it starts afresh.
        """
        parts, matrices = [], []
        for rows, vectors in batches:
            parts.append(rows.cast(ROW_SCHEMA))
            matrix = np.ascontiguousarray(vectors, dtype=np.float32)
            norms = np.linalg.norm(matrix, axis=1, keepdims=True)
            matrices.append((matrix / np.where(norms > 0, norms, 1.0)).astype(np.float32))
        if not parts or sum(len(p) for p in parts) == 0:
            raise ValueError(f"dataset {dataset!r} has no rows to build a graph index from")
        table, matrix = pa.concat_tables(parts).combine_chunks(), np.concatenate(matrices)
        previous = self.current(dataset)
        build_id = uuid.uuid4().hex[:16]
        target = self._dir(dataset) / build_id
        target.mkdir(parents=True)
        try:
            deleted = None
            if previous is not None and previous.params == params and previous.dim == matrix.shape[1]:
                deleted = _extend(previous, table, matrix, target, analyzer)
            if deleted is None:
                _write_fresh(table, matrix, params, target, analyzer)
            manifest = {
                "build": build_id, "token": token, "params": json.loads(index_params_to_json(params)),
                "extends": previous.build_id if deleted is not None and previous is not None else None,
                "deleted": 0 if deleted is None else deleted,
            }  # fmt: skip
            current = self._dir(dataset) / "current.json"
            staged = current.with_suffix(f".{build_id}.tmp")
            staged.write_text(json.dumps(manifest))
            os.replace(staged, current)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        for old in self._dir(dataset).iterdir():
            if old.is_dir() and old.name != build_id and not old.name.startswith("."):
                shutil.rmtree(old, ignore_errors=True)

    def drop(self, dataset: str) -> None:
        """Forget the dataset's graph: queries go to the backend until the next build."""
        with contextlib.suppress(FileNotFoundError):
            (self._dir(dataset) / "current.json").unlink()
        shutil.rmtree(self._dir(dataset), ignore_errors=True)
        with self._lock:
            self._loaded.pop(dataset, None)
            self._tokens.pop(dataset, None)

    def current(self, dataset: str) -> Graph | None:
        """The dataset's published graph, loaded once per build; None when there is none."""
        path = self._file(dataset, "current.json")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            cached = self._loaded.get(dataset)
            if cached is not None and cached[0] == stamp:
                return cached[1]
            graph: Graph | None
            try:
                manifest = json.loads(Path(path).read_text())
                graph = Graph(self._dir(dataset) / manifest["build"], manifest)
            except FileNotFoundError:
                return None  # a build replaced it meanwhile: retry on the next query
            except Exception as exc:  # unreadable or corrupt files: the store answers until the next build
                _log.warning("graph index of %s unusable, searching the store instead: %s", dataset, exc)
                graph = None
            self._loaded[dataset] = (stamp, graph)
            return graph

    def view(
        self, dataset: str, tags: list[str], scope: frozenset[str] | None, token: Callable[[], str | None]
    ) -> GraphView | None:
        """The dataset's graph for one query, or None when it cannot answer exactly (see the module).

        ``token``: the table's current content token, asked only when the scope alone does not decide.
        """
        graph = self.current(dataset)
        if graph is None:
            return None
        mask = graph.mask(tags, scope)
        scoped = scope is not None and mask is not None and mask.covers_scope
        if not scoped and token() != graph.token:
            return None
        return GraphView(dataset, graph, mask)

    def write_token(self, dataset: str, token: str) -> None:
        """Record the table's content token after a write: a graph built from another is then stale."""
        path = self._dir(dataset) / "table.token"
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
        staged.write_text(token)
        os.replace(staged, path)

    def read_token(self, dataset: str) -> str | None:
        """The token ``write_token`` last recorded (one ``stat`` while it is unchanged), or None."""
        path = self._file(dataset, "table.token")
        try:
            st = os.stat(path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            cached = self._tokens.get(dataset)
            if cached is not None and cached[0] == stamp:
                return cached[1]
            token = Path(path).read_text()
        except FileNotFoundError:
            return None
        self._tokens[dataset] = (stamp, token)
        return token
