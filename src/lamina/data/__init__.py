"""Layer: data. Datasets of chunks with vectors, and retrieval over them (vector, BM25 and hybrid search)."""

from lamina.data._fusion import RRF_K, Fused, reciprocal_rank_fusion
from lamina.data._lancedb import LanceDBStore
from lamina.data._pgvector import PgVectorStore
from lamina.data._retrieve import (
    AsyncEmbedder,
    Citation,
    PinnedVersion,
    Retrieval,
    Retriever,
    VersionResolver,
)
from lamina.data._text import BM25_B, BM25_K1, EnglishAnalyzer
from lamina.data._vectors import (
    HYBRID_DEPTH,
    MIN_INDEX_ROWS,
    Chunk,
    Embedder,
    ExactIndex,
    Hit,
    HnswIndex,
    IndexParams,
    IvfHnswSqIndex,
    IvfPqIndex,
    Scalar,
    SearchMode,
    VectorStore,
)

__all__ = [
    "BM25_B",
    "BM25_K1",
    "HYBRID_DEPTH",
    "MIN_INDEX_ROWS",
    "RRF_K",
    "AsyncEmbedder",
    "Chunk",
    "Citation",
    "Embedder",
    "EnglishAnalyzer",
    "ExactIndex",
    "Fused",
    "Hit",
    "HnswIndex",
    "IndexParams",
    "IvfHnswSqIndex",
    "IvfPqIndex",
    "LanceDBStore",
    "PgVectorStore",
    "PinnedVersion",
    "Retrieval",
    "Retriever",
    "Scalar",
    "SearchMode",
    "VectorStore",
    "VersionResolver",
    "reciprocal_rank_fusion",
]
