"""The stored traces' summaries (one row per kept trace) and the retention that bounds them.

:func:`list_traces` and :func:`read_summary` read the ``traces`` table (``lamina traces``, the doctor).
:class:`TraceRetention` deletes, oldest first, every trace beyond the age, count and byte limits, with its
spans and its ``replay_requests`` row (and the replay rows of traces the sampler dropped), in small
transactions (at most :data:`TRACES_PER_DELETE` traces each), so SQLite's write lock is never held long;
it runs on a thread of its own every ``interval_s``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypedDict

from sqlalchemy import Table, delete, func, select
from sqlalchemy.exc import SQLAlchemyError

from lamina.errors import StoreError
from lamina.store import Store, metadata, spans, traces

log = logging.getLogger(__name__)

#: the most traces one delete transaction removes
TRACES_PER_DELETE = 500
#: seconds after which a replay row whose trace was not kept is deleted
ORPHAN_REPLAY_S = 60.0


class TraceSummary(TypedDict):
    """One kept trace (the ``traces`` table's row); ``layers`` maps each layer to its milliseconds."""

    trace_id: str
    start_ns: int
    duration_ms: float
    #: ``ok`` or ``error`` (some span failed)
    status: str
    http_status: int | None
    route: str
    model: str
    layers: dict[str, float]
    bottleneck: str | None
    #: ``error``, ``slow`` or ``sampled``
    kept: str
    span_count: int
    size_bytes: int


def _summary(r: Any) -> TraceSummary:
    return TraceSummary(
        trace_id=r["trace_id"],
        start_ns=int(r["start_ns"]),
        duration_ms=float(r["duration_ms"]),
        status=r["status"],
        http_status=r["http_status"],
        route=r["route"],
        model=r["model"],
        layers={k: float(v) for k, v in dict(r["layers"] or {}).items()},
        bottleneck=r["bottleneck"],
        kept=r["kept"],
        span_count=int(r["span_count"]),
        size_bytes=int(r["size_bytes"]),
    )


def read_summary(store: Store, trace_id: str) -> TraceSummary | None:
    """The summary of one stored trace, or None when it was not kept (or is gone)."""
    with store.begin() as conn:
        row = conn.execute(select(traces).where(traces.c.trace_id == trace_id.lower())).mappings().first()
    return None if row is None else _summary(row)


def list_traces(
    store: Store,
    *,
    since_ns: int | None = None,
    until_ns: int | None = None,
    limit: int = 100,
    route: str | None = None,
    model: str | None = None,
    status: str | None = None,
) -> list[TraceSummary]:
    """Stored traces, newest first, filtered by start time (epoch ns), route, model (deployment), status."""
    query = select(traces).order_by(traces.c.start_ns.desc()).limit(limit)
    if since_ns is not None:
        query = query.where(traces.c.start_ns >= since_ns)
    if until_ns is not None:
        query = query.where(traces.c.start_ns < until_ns)
    if route is not None:
        query = query.where(traces.c.route == route)
    if model is not None:
        query = query.where(traces.c.model == model)
    if status is not None:
        query = query.where(traces.c.status == status)
    with store.begin() as conn:
        return [_summary(r) for r in conn.execute(query).mappings()]


@dataclass(frozen=True)
class RetentionPolicy:
    max_age_s: float = 7 * 86400.0
    max_traces: int = 50_000
    max_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class Pruned:
    """What one retention run deleted."""

    traces: int
    spans: int


class TraceRetention:
    """Deletes the oldest stored traces beyond the policy's limits (see the module doc)."""

    def __init__(
        self, store: Store, policy: RetentionPolicy, *, now_ns: Callable[[], int] = time.time_ns
    ) -> None:
        self.store = store
        self.policy = policy
        self._now_ns = now_ns
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        replay = metadata.tables.get("replay_requests")
        self._replay: Table | None = replay if replay is not None and "trace_id" in replay.c else None

    def _cutoff(self) -> int:
        """The newest root start (epoch ns) to delete up to, inclusive; -1: nothing beyond the limits."""
        p = self.policy
        cutoff = self._now_ns() - int(p.max_age_s * 1e9)
        with self.store.begin() as conn:
            by_count = conn.execute(
                select(traces.c.start_ns).order_by(traces.c.start_ns.desc()).offset(p.max_traces).limit(1)
            ).scalar()
            running = func.sum(traces.c.size_bytes).over(order_by=traces.c.start_ns.desc())
            sized = select(traces.c.start_ns, running.label("total")).subquery()
            by_size = conn.execute(
                select(func.max(sized.c.start_ns)).where(sized.c.total > p.max_bytes)
            ).scalar()
        for bound in (by_count, by_size):
            if bound is not None:
                cutoff = max(cutoff, int(bound))
        return cutoff

    def run_once(self) -> Pruned:
        """One pass: delete every trace beyond the limits (with its spans), oldest first."""
        cutoff = self._cutoff()
        removed_traces = removed_spans = 0
        while True:
            with self.store.begin() as conn:
                ids = list(
                    conn.execute(
                        select(traces.c.trace_id)
                        .where(traces.c.start_ns <= cutoff)
                        .order_by(traces.c.start_ns)
                        .limit(TRACES_PER_DELETE)
                    ).scalars()
                )
                if ids:
                    removed_spans += conn.execute(delete(spans).where(spans.c.trace_id.in_(ids))).rowcount
                    conn.execute(delete(traces).where(traces.c.trace_id.in_(ids)))
                    if self._replay is not None:
                        conn.execute(delete(self._replay).where(self._replay.c.trace_id.in_(ids)))
            removed_traces += len(ids)
            if len(ids) < TRACES_PER_DELETE:
                break
        removed_spans += self._orphans()
        self._orphan_replays()
        return Pruned(removed_traces, removed_spans)

    def _orphan_replays(self) -> None:
        """``replay_requests`` rows of traces the sampler dropped: written before the decision, so those
        without a ``traces`` row a minute later are deleted."""
        if self._replay is None or "created_at" not in self._replay.c:
            return
        replay = self._replay
        before = datetime.fromtimestamp(self._now_ns() / 1e9 - ORPHAN_REPLAY_S, UTC)
        kept = select(traces.c.trace_id).where(traces.c.trace_id == replay.c.trace_id).exists()
        with self.store.begin() as conn:
            conn.execute(delete(replay).where(replay.c.created_at < before, ~kept))

    def _orphans(self) -> int:
        """Spans older than the age limit whose trace has no summary (stored before 0011, or by hand)."""
        cutoff = self._now_ns() - int(self.policy.max_age_s * 1e9)
        removed = 0
        while True:
            with self.store.begin() as conn:
                ids = list(
                    conn.execute(
                        select(spans.c.span_id).where(spans.c.start_ns < cutoff).limit(TRACES_PER_DELETE * 4)
                    ).scalars()
                )
                if ids:
                    conn.execute(delete(spans).where(spans.c.span_id.in_(ids)))
            removed += len(ids)
            if len(ids) < TRACES_PER_DELETE * 4:
                return removed

    def start(self, interval_s: float) -> None:
        """Run :meth:`run_once` every ``interval_s`` seconds on a thread of its own until :meth:`stop`."""

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.run_once()
                except (StoreError, SQLAlchemyError) as exc:
                    log.warning("trace retention failed, next try in %.0f s: %s", interval_s, exc)
                except Exception:  # a bug here must not end retention for the process's life
                    log.exception("trace retention failed, next try in %.0f s", interval_s)

        self._thread = threading.Thread(target=loop, name="lamina-trace-retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10.0)
