"""What every vector-store backend shares: the search dispatch, the index policy and the graph index.

A backend stores rows and ranks them; everything around that lives here once:

- argument checks, and the vector / keyword / hybrid dispatch (hybrid is RRF over both rankings,
  ``HYBRID_DEPTH`` deep), with the rerun as an exact scan when a filtered query on an approximate index
  comes back short of ``k``;
- the index policy (``default_index``): an exact scan below ``MIN_INDEX_ROWS`` chunks, the graph index
  above, or the backend's own index when it has no graph directory;
- the graph index's lifecycle (``lamina.data.vectors.graph``): build and publish it after the backend's own
  indexes, drop it, answer from it while it is fresh, load it ahead of the first query (``warm``).

A backend implements its storage methods and four hooks: ``_build_native`` (its own indexes and upkeep),
``_graph_source`` (the table's content token and rows, read in one snapshot), ``_content_token`` (the
token now, checked by unscoped queries) and ``_drop_tables``; plus the two ranked retrievals.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Mapping
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import pyarrow as pa  # type: ignore[import-untyped]

from lamina.data.vectors._fusion import reciprocal_rank_fusion
from lamina.data.vectors._rows import Ranking, Scored, filter_tags
from lamina.data.vectors._text import EnglishAnalyzer
from lamina.data.vectors._types import (
    HYBRID_DEPTH,
    MIN_INDEX_ROWS,
    ExactIndex,
    GraphIndex,
    Hit,
    IndexParams,
    Scalar,
    SearchMode,
    VectorLike,
    check_dataset_name,
)
from lamina.data.vectors.graph import GraphFiles, GraphView
from lamina.errors import InvalidRequestError, UnsupportedCapabilityError

#: Rows for a graph build: batches of (rows in ``ROW_SCHEMA`` order, their vectors).
GraphRows = Iterable[tuple[pa.Table, npt.NDArray[Any]]]


class VectorStoreBase(ABC):
    """The shared half of every backend (see the module); a backend names its index kinds and fallback."""

    #: How messages name the backend.
    backend: ClassVar[str]
    #: The index kinds ``build_index`` accepts.
    index_kinds: ClassVar[tuple[type, ...]]
    #: The index above ``MIN_INDEX_ROWS`` chunks when the store has no graph directory.
    fallback_index: ClassVar[IndexParams] = ExactIndex()

    def __init__(self, graphs: GraphFiles | None) -> None:
        self.analyzer = EnglishAnalyzer()
        #: the graph indexes of this store; None: no local directory, ``GraphIndex`` is refused
        self.graphs = graphs

    # -- the index policy and the graph index ----------------------------------------------------------

    def default_index(self, rows: int) -> IndexParams:
        if rows < MIN_INDEX_ROWS:
            return ExactIndex()
        return GraphIndex() if self.graphs is not None else self.fallback_index

    def reindex(self, dataset: str) -> IndexParams:
        return self.build_index(dataset, self.default_index(self.count(dataset)))

    def build_index(self, dataset: str, params: IndexParams) -> IndexParams:
        """Build the backend's own indexes, then the graph beside them (or drop it); returns what is in
        effect (``ExactIndex`` below ``MIN_INDEX_ROWS`` chunks)."""
        check_dataset_name(dataset)
        if not isinstance(params, self.index_kinds):
            kinds = ", ".join(kind.__name__ for kind in self.index_kinds)
            raise UnsupportedCapabilityError(f"{self.backend} has no {params.kind} index; use {kinds}")
        if isinstance(params, GraphIndex) and self.graphs is None:
            raise UnsupportedCapabilityError(
                f"a graph index needs a local directory: open the {self.backend} store with graph_dir=..."
            )
        params = self._build_native(dataset, params)
        if isinstance(params, GraphIndex) and self.graphs is not None:
            token, batches = self._graph_source(dataset)
            self.graphs.build(dataset, token, params, batches, self.analyzer)
        elif self.graphs is not None:
            self.graphs.drop(dataset)
        return params

    def drop(self, dataset: str) -> None:
        self._drop_tables(check_dataset_name(dataset))
        if self.graphs is not None:
            self.graphs.drop(dataset)

    def warm(self, dataset: str) -> bool:
        return self.graphs is not None and self.graphs.current(check_dataset_name(dataset)) is not None

    def close(self) -> None:  # noqa: B027 - a hook with nothing to release by default
        """Release what the backend holds (connections, table handles); the store is not used after."""

    def __enter__(self) -> VectorStoreBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _graph_view(self, dataset: str, tags: list[str], scope: frozenset[str] | None) -> GraphView | None:
        """The dataset's graph narrowed to this query, or None when it cannot answer exactly."""
        if self.graphs is None:
            return None
        return self.graphs.view(dataset, tags, scope, lambda: self._content_token(dataset))

    # -- what a backend implements ----------------------------------------------------------------------

    @abstractmethod
    def count(self, dataset: str) -> int: ...

    @abstractmethod
    def _build_native(self, dataset: str, params: IndexParams) -> IndexParams:
        """Upkeep and the backend's own indexes for ``params``; returns the parameters in effect."""

    @abstractmethod
    def _graph_source(self, dataset: str) -> tuple[str, GraphRows]:
        """The table's content token and its rows with vectors, read in one snapshot."""

    @abstractmethod
    def _content_token(self, dataset: str) -> str | None:
        """The table's content token now: a graph built from another one is stale."""

    @abstractmethod
    def _drop_tables(self, dataset: str) -> None:
        """Remove the dataset's tables; nothing happens if it has none."""

    @abstractmethod
    def _vector_ranking(
        self, query: Ranking, vector: npt.NDArray[np.float32], ef_search: int | None, *, exact: bool
    ) -> tuple[list[Scored], bool]:
        """Best-first by cosine similarity, ties by chunk id; filters and scope applied before top-k.

        Returns the ranking and whether an approximate index answered (``exact``: scan every row).
        """

    @abstractmethod
    def _keyword_ranking(self, query: Ranking, terms: list[str], qtfs: list[int]) -> list[Scored]:
        """Best-first by BM25, ties by chunk id; statistics over ``scope``, filters before top-k."""

    # -- search ---------------------------------------------------------------------------------------

    def search(
        self,
        dataset: str,
        *,
        query_text: str | None = None,
        query_vector: VectorLike | None = None,
        k: int = 10,
        mode: SearchMode = "vector",
        filters: Mapping[str, Scalar] | None = None,
        chunk_ids: Collection[str] | None = None,
        ef_search: int | None = None,
    ) -> list[Hit]:
        _check_query(dataset, k, mode, query_text, query_vector, ef_search)
        scope = None if chunk_ids is None else _frozen(chunk_ids)
        depth = k if mode != "hybrid" else max(k, HYBRID_DEPTH)
        query = Ranking(dataset, depth, filter_tags(filters), scope)
        by_vector: list[Scored] = []
        by_keyword: list[Scored] = []
        view = self._graph_view(dataset, query.tags, scope) if k > 0 else None
        if mode != "keyword" and k > 0:
            vector = np.asarray(query_vector, dtype=np.float32)
            if view is not None and view.dim == vector.shape[0]:
                by_vector = view.vector(vector, depth, ef_search)
            else:
                by_vector = self._ranked_by_vector(query, vector, ef_search)
        if mode != "vector" and k > 0:
            terms, qtfs = self.analyzer.query(query_text or "")
            if terms:
                by_keyword = (
                    view.keyword(terms, qtfs, depth)
                    if view is not None
                    else self._keyword_ranking(query, terms, qtfs)
                )
        if mode == "vector":
            return [Hit(s.chunk, s.score, i, vector_rank=i) for i, s in enumerate(by_vector, start=1)]
        if mode == "keyword":
            return [Hit(s.chunk, s.score, i, keyword_rank=i) for i, s in enumerate(by_keyword, start=1)]
        return _fuse(by_vector, by_keyword, k)

    def _ranked_by_vector(
        self, query: Ranking, vector: npt.NDArray[np.float32], ef_search: int | None
    ) -> list[Scored]:
        """The backend's ranking; rerun as an exact scan when an approximate index, walking past rows the
        filters or scope exclude, came back with fewer than ``k``."""
        ranked, approximate = self._vector_ranking(query, vector, ef_search, exact=False)
        if approximate and len(ranked) < query.k and (query.tags or query.scope is not None):
            ranked, _ = self._vector_ranking(query, vector, ef_search, exact=True)
        return ranked


