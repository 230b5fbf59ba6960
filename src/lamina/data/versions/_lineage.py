"""The lineage chain of a chunk: the ids that tie it to its source, its pipeline and its model.

- pipeline version: sha256 of the Lamina version and the pipeline configuration that shapes chunks
  (chunk size and overlap, de-duplication threshold, cleaning and loader options), 16 hex digits. A
  change to any of them changes every chunk id, so nothing embedded under other settings is reused.
- chunk id: sha256 of the dataset, the document's URI and text hash, the chunk's span, the pipeline
  version and the embedding model's sha256, 32 hex digits. Equal inputs give equal ids, which is what
  lets an ingest reuse chunks already embedded (by an earlier version or by an interrupted run).
- version id: sha256 of the canonical manifest (``manifest_id``).
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from lamina.data.versions._records import ChunkLineage

#: Bump when the pipeline's code changes what it produces from the same input and config.
PIPELINE_FORMAT = 1


def code_version() -> str:
    try:
        return version("lamina")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def pipeline_version(config: dict[str, Any]) -> str:
    """The hash of the code version and the chunk-shaping ``config``."""
    payload = {"lamina": code_version(), "format": PIPELINE_FORMAT, "config": config}
    return hashlib.sha256(canonical(payload).encode()).hexdigest()[:16]


def chunk_id(
    dataset: str, doc_uri: str, doc_sha256: str, span: tuple[int, int], pipeline: str, model_sha256: str
) -> str:
    key = canonical([dataset, doc_uri, doc_sha256, list(span), pipeline, model_sha256])
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def manifest_id(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(manifest).encode()).hexdigest()


def chunks_digest(chunk_ids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(chunk_ids)).encode()).hexdigest()


def lineage_chain(row: ChunkLineage) -> list[tuple[str, str]]:
    """The chain from chunk to model, one (label, value) per link, for people."""
    versions = ", ".join(f"{row.dataset}@{seq}" for seq in row.versions) or "none kept (collected)"
    return [
        ("chunk", row.chunk_id),
        ("content sha256", row.content_sha256),
        ("dataset versions", versions),
        ("source", row.source_uri),
        ("bytes", f"{row.byte_start}-{row.byte_end}"),
        ("source file", row.source_file),
        ("source sha256", row.source_sha256),
        ("pipeline version", row.pipeline_version),
        ("embedding model", row.embedding_model),
        ("model sha256", row.embedding_sha256),
        ("ingest run", row.run_id),
        ("created", row.created_at.isoformat(timespec="seconds")),
    ]
