"""Layer: data. Datasets of chunks with vectors, and retrieval over them (vector, BM25 and hybrid search)."""

from lamina.data._chunking import ChunkTokenizer
from lamina.data._dataset_records import ChunkLineage, DatasetVersion, SourceRecord, VersionDiff
from lamina.data._datasets import DatasetCatalog
from lamina.data._drift_report import (
    DriftChecker,
    DriftReport,
    DriftReports,
    DriftSettings,
    publish_drift_metrics,
)
from lamina.data._drift_window import DriftRecorder, DriftWindow, WindowPolicy
from lamina.data._fusion import RRF_K, Fused, reciprocal_rank_fusion
from lamina.data._ingest import IngestOptions, IngestPipeline, IngestProgress, IngestReport
from lamina.data._lancedb import LanceDBStore
from lamina.data._loaders import LoadOptions
from lamina.data._openlineage import LineageEmitter
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
    GraphIndex,
    Hit,
    HnswIndex,
    IndexParams,
    IvfHnswSqIndex,
    IvfPqIndex,
    Scalar,
    SearchMode,
    VectorStore,
)
from lamina.data._writer import collect_garbage

__all__ = [
    "BM25_B",
    "BM25_K1",
    "HYBRID_DEPTH",
    "MIN_INDEX_ROWS",
    "RRF_K",
    "AsyncEmbedder",
    "Chunk",
    "ChunkLineage",
    "ChunkTokenizer",
    "Citation",
    "DatasetCatalog",
    "DatasetVersion",
    "DriftChecker",
    "DriftRecorder",
    "DriftReport",
    "DriftReports",
    "DriftSettings",
    "DriftWindow",
    "Embedder",
    "EnglishAnalyzer",
    "ExactIndex",
    "Fused",
    "GraphIndex",
    "Hit",
    "HnswIndex",
    "IndexParams",
    "IngestOptions",
    "IngestPipeline",
    "IngestProgress",
    "IngestReport",
    "IvfHnswSqIndex",
    "IvfPqIndex",
    "LanceDBStore",
    "LineageEmitter",
    "LoadOptions",
    "PgVectorStore",
    "PinnedVersion",
    "Retrieval",
    "Retriever",
    "Scalar",
    "SearchMode",
    "SourceRecord",
    "VectorStore",
    "VersionDiff",
    "VersionResolver",
    "WindowPolicy",
    "collect_garbage",
    "publish_drift_metrics",
    "reciprocal_rank_fusion",
]
