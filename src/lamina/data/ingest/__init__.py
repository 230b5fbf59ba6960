"""Ingestion: discover files, load, clean, de-duplicate, chunk, embed, write, commit a version.

Imports ``lamina.data.vectors`` and ``lamina.data.versions`` among the data layer's sub-packages.
"""

from lamina.data.ingest._chunking import ChunkTokenizer, TextSpan, chunk_spans, windows
from lamina.data.ingest._clean import CleanText, clean_text
from lamina.data.ingest._dedupe import Deduplicator, content_sha256, hamming, simhash
from lamina.data.ingest._discover import Discovered, SourceFile, discover
from lamina.data.ingest._loaders import SUFFIXES, Document, Loaded, LoadOptions, Unloadable, load_source
from lamina.data.ingest._openlineage import LineageEmitter
from lamina.data.ingest._pipeline import (
    EmbeddingTokenizer,
    IngestOptions,
    IngestPipeline,
    IngestProgress,
    IngestReport,
)

__all__ = [
    "SUFFIXES",
    "ChunkTokenizer",
    "CleanText",
    "Deduplicator",
    "Discovered",
    "Document",
    "EmbeddingTokenizer",
    "IngestOptions",
    "IngestPipeline",
    "IngestProgress",
    "IngestReport",
    "LineageEmitter",
    "LoadOptions",
    "Loaded",
    "SourceFile",
    "TextSpan",
    "Unloadable",
    "chunk_spans",
    "clean_text",
    "content_sha256",
    "discover",
    "hamming",
    "load_source",
    "simhash",
    "windows",
]
