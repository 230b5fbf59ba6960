"""Vector-store upkeep around the interface: which chunks it holds, indexes, the dataset lock, gc."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from lamina.data._dataset_records import Collected
from lamina.data._datasets import DatasetCatalog
from lamina.data._lancedb import LanceDBStore
from lamina.data._pgvector import PgVectorStore
from lamina.data._vectors import (
    MIN_INDEX_ROWS,
    ExactIndex,
    GraphIndex,
    HnswIndex,
    IndexParams,
    VectorStore,
    check_dataset_name,
)
from lamina.errors import ConflictError

_LOOKUP_BATCH = 2000


def present_ids(store: VectorStore, dataset: str, chunk_ids: Sequence[str]) -> set[str]:
    """The ids among ``chunk_ids`` whose chunks ``store`` holds for ``dataset``."""
    found: set[str] = set()
    if store.count(dataset) == 0:
        return found
    for start in range(0, len(chunk_ids), _LOOKUP_BATCH):
        found |= {c.chunk_id for c in store.get(dataset, chunk_ids[start : start + _LOOKUP_BATCH])}
    return found


def default_index(store: VectorStore, rows: int) -> IndexParams:
    """Exact search below ``MIN_INDEX_ROWS`` chunks; above, the graph index (pgvector's own HNSW index when
    the store has no graph directory)."""
    if rows < MIN_INDEX_ROWS:
        return ExactIndex()
    if isinstance(store, LanceDBStore):
        return GraphIndex()
    if isinstance(store, PgVectorStore):
        return HnswIndex() if store.graphs is None else GraphIndex()
    return ExactIndex()


def build_index(store: VectorStore, dataset: str) -> IndexParams:
    """Rebuild the dataset's indexes after a write (LanceDB also sweeps dead postings and compacts)."""
    return store.build_index(dataset, default_index(store, store.count(dataset)))


@contextmanager
def dataset_lock(lock_dir: Path, dataset: str) -> Iterator[None]:
    """Hold the dataset's lock file, or raise ConflictError if another process holds it."""
    import fcntl

    lock_dir.mkdir(parents=True, exist_ok=True)
    with (lock_dir / f"{dataset}.lock").open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConflictError(
                f"another ingest or gc of dataset {dataset!r} is running; wait for it to finish"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def collect_garbage(
    catalog: DatasetCatalog, vectors: VectorStore, lock_dir: Path, dataset: str, keep: int
) -> Collected:
    """Forget old versions and delete the vectors only they held, under the dataset's lock.

    Also deletes vectors no version lists at all: those an interrupted ingest wrote (and the next ingest
    did not reuse), and those a crash between this function's two steps left behind. The metadata goes
    first, so a crash leaves such vectors, never a version whose vectors are gone. The lock keeps any
    ingest out, so no run's not-yet-committed chunks are taken for orphans.
    """
    with dataset_lock(lock_dir, check_dataset_name(dataset)):
        collected = catalog.collect(dataset, keep)
        listed = catalog.live_chunk_ids(dataset) | set(collected.chunk_ids)
        orphans = sorted(set(vectors.chunk_ids(dataset)) - listed)
        doomed = [*collected.chunk_ids, *orphans]
        if doomed:
            vectors.delete(dataset, doomed)
            build_index(vectors, dataset)
    return replace(collected, chunk_ids=doomed, orphans=len(orphans))
