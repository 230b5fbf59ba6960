"""The stored traces' summaries (one row per kept trace) and the retention that bounds them.

:func:`list_traces` and :func:`read_summary` read the ``traces`` table (``lamina traces``, the doctor).
:class:`TraceRetention` deletes, oldest first, every trace beyond the age, count and byte limits, with its
spans and its ``replay_requests`` row (and the replay rows of traces the sampler dropped), in transactions
of at most :data:`TRACES_PER_DELETE` traces; it runs on a thread of its own every ``interval_s``, and
sooner when the database grows fast. The spans' indexes on random ids (``span_id``, ``trace_id``) make any
delete of a few hundred traces touch nearly every page of them, so one large transaction holds SQLite's
write lock about as long as one small one and writes a fraction of the WAL that many small ones do.

The byte limit is on what the database measures (``_trace_size.py``: the trace tables' pages, indexes
included), not on an estimate from row sizes. When the tables pass :data:`PRUNE_AT` of it, the oldest
traces go until the rest would fill about :data:`PRUNE_TO` of it (bytes per trace: the tables' bytes over
their traces); the room left takes the writes until the next pass, and the pages freed are reused by them,
so the database stops growing. SQLite: while the measured bytes do not grow, freed pages are being reused
and nothing is deleted. PostgreSQL's tables never shrink (without ``VACUUM FULL``), so deleting whenever
they are above the mark would empty them: what they hold is the traces counted times the bytes a trace
took when the tables last grew (full then). The further past the mark they have grown (space freed in
them is never reused perfectly), the more room a pass leaves, so that they settle below the bound with
room for the writes between passes. After deleting, retention VACUUMs them so the space is reusable at
once rather than when autovacuum comes round, and again shortly while some transaction still sees the
deleted rows.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple, TypedDict

from sqlalchemy import Connection, Table, delete, func, select, text
from sqlalchemy.exc import SQLAlchemyError

from lamina.errors import StoreError
from lamina.observability._trace_size import TRACE_TABLES, dead_rows, stored_bytes, used_bytes
from lamina.store import Store, metadata, spans, traces

log = logging.getLogger(__name__)

#: the most traces one delete transaction removes (a pass deleting by size takes about 15% of the bound)
TRACES_PER_DELETE = 5000
#: the most orphan spans (see :meth:`TraceRetention._orphans`) one transaction removes
ORPHANS_PER_DELETE = 2000
#: seconds after which a replay row whose trace was not kept is deleted
ORPHAN_REPLAY_S = 60.0
#: the share of ``max_bytes`` above which retention deletes by size ...
PRUNE_AT = 0.85
#: ... and the share it deletes down to
PRUNE_TO = 0.7
#: seconds between two cheap growth probes of the background loop; a pass runs early when the database
#: grew by :data:`PROBE_GROWTH` of ``max_bytes`` since the last one
PROBE_S = 1.0
PROBE_GROWTH = 0.05
#: seconds to wait before VACUUMing again, each time, while the deleted rows are not yet reclaimable
VACUUM_RETRY_S = (0.1, 0.3, 1.0)
#: further passes a pass by size may run when the tables are past the bound again as it ends
REPASSES = 2


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
    """``max_bytes``: what the trace tables and their indexes may occupy in the database (measured)."""

    max_age_s: float = 7 * 86400.0
    max_traces: int = 50_000
    max_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class Pruned:
    """What one retention run deleted."""

    traces: int
    spans: int
    #: the trace tables' bytes at the last measurement (``_trace_size.stored_bytes``)
    stored_bytes: int = 0


class _Pass(NamedTuple):
    """What one pass deleted, and whether it deleted by size."""

    traces: int
    spans: int
    by_size: bool


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
        #: the trace tables' bytes at the last measurement (``_trace_size.stored_bytes``); None: not yet
        self.stored_bytes: int | None = None
        #: the cheap probe (``_trace_size.used_bytes``) at that measurement, and after the last pass
        self._anchor = 0
        self._probed = 0
        #: PostgreSQL's tables never shrink: what they hold is estimated from the bytes per trace they took
        #: when they last grew (full then); SQLite's are measured as they are
        self._sticky = store.engine.dialect.name == "postgresql"
        #: PostgreSQL may flush a transaction's statistics at once (None: not asked yet; see _counted)
        self._flushable: bool | None = None
        self._per_trace: float | None = None
        #: the last run ended past the bound (SQLite, its re-passes spent): the next probe runs again
        self._past = False

    def _cutoff(self) -> tuple[int, bool]:
        """The newest root start (epoch ns) to delete up to, inclusive (-1: nothing beyond the limits), and
        whether the byte limit asked for the deletion."""
        p = self.policy
        cutoff = self._now_ns() - int(p.max_age_s * 1e9)
        newest_first = select(traces.c.start_ns).order_by(traces.c.start_ns.desc())
        with self.store.begin() as conn:
            by_count = conn.execute(newest_first.offset(p.max_traces).limit(1)).scalar()
            excess = self._excess(conn)
            by_size = None
            if excess:
                oldest_first = select(traces.c.start_ns).order_by(traces.c.start_ns)
                by_size = conn.execute(oldest_first.offset(excess - 1).limit(1)).scalar()
        for bound in (by_count, by_size):
            if bound is not None:
                cutoff = max(cutoff, int(bound))
        return cutoff, by_size is not None

    def _excess(self, conn: Connection) -> int:
        """How many of the oldest traces the byte limit wants gone (see the module doc). The page walk of
        :func:`stored_bytes` runs only when the last one plus the database's growth since (the cheap
        probe) passes the mark, or when pages were freed since (the estimate would no longer bound it)."""
        limit, last, used = self.policy.max_bytes, self.stored_bytes, used_bytes(conn)
        if last is not None and used >= self._anchor and last + used - self._anchor <= PRUNE_AT * limit:
            return 0
        measured = stored_bytes(conn)
        self.stored_bytes, self._anchor = measured, used
        grew = last is None or measured > last
        if measured <= PRUNE_AT * limit or not (grew or self._sticky):
            return 0  # under the mark, or (SQLite) not growing: the pages freed earlier are being reused
        n = int(conn.execute(select(func.count()).select_from(traces)).scalar_one())
        if n == 0:
            return 0
        if grew or self._per_trace is None:  # growing: the tables are full, so this is what a trace takes
            self._per_trace = measured / n
        occupied = n * self._per_trace if self._sticky else measured
        if occupied <= PRUNE_AT * limit:
            return 0
        target = PRUNE_TO * limit
        if self._sticky:  # grown past the mark for good: leave more room, as much more as they grew past it
            target *= PRUNE_AT * limit / measured
        return min(n, math.ceil(n - target / self._per_trace))

    def run_once(self) -> Pruned:
        """One pass: delete every trace beyond the limits (with its spans), oldest first. On SQLite, a pass
        by size that finds the tables past the bound again when it ends (written to while it deleted, faster
        than the probe could see) runs again, at most :data:`REPASSES` times; still past it then, the next
        run measures afresh (else, with no growth since, it would find nothing to do)."""
        done = self._pass()
        for _ in range(REPASSES):
            if self._sticky or not done.by_size or (self.stored_bytes or 0) <= self.policy.max_bytes:
                break
            self.stored_bytes = None  # what the pass left is growth: measured afresh
            more = self._pass()
            done = _Pass(done.traces + more.traces, done.spans + more.spans, more.by_size)
        stored = self.stored_bytes or 0
        self._past = not self._sticky and stored > self.policy.max_bytes
        if self._past:  # its re-passes spent: the next run (the next probe's) measures afresh
            self.stored_bytes = None
        return Pruned(done.traces, done.spans, stored)

    def _pass(self) -> _Pass:
        cutoff, by_size = self._cutoff()
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
                    self._counted(conn)
            removed_traces += len(ids)
            if len(ids) < TRACES_PER_DELETE:
                break
        removed_spans += self._orphans()
        self._orphan_replays()
        if by_size and removed_traces:
            self._reclaim()
        with self.store.begin() as conn:
            self._probed = used_bytes(conn)
            if by_size and removed_traces:  # "grew" (_excess): from what the pass left
                self.stored_bytes, self._anchor = stored_bytes(conn), self._probed
        return _Pass(removed_traces, removed_spans, bool(by_size and removed_traces))

    def _reclaim(self) -> None:
        """After deleting by size. PostgreSQL: VACUUM, so the deleted rows' space is reusable now rather than
        when autovacuum comes round. SQLite (which reuses freed pages by itself): a checkpoint that empties
        the WAL, which the deletions filled and which, with the writer and readers never idle together,
        the automatic checkpoints could not restart (it grew past the bound in bench/tracing_overhead.py)."""
        if self.store.engine.dialect.name == "postgresql":
            self._vacuum()
            return
        with self.store.begin() as conn:
            conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))

    def _counted(self, conn: Connection) -> None:
        """PostgreSQL 15+: the rows this transaction deleted reach the server's statistics when it commits,
        not up to a second later. The VACUUM after it reads them (``dead_rows``), and a late flush would add
        them back to ``n_dead_tup`` after the VACUUM reclaimed them. ``pg_stat_force_next_flush`` is a
        superuser's unless granted (``GRANT EXECUTE``); without it the statistics lag as before."""
        if not self._sticky:
            return
        if self._flushable is None:
            allowed = "SELECT has_function_privilege('pg_catalog.pg_stat_force_next_flush()', 'EXECUTE')"
            version = conn.dialect.server_version_info or (0,)
            self._flushable = version >= (15,) and bool(conn.execute(text(allowed)).scalar())
        if self._flushable:
            conn.execute(text("SELECT pg_stat_force_next_flush()"))

    def _vacuum(self) -> None:
        """PostgreSQL: VACUUM the trace tables, and again after a short wait while the rows just deleted are
        still visible to some transaction (an autovacuum's ANALYZE, a long dashboard query): VACUUM cannot
        reclaim them until it ends, and the writes meanwhile would grow the tables instead of reusing them.
        A snapshot held longer than the waits is left to the next pass."""
        engine = self.store.engine.execution_options(isolation_level="AUTOCOMMIT")
        for wait_s in (*VACUUM_RETRY_S, None):
            with engine.connect() as conn:
                conn.execute(text(f"VACUUM {', '.join(TRACE_TABLES)}"))
                if not dead_rows(conn):
                    return
            if wait_s is None or self._stop.wait(wait_s):  # retention stopping: no more tries
                return

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
                        select(spans.c.span_id).where(spans.c.start_ns < cutoff).limit(ORPHANS_PER_DELETE)
                    ).scalars()
                )
                if ids:
                    conn.execute(delete(spans).where(spans.c.span_id.in_(ids)))
                    self._counted(conn)
            removed += len(ids)
            if len(ids) < ORPHANS_PER_DELETE:
                return removed

    def start(self, interval_s: float) -> None:
        """Run :meth:`run_once` every ``interval_s`` seconds on a thread of its own until :meth:`stop`, and
        sooner when a probe every :data:`PROBE_S` finds the database grown by :data:`PROBE_GROWTH` of the
        byte limit (a burst of errors fills it faster than a long interval would catch) or the last run
        ended past the bound."""

        def loop() -> None:
            due = time.monotonic() + interval_s
            while not self._stop.wait(min(interval_s, PROBE_S)):
                try:
                    if time.monotonic() >= due or self._past or self._grew():
                        due = time.monotonic() + interval_s
                        self.run_once()
                except (StoreError, SQLAlchemyError) as exc:
                    log.warning("trace retention failed, next try in %.0f s: %s", interval_s, exc)
                except Exception:  # a bug here must not end retention for the process's life
                    log.exception("trace retention failed, next try in %.0f s", interval_s)

        self._thread = threading.Thread(target=loop, name="lamina-trace-retention", daemon=True)
        self._thread.start()

    def _grew(self) -> bool:
        with self.store.begin() as conn:
            return used_bytes(conn) - self._probed >= PROBE_GROWTH * self.policy.max_bytes

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10.0)
