"""A loaded build of the graph index: its HNSW graph, BM25 postings and rows, and how one query searches them.

See ``lamina.data.vectors.graph`` for what the index is and when it answers; this module is the read side.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]
import pyarrow.ipc as ipc  # type: ignore[import-untyped]

from lamina.data.vectors._rows import Scored, top_with_ties
from lamina.data.vectors._text import bm25_scores
from lamina.data.vectors._types import CHUNK_FIELDS, Chunk, GraphIndex, index_params_from_json

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
#: A mask with at most this many rows (or this fraction of the graph) is searched exactly.
EXACT_ROWS, EXACT_FRACTION = 4096, 0.02
_MASKS_KEPT = 16


def faiss_module() -> Any:
    import faiss  # imported on first use: it takes a moment to load

    return faiss


@dataclass(frozen=True, slots=True)
class RowMask:
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
        faiss = faiss_module()
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
        self._columns = [_Column(rows.column(name)) for name in CHUNK_FIELDS]
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
        self._masks: OrderedDict[tuple[tuple[str, ...], frozenset[str] | None], RowMask] = OrderedDict()
        self._ef_params: dict[int, Any] = {}
        self._lock = threading.Lock()

    def mask(self, tags: list[str], scope: frozenset[str] | None) -> RowMask | None:
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
        faiss = faiss_module()
        mask = RowMask(
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
        self, dataset: str, vector: npt.NDArray[np.float32], k: int, mask: RowMask | None, ef_search: int
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
            params = faiss_module().SearchParametersHNSW(efSearch=ef)
            params.sel = mask.selector
        scores, labels = self._knn(np.ascontiguousarray(query), k, params)
        found = k if labels[0, k - 1] >= 0 else int((labels[0] >= 0).sum())  # FAISS pads the end with -1
        if mask is not None and found < k:
            return self._exact(dataset, query, k, mask.positions)
        return self._scored(dataset, labels[0, :found], scores[0, :found], k)

    def keyword(
        self, dataset: str, terms: list[str], qtfs: list[int], k: int, mask: RowMask | None
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
            term_idx=term_idx,
            doc=rows,
            tf=tfs,
            doc_len=self.doc_len[rows],
            qtfs=qtfs,
            n_docs=n_docs,
            avgdl=total / n_docs if n_docs else 0.0,
        )
        if mask is not None:
            keep = mask.allowed[positions]
            positions, scores = positions[keep], scores[keep]
        top = top_with_ties(scores, k)
        return self._scored(dataset, positions[top], scores[top], k)

    def _knn(
        self, query: npt.NDArray[np.float32], k: int, params: Any
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """FAISS's search of one query, called below its Python wrapper (which costs more than the call)."""
        ptr = faiss_module().swig_ptr
        scores, labels = np.empty((1, k), dtype=np.float32), np.empty((1, k), dtype=np.int64)
        self.index.search_c(1, ptr(query), k, ptr(scores), ptr(labels), params)
        return scores, labels

    def _params(self, ef: int) -> Any:
        """FAISS's search parameters for ``ef``, made once (they cost a few microseconds to build)."""
        params = self._ef_params.get(ef)
        if params is None:
            params = self._ef_params[ef] = faiss_module().SearchParametersHNSW(efSearch=ef)
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


def _chunk(dataset: str, row: tuple[Any, ...]) -> Chunk:
    chunk_id, version, text, metadata, source_uri, byte_start, byte_end, content_sha256 = row
    return Chunk(
        chunk_id,
        dataset,
        version,
        text,
        source_uri,
        byte_start,
        byte_end,
        content_sha256,
        {} if metadata == "{}" else json.loads(metadata),
    )
