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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa  # type: ignore[import-untyped]

from lamina.data.vectors._rows import Scored
from lamina.data.vectors._text import EnglishAnalyzer
from lamina.data.vectors._types import GraphIndex, index_params_to_json
from lamina.data.vectors.graph._build import extend_build, write_fresh_build
from lamina.data.vectors.graph._search import ROW_SCHEMA, Graph, RowMask

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GraphView:
    """One query's access to a graph: its rows, already narrowed by the query's filters and scope."""

    dataset: str
    graph: Graph
    mask: RowMask | None

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
                deleted = extend_build(previous, table, matrix, target, analyzer)
            if deleted is None:
                write_fresh_build(table, matrix, params, target, analyzer)
            manifest = {
                "build": build_id,
                "token": token,
                "params": json.loads(index_params_to_json(params)),
                "extends": previous.build_id if deleted is not None and previous is not None else None,
                "deleted": 0 if deleted is None else deleted,
            }
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
