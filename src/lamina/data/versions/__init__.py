"""Dataset versions: the catalog of immutable versions and tags, chunk lineage, ingest runs, gc.

Imports only ``lamina.data.vectors`` among the data layer's sub-packages.
"""

from lamina.data.versions._catalog import DatasetCatalog
from lamina.data.versions._gc import collect_garbage
from lamina.data.versions._lineage import (
    chunk_id,
    chunks_digest,
    code_version,
    lineage_chain,
    manifest_id,
    pipeline_version,
)
from lamina.data.versions._records import (
    ChunkLineage,
    Collected,
    DatasetVersion,
    IngestRun,
    NewVersion,
    PinnedVersion,
    SourceRecord,
    VersionDiff,
)
from lamina.data.versions._runs import IngestRuns

__all__ = [
    "ChunkLineage",
    "Collected",
    "DatasetCatalog",
    "DatasetVersion",
    "IngestRun",
    "IngestRuns",
    "NewVersion",
    "PinnedVersion",
    "SourceRecord",
    "VersionDiff",
    "chunk_id",
    "chunks_digest",
    "code_version",
    "collect_garbage",
    "lineage_chain",
    "manifest_id",
    "pipeline_version",
]
