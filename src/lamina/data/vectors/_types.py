"""The vector store: one interface, the types that cross it, and what every backend shares.

A dataset's chunks live in one store table per dataset. Dataset versions share chunks (a chunk id is a hash
of content, so an unchanged source keeps its chunks), and a version is just the set of chunk ids it holds.
Searching a pinned version therefore passes that set as ``chunk_ids``, and each backend turns it into a
membership filter applied before top-k: no vector is ever copied per version, a new version costs only
its new chunks, and garbage collection deletes the chunks no kept version lists. The alternative, a
version column on one row per (version, chunk) membership, would either duplicate vectors or need a join
on every query; the caller already holds the id set, so a filter is the smaller design.

Keyword scores (BM25, see ``_text``) use corpus statistics of the searched scope: the whole dataset, or
the pinned version when ``chunk_ids`` is given. Metadata filters narrow the results, not the statistics,
as a filter does in Lucene. So a pinned version ranks the same however many later versions share its
table.

Metadata filters are equality on metadata keys (and on ``source_uri``), combined with AND. Each chunk
stores its metadata also as a list of tags, one JSON ``[key, value]`` per entry, and a filter becomes "the
chunk's tags contain all of these": an inverted-index lookup in both backends, typed (``1``, ``"1"`` and
``true`` differ; ``5`` and ``5.0`` are equal), and an unknown key simply matches nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from lamina.errors import InvalidRequestError

Scalar = str | int | float | bool
#: A query vector: a list of floats or a 1-d numpy array.
VectorLike = Sequence[float] | npt.NDArray[np.floating[Any]]
SearchMode = Literal["vector", "keyword", "hybrid"]

#: Below this many rows a vector index is not built: an exact scan is fast and ANN training meaningless.
MIN_INDEX_ROWS = 1024
#: How many hits of each ranking hybrid search fuses (at least ``k``).
HYBRID_DEPTH = 100
#: The filter key that matches a chunk's ``source_uri`` rather than a metadata entry.
SOURCE_URI_KEY = "source_uri"

_DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,47}")


@runtime_checkable
class Embedder(Protocol):
    """Text to unit-normalised vectors; the models layer provides one (the data layer declares it)."""

    @property
    def dim(self) -> int: ...
    @property
    def name(self) -> str:
        """The model as ``name@version``."""
        ...

    @property
    def sha256(self) -> str:
        """Digest of the model file, recorded in every chunk's lineage."""
        ...

    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...
    def count_tokens(self, text: str) -> int: ...


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of a source document with its embedding and where it came from."""

    chunk_id: str
    dataset: str
    #: The dataset version that first held this chunk (later versions share it).
    version: str
    text: str
    source_uri: str
    byte_start: int
    byte_end: int
    content_sha256: str
    metadata: dict[str, Scalar] = field(default_factory=dict)
    #: The embedding; None on chunks read back from a search (ask ``get`` for vectors).
    vector: list[float] | None = None


#: The fields a backend stores as they are (``metadata`` as JSON); ``dataset`` and ``vector`` it adds.
CHUNK_FIELDS = (
    "chunk_id",
    "version",
    "text",
    "metadata",
    "source_uri",
    "byte_start",
    "byte_end",
    "content_sha256",
)


@dataclass(frozen=True, slots=True)
class Hit:
    """One search result. ``score``: cosine similarity (vector), BM25 (keyword) or RRF (hybrid)."""

    chunk: Chunk
    score: float
    #: 1-based position in this result list.
    rank: int
    #: 1-based position in the vector ranking (None: not in it, or not asked for).
    vector_rank: int | None = None
    #: 1-based position in the BM25 ranking (None: not in it, or not asked for).
    keyword_rank: int | None = None


@dataclass(frozen=True, slots=True)
class ExactIndex:
    """No ANN index: every vector query is an exact scan. Building it drops any vector index."""

    kind: Literal["exact"] = "exact"


@dataclass(frozen=True, slots=True)
class IvfPqIndex:
    """LanceDB IVF_PQ: k-means partitions, product-quantised vectors, exact re-ranking of the best.

    Memory-light and fast on large tables; ``refine_factor`` buys back the recall PQ loses.
    """

    #: k-means partitions. None: sqrt(rows), LanceDB's default.
    num_partitions: int | None = None
    #: PQ sub-vectors; must divide the dimension. None: dim / 8 (48 for 384-d), finer than LanceDB's /16.
    num_sub_vectors: int | None = None
    #: Bits per PQ code (8: 256 centroids per sub-vector).
    num_bits: int = 8
    #: Query time: partitions searched first (more are searched when filters leave fewer than k hits).
    nprobes: int = 20
    #: Query time: rerank ``refine_factor * k`` PQ candidates with exact distances (>= 1).
    refine_factor: int = 10
    kind: Literal["ivf_pq"] = "ivf_pq"


@dataclass(frozen=True, slots=True)
class IvfHnswSqIndex:
    """LanceDB IVF_HNSW_SQ: an HNSW graph per partition over int8 scalar-quantised vectors."""

    #: k-means partitions. None: LanceDB's default for this type.
    num_partitions: int | None = None
    #: HNSW neighbours per node.
    m: int = 20
    #: HNSW candidate list while building.
    ef_construction: int = 300
    #: Query time: partitions searched.
    nprobes: int = 20
    #: Query time: HNSW candidate list (>= k).
    ef: int = 100
    #: Query time: rerank ``refine_factor * k`` candidates with exact distances (>= 1).
    refine_factor: int = 4
    kind: Literal["ivf_hnsw_sq"] = "ivf_hnsw_sq"


@dataclass(frozen=True, slots=True)
class HnswIndex:
    """pgvector HNSW on cosine distance (``vector_cosine_ops``)."""

    #: Neighbours per node (pgvector default 16).
    m: int = 16
    #: Candidate list while building (pgvector default 64).
    ef_construction: int = 64
    #: Query time: candidate list, ``hnsw.ef_search`` (pgvector default 40; raised for recall >= 0.95).
    ef_search: int = 100
    kind: Literal["hnsw"] = "hnsw"


@dataclass(frozen=True, slots=True)
class GraphIndex:
    """Lamina's graph index, both backends: an in-process HNSW graph (FAISS) beside the table.

    The fast path: ids come from the graph and rows from a memory-mapped copy, so a query never waits on
    the store (see ``lamina.data.vectors.graph``). The table stays the source of truth; until the next build,
    queries the graph cannot answer exactly go to the backend (pgvector builds its HNSW index too).
    Memory: the vectors (2 bytes per dimension as float16) plus about ``8 * m`` bytes of links per row,
    and the rows' text.
    """

    #: HNSW neighbours per node (twice that on the bottom layer).
    m: int = 32
    #: Candidate list while building.
    ef_construction: int = 200
    #: Query time: candidate list (>= k); a search may ask for another with ``ef_search=``.
    ef_search: int = 64
    #: How the graph keeps vectors: float16 (half the memory, faster, scores to about 3 digits) or float32.
    vectors: Literal["float16", "float32"] = "float16"
    kind: Literal["graph"] = "graph"


IndexParams = ExactIndex | IvfPqIndex | IvfHnswSqIndex | HnswIndex | GraphIndex
_INDEX_TYPES: dict[str, type[IndexParams]] = {
    "exact": ExactIndex,
    "ivf_pq": IvfPqIndex,
    "ivf_hnsw_sq": IvfHnswSqIndex,
    "hnsw": HnswIndex,
    "graph": GraphIndex,
}


def index_params_to_json(params: IndexParams) -> str:
    """Serialise index parameters, so a store opened later queries with the same settings."""
    return json.dumps({name: getattr(params, name) for name in params.__dataclass_fields__})


def index_params_from_json(text: str) -> IndexParams:
    data = json.loads(text)
    return _INDEX_TYPES[data.pop("kind")](**data)


@runtime_checkable
class VectorStore(Protocol):
    """Chunks with vectors, per dataset: the interface every backend implements.

    Backends: ``LanceDBStore`` (embedded, the default) and ``PgVectorStore`` (PostgreSQL + pgvector). Both
    pass one test suite and rank identically for identical data, up to ties.
    """

    def upsert(self, dataset: str, chunks: Sequence[Chunk]) -> None:
        """Insert or replace chunks by ``chunk_id``, atomically: all of them become visible, or none."""
        ...

    def delete(self, dataset: str, chunk_ids: Collection[str]) -> None: ...
    def get(self, dataset: str, chunk_ids: Sequence[str], *, with_vectors: bool = False) -> list[Chunk]:
        """The chunks found, in the order asked; unknown ids are left out."""
        ...

    def count(self, dataset: str) -> int:
        """Chunks stored for ``dataset`` (0 when it has none)."""
        ...

    def chunk_ids(self, dataset: str) -> list[str]:
        """Every chunk id stored for ``dataset``, sorted (what garbage collection checks against)."""
        ...

    def warm(self, dataset: str) -> bool:
        """Load the dataset's in-process index now rather than on its first search; True if it has one."""
        ...

    def default_index(self, rows: int) -> IndexParams:
        """The index this store builds for a dataset of ``rows`` chunks (the index policy)."""
        ...

    def reindex(self, dataset: str) -> IndexParams:
        """Rebuild the dataset's indexes after a write, with ``default_index`` for its current size."""
        ...

    def close(self) -> None:
        """Release connections and open files; the store is not used afterwards."""
        ...

    def drop(self, dataset: str) -> None:
        """Remove a dataset's chunks and indexes; nothing happens if it has none."""
        ...

    def build_index(self, dataset: str, params: IndexParams) -> IndexParams:
        """Build (or replace) the dataset's indexes; returns the vector index now in effect."""
        ...

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
        """The best ``k`` chunks, filters and the ``chunk_ids`` scope applied before ranking.

        ``chunk_ids``: pass the same ``frozenset`` object for repeated searches of one version, and the
        backend resolves it once. ``ef_search``: the HNSW candidate list for this query (graph and pgvector
        HNSW indexes; None: the one the index was built with): higher is slower and more exact.
        """
        ...


def check_dataset_name(dataset: str) -> str:
    if not _DATASET_NAME.fullmatch(dataset):
        raise InvalidRequestError(
            f"invalid dataset name {dataset!r}: use 1 to 48 letters, digits, '_' or '-', "
            "starting with a letter or digit",
            param="dataset",
        )
    return dataset
