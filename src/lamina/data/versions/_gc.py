"""Garbage collection: forget old versions, then delete the vectors no kept version holds."""

from __future__ import annotations

from dataclasses import replace

from lamina.data.vectors import VectorStore, check_dataset_name
from lamina.data.versions._catalog import DatasetCatalog
from lamina.data.versions._records import Collected


def collect_garbage(catalog: DatasetCatalog, vectors: VectorStore, dataset: str, keep: int) -> Collected:
    """Forget old versions and delete the vectors only they held, under the dataset's lock.

    Also deletes vectors no version lists at all: those an interrupted ingest wrote (and the next ingest
    did not reuse), and those a crash between this function's two steps left behind. The metadata goes
    first, so a crash leaves such vectors, never a version whose vectors are gone. The lock (held across
    hosts when the metadata store is PostgreSQL) keeps every ingest out, so no run's not-yet-committed
    chunks, new or reused, are taken for orphans.
    """
    with catalog.lock(check_dataset_name(dataset)) as held:
        collected = catalog.collect(dataset, keep)
        listed = catalog.live_chunk_ids(dataset) | set(collected.chunk_ids)
        orphans = sorted(set(vectors.chunk_ids(dataset)) - listed)
        doomed = [*collected.chunk_ids, *orphans]
        if doomed:
            held.check()  # an ingest elsewhere may have taken a lost lock and be reusing "orphans"
            vectors.delete(dataset, doomed)
            vectors.reindex(dataset)
    return replace(collected, chunk_ids=doomed, orphans=len(orphans))