def _check_query(
    dataset: str,
    k: int,
    mode: SearchMode,
    query_text: str | None,
    query_vector: VectorLike | None,
    ef_search: int | None,
) -> None:
    check_dataset_name(dataset)
    if k < 0:
        raise InvalidRequestError(f"k must be >= 0, got {k}", param="k")
    if mode not in ("vector", "keyword", "hybrid"):
        raise InvalidRequestError(f"unknown search mode {mode!r}; use vector, keyword or hybrid")
    if mode != "keyword" and query_vector is None:
        raise InvalidRequestError(f"{mode} search needs query_vector: embed the query first")
    if mode != "vector" and query_text is None:
        raise InvalidRequestError(f"{mode} search needs query_text")
    if ef_search is not None and ef_search < 1:
        raise InvalidRequestError(f"ef_search must be >= 1, got {ef_search}", param="ef_search")


def _frozen(chunk_ids: Collection[str]) -> frozenset[str]:
    """The scope as a frozenset: the caller's own object when it is one, so per-scope caches can hit."""
    return chunk_ids if isinstance(chunk_ids, frozenset) else frozenset(chunk_ids)


def _fuse(by_vector: list[Scored], by_keyword: list[Scored], k: int) -> list[Hit]:
    chunks = {s.chunk.chunk_id: s.chunk for s in (*by_keyword, *by_vector)}
    fused = reciprocal_rank_fusion(
        [[s.chunk.chunk_id for s in by_vector], [s.chunk.chunk_id for s in by_keyword]], limit=k
    )
    return [
        Hit(chunks[f.key], f.score, i, vector_rank=f.ranks[0], keyword_rank=f.ranks[1])
        for i, f in enumerate(fused, start=1)
    ]
