"""Ingest runs in the metadata store: running, completed, unchanged, failed or abandoned.

A run is recorded when it starts, so one interrupted by a crash stays visible (``abandoned`` once the next
run of its dataset starts) instead of vanishing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, insert, select, update

from lamina.clock import Clock, utcnow
from lamina.data.vectors import check_dataset_name
from lamina.data.versions._records import IngestRun
from lamina.errors import ConflictError
from lamina.store import Store, datasets, ingest_runs


class IngestRuns:
    """The ingest runs of every dataset in a metadata ``store``."""

    def __init__(self, store: Store, *, clock: Clock = utcnow) -> None:
        self._store = store
        self._clock = clock

    def of(self, name: str) -> list[IngestRun]:
        """Ingest runs of dataset ``name``, newest first."""
        query = (
            select(ingest_runs)
            .where(ingest_runs.c.dataset == check_dataset_name(name))
            .order_by(ingest_runs.c.started_at.desc())
        )
        with self._store.begin() as conn:
            return [_run(row) for row in conn.execute(query)]

    def get(self, run_id: str) -> IngestRun | None:
        """The run ``run_id`` of any dataset, or None."""
        with self._store.begin() as conn:
            row = conn.execute(select(ingest_runs).where(ingest_runs.c.run_id == run_id)).first()
        return None if row is None else _run(row)

    def start(self, dataset: str, run_id: str, pid: int) -> int:
        """Record a running ingest; runs of ``dataset`` still marked running are abandoned (the caller
        holds the dataset's lock, so none of them is alive). Returns how many were.

        The first run of a dataset also records the dataset; one racing another for that (two hosts that
        bypassed the lock) fails whole and is tried once more, when the row is there.
        """
        try:
            return self._start(dataset, run_id, pid)
        except ConflictError:
            return self._start(dataset, run_id, pid)

    def _start(self, dataset: str, run_id: str, pid: int) -> int:
        now = self._clock()
        with self._store.begin() as conn:
            if conn.scalar(select(datasets.c.name).where(datasets.c.name == dataset)) is None:
                conn.execute(insert(datasets).values(name=dataset, created_at=now))
            abandoned = conn.execute(
                update(ingest_runs)
                .where(ingest_runs.c.dataset == dataset, ingest_runs.c.state == "running")
                .values(state="abandoned", finished_at=now, error="interrupted (process ended mid-run)")
            ).rowcount
            row = {"run_id": run_id, "dataset": dataset, "state": "running", "pid": pid, "started_at": now}
            conn.execute(insert(ingest_runs).values(**row, counts={}, skipped=[]))
        return int(abandoned or 0)

    def finish(
        self,
        run_id: str,
        state: str,
        *,
        counts: Mapping[str, int],
        skipped: Sequence[tuple[str, str]],
        error: str | None = None,
        version_seq: int | None = None,
        conn: Connection | None = None,
    ) -> None:
        """Record how run ``run_id`` ended; inside ``conn``'s transaction when given (a version commit)."""
        values: dict[str, Any] = {
            "state": state,
            "finished_at": self._clock(),
            "counts": dict(counts),
            "skipped": [list(s) for s in skipped],
            "error": error,
            "version_seq": version_seq,
        }
        statement = update(ingest_runs).where(ingest_runs.c.run_id == run_id).values(**values)
        if conn is not None:
            conn.execute(statement)
            return
        with self._store.begin() as own:
            own.execute(statement)


def _run(row: Any) -> IngestRun:
    return IngestRun(
        run_id=row.run_id,
        dataset=row.dataset,
        state=row.state,
        pid=row.pid,
        started_at=row.started_at,
        finished_at=row.finished_at,
        counts=dict(row.counts),
        skipped=[tuple(s) for s in row.skipped],
        error=row.error,
        version_seq=row.version_seq,
    )
