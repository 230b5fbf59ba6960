"""Ingestion: discover files, load, clean, de-duplicate, chunk, embed, write, commit a version.

Imports ``lamina.data.vectors`` and ``lamina.data.versions`` among the data layer's sub-packages.
"""

from lamina.data.ingest._chunking import ChunkTokenizer, EmbeddingTokenizer, TextSpan, chunk_spans, windows
from lamina.data.ingest._clean import CleanText, clean_text, join_clean
from lamina.data.ingest._dedupe import (
    Deduplicator,
    DocumentHash,
    DocumentHasher,
    Duplicate,
    content_sha256,
    hamming,
    simhash,
)
from lamina.data.ingest._discover import Discovered, discover
from lamina.data.ingest._loaders import (
    SUFFIXES,
    Document,
    Loaded,
    LoadOptions,
    Piece,
    Unloadable,
    load_source,
    read_pieces,
)
from lamina.data.ingest._openlineage import LineageEmitter
from lamina.data.ingest._pipeline import IngestPipeline
from lamina.data.ingest._records import Skipped, SourceFile
from lamina.data.ingest._report import IngestOptions, IngestProgress, IngestReport
from lamina.data.ingest._segments import Segment, segments

__all__ = [
    "SUFFIXES",
    "ChunkTokenizer",
    "CleanText",
    "Deduplicator",
    "Discovered",
    "Document",
    "DocumentHash",
    "DocumentHasher",
    "Duplicate",
    "EmbeddingTokenizer",
    "IngestOptions",
    "IngestPipeline",
    "IngestProgress",
    "IngestReport",
    "LineageEmitter",
    "LoadOptions",
    "Loaded",
    "Piece",
    "Segment",
    "Skipped",
    "SourceFile",
    "TextSpan",
    "Unloadable",
    "chunk_spans",
    "clean_text",
    "content_sha256",
    "discover",
    "hamming",
    "join_clean",
    "load_source",
    "read_pieces",
    "segments",
    "simhash",
    "windows",
]
