"""The graph index: an in-process HNSW graph (FAISS) beside a store's table, the fast path of vector search.

Why it exists: on 100k MiniLM vectors (``bench/ann_recall.py``) a query through LanceDB costs about 9 ms
whatever its index settings, and one through pgvector about 3 ms (a server round trip and the executor),
while FAISS's HNSW answers in about 0.2 ms. Both costs are fixed per query, so no index setting helps. The
graph index keeps the store as the source of truth and adds a read-optimised copy next to it:

- ``graph.faiss``: a FAISS ``IndexHNSWFlat`` on inner product over unit-normalised vectors (so the score
  is the cosine similarity the backends report), labels = row positions;
- ``rows.arrow``: the rows' chunk fields and filter tags as an Arrow IPC file, memory-mapped, so a hit
  costs a ``take`` of k rows (tens of microseconds), never a store query.

A build writes a fresh directory ``<graphs>/<dataset>/<build id>/`` and then replaces
``<dataset>/current.json``, which names the build and the *token* of the table content it was built from
(LanceDB: the table version; pgvector: a write counter). Readers in any process load a build once and
keep it while ``current.json`` is unchanged (one ``stat`` per query). Old build directories are removed;
a reader that still maps one keeps reading it (POSIX unlink semantics).

When is the graph used? When it was built from the table as it is now (same token); or, whatever writes
came since, when the query is scoped to a dataset version whose chunks are all in the graph. Chunk ids
are content hashes, so such a version's rows in the graph are exactly its rows in the table: an ingest
in progress (its chunks already written, its version not yet committed) does not slow retrieval down.
Otherwise the backend's own search answers, correctly but slower, until the next ``build_index``.

Filters and version scopes become a row mask, cached per (filter, scope) and per build. A mask holding
few rows is searched exactly (a dot product over those rows); a larger one is passed to the HNSW search
as a FAISS bitmap selector, with an exact rerun if the graph walk finds fewer than ``k`` rows inside it.
"""

from __future__ import annotations

