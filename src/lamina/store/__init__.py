"""The metadata store shared by every layer (a foundation, like config and errors)."""

from lamina.store._columns import UTCDateTime
from lamina.store._schema import (
    api_keys,
    budget_spend,
    chunk_lineage,
    cost_ledger,
    dataset_members,
    dataset_sources,
    dataset_tags,
    dataset_versions,
    datasets,
    drift_buckets,
    drift_reports,
    drift_samples,
    ingest_runs,
    metadata,
    model_aliases,
    model_versions,
    prompt_versions,
    spans,
)
from lamina.store._store import HeldLock, Store

__all__ = [
    "HeldLock",
    "Store",
    "UTCDateTime",
    "api_keys",
    "budget_spend",
    "chunk_lineage",
    "cost_ledger",
    "dataset_members",
    "dataset_sources",
    "dataset_tags",
    "dataset_versions",
    "datasets",
    "drift_buckets",
    "drift_reports",
    "drift_samples",
    "ingest_runs",
    "metadata",
    "model_aliases",
    "model_versions",
    "prompt_versions",
    "spans",
]
