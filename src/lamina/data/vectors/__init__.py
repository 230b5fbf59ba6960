"""The vector store: one interface (``VectorStore``), its shared base and two backends, BM25 and fusion.

The lowest of the data layer's sub-packages: it imports none of the others.
"""

from lamina.data.vectors._base import VectorStoreBase
from lamina.data.vectors._fusion import RRF_K, Fused, reciprocal_rank_fusion
from lamina.data.vectors._lancedb import LanceDBStore
from lamina.data.vectors._pgvector import PgVectorStore
from lamina.data.vectors._rows import check_metadata
from lamina.data.vectors._text import BM25_B, BM25_K1, ENGLISH_STOPWORDS, EnglishAnalyzer
from lamina.data.vectors._types import (
    CHUNK_FIELDS,
    HYBRID_DEPTH,
    MIN_INDEX_ROWS,
    SOURCE_URI_KEY,
    Chunk,
    Embedder,
    ExactIndex,
    GraphIndex,
    Hit,
    HnswIndex,
    IndexParams,
    IvfHnswSqIndex,
    IvfPqIndex,
    Scalar,
    SearchMode,
    VectorLike,
    VectorStore,
    check_dataset_name,
)

__all__ = [
    "BM25_B",
    "BM25_K1",
    "CHUNK_FIELDS",
    "ENGLISH_STOPWORDS",
    "HYBRID_DEPTH",
    "MIN_INDEX_ROWS",
    "RRF_K",
    "SOURCE_URI_KEY",
    "Chunk",
    "Embedder",
    "EnglishAnalyzer",
    "ExactIndex",
    "Fused",
    "GraphIndex",
    "Hit",
    "HnswIndex",
    "IndexParams",
    "IvfHnswSqIndex",
    "IvfPqIndex",
    "LanceDBStore",
    "PgVectorStore",
    "Scalar",
    "SearchMode",
    "VectorLike",
    "VectorStore",
    "VectorStoreBase",
    "check_dataset_name",
    "check_metadata",
    "reciprocal_rank_fusion",
]