import contextlib
import json
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
        self.index = faiss.read_index(str(directory / "graph.faiss"))
        self.index.hnsw.efSearch = self.params.ef_search
        self.dim: int = self.index.d
        self.size: int = self.index.ntotal
        storage = faiss.downcast_index(self.index.storage)
        self.vectors = faiss.rev_swig_ptr(storage.get_xb(), self.size * self.dim).reshape(self.size, self.dim)
        # read into memory, not mapped: a hit then never waits on a page fault
        with pa.OSFile(str(directory / "rows.arrow")) as f:
            reader = ipc.open_file(f.read_buffer())
        rows = pa.Table.from_batches([reader.get_batch(i) for i in range(reader.num_record_batches)])
        rows = rows.combine_chunks().to_batches()[0]
        self.tags: pa.Array = rows.column("tags")
        self.chunk_ids: pa.Array = rows.column("chunk_id")
        self._columns = [_Column(rows.column(name)) for name in _PAYLOAD]
        self._masks: OrderedDict[tuple[tuple[str, ...], frozenset[str] | None], _Mask] = OrderedDict()
        self._ef_params: dict[int, Any] = {}
        self._lock = threading.Lock()

    def mask(self, tags: list[str], scope: frozenset[str] | None) -> _Mask | None:
        """The rows passing ``tags`` and inside ``scope``; None when that is every row."""
        if not tags and scope is None:
            return None
        key = (tuple(tags), scope)
        with self._lock:
            found = self._masks.get(key)
            if found is not None:
                self._masks.move_to_end(key)
                return found
        allowed = np.ones(self.size, dtype=bool)
        covers = True
        if scope is not None:
            value_set = pa.array(list(scope), pa.large_string())
            allowed &= pc.is_in(self.chunk_ids, value_set=value_set).to_numpy(zero_copy_only=False)
            covers = int(allowed.sum()) == len(scope)
        for tag in tags:
            allowed &= self._rows_with(tag)
        bits = np.packbits(allowed, bitorder="little")
        faiss = _faiss()
        mask = _Mask(
            allowed,
            np.flatnonzero(allowed),
            bits,
            faiss.IDSelectorBitmap(self.size, faiss.swig_ptr(bits)),
            covers,
            bool(allowed.all()),
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
        scores = (self.vectors[positions] @ query).astype(np.float64)
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
            self._offsets = np.frombuffer(offsets, dtype=np.int64)[
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
        starts, ends = self._offsets[at].tolist(), self._offsets[after].tolist()
        return [str(data[a:b], "utf-8") for a, b in zip(starts, ends, strict=True)]


def _chunk(dataset: str, row: tuple[Any, ...]) -> Chunk:
    chunk_id, version, text, metadata, source_uri, byte_start, byte_end, content_sha256 = row
    return Chunk(
        chunk_id, dataset, version, text, source_uri, byte_start, byte_end, content_sha256,
        {} if metadata == "{}" else json.loads(metadata),
    )  # fmt: skip


class GraphFiles:
    """The graph indexes of one store, one directory per dataset under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._loaded: dict[str, tuple[tuple[int, int, int], Graph]] = {}
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
    ) -> None:
        """Build the graph over ``batches`` (rows in ``ROW_SCHEMA`` order, their vectors), then publish it."""
        faiss = _faiss()
        build_id = uuid.uuid4().hex[:16]
        target = self._dir(dataset) / build_id
        target.mkdir(parents=True)
        try:
            index: Any = None
            parts: list[pa.Table] = []
            for rows, vectors in batches:
                matrix = np.ascontiguousarray(vectors, dtype=np.float32)
                norms = np.linalg.norm(matrix, axis=1, keepdims=True)
                matrix = (matrix / np.where(norms > 0, norms, 1.0)).astype(np.float32)
                if index is None:
                    index = faiss.IndexHNSWFlat(matrix.shape[1], params.m, faiss.METRIC_INNER_PRODUCT)
                    index.hnsw.efConstruction = params.ef_construction
                    faiss.omp_set_num_threads(os.cpu_count() or 1)
                parts.append(rows.cast(ROW_SCHEMA))
                index.add(matrix)
            if index is None:
                raise ValueError(f"dataset {dataset!r} has no rows to build a graph index from")
            with ipc.new_file(str(target / "rows.arrow"), ROW_SCHEMA) as writer:
                writer.write_batch(pa.concat_tables(parts).combine_chunks().to_batches()[0])
            faiss.write_index(index, str(target / "graph.faiss"))
            manifest = {"build": build_id, "token": token, "params": json.loads(index_params_to_json(params))}
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
            try:
                manifest = json.loads(Path(path).read_text())
                graph = Graph(self._dir(dataset) / manifest["build"], manifest)
            except (FileNotFoundError, RuntimeError):
                return None  # a build replaced it meanwhile (FAISS raises RuntimeError): retry next query
            self._loaded[dataset] = (stamp, graph)
            return graph

    def rank(
        self,
        dataset: str,
        vector: npt.NDArray[np.float32],
        k: int,
        tags: list[str],
        scope: frozenset[str] | None,
        ef_search: int | None,
        token: Callable[[], str | None],
    ) -> list[Scored] | None:
        """The graph's ranking, or None when the graph cannot answer exactly (see the module's docstring).

        ``token``: the table's current content token, asked only when the scope alone does not decide.
        """
        graph = self.current(dataset)
        if graph is None or graph.dim != vector.shape[0]:
            return None
        mask = graph.mask(tags, scope)
        scoped = scope is not None and mask is not None and mask.covers_scope
        if not scoped and token() != graph.token:
            return None
        if mask is not None and mask.every:
            mask = None
        return graph.search(dataset, vector, k, mask, ef_search or graph.params.ef_search)

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
