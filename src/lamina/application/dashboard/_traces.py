"""Traces for the dashboard, read from the metadata store's ``spans`` table.

The root span of a request (no parent) stands for its trace in the list. Where a request's time went is
each span's *self time* (its duration less its children's), summed per layer: a parent's span covers its
children, so summing whole durations would count the same milliseconds once per level.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from sqlalchemy import func, select

from lamina.application.dashboard._ports import SpanView, TraceSummary
from lamina.observability import read_trace
from lamina.store import Store, spans

#: the most spans one breakdown reads (newest first): bounded work whatever the traffic
_MAX_SPANS = 20_000


class StoreTraces:
    """A :class:`~lamina.application.dashboard.TraceSource` over the spans this stack stored."""

    def __init__(self, store: Store, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self._store = store
        self._clock_ns = clock_ns

    def recent(self, limit: int) -> list[TraceSummary]:
        c = spans.c
        roots = select(spans).where(c.parent_span_id.is_(None)).order_by(c.start_ns.desc()).limit(limit)
        with self._store.begin() as conn:
            rows = conn.execute(roots).mappings().all()
            ids = [r["trace_id"] for r in rows]
            counts: dict[str, int] = dict(
                conn.execute(
                    select(c.trace_id, func.count()).where(c.trace_id.in_(ids)).group_by(c.trace_id)
                ).all()
            )
        return [
            TraceSummary(
                trace_id=r["trace_id"],
                name=r["name"],
                started=datetime.fromtimestamp(r["start_ns"] / 1e9, UTC),
                duration_ms=round((r["end_ns"] - r["start_ns"]) / 1e6, 2),
                status=r["status"],
                spans=int(counts.get(r["trace_id"], 1)),
                model=_text((r["attributes"] or {}).get("lamina.deployment")),
            )
            for r in rows
        ]

    def spans(self, trace_id: str) -> list[SpanView]:
        return [
            SpanView(
                span_id=r["span_id"],
                parent_span_id=r["parent_span_id"],
                name=r["name"],
                layer=r["layer"],
                start_ns=r["start_ns"],
                end_ns=r["end_ns"],
                status=r["status"],
                attributes=dict(r["attributes"]),
            )
            for r in read_trace(self._store, trace_id)
        ]

    def layer_ms(self, window_s: float) -> dict[str, float]:
        since = self._clock_ns() - int(window_s * 1e9)
        c = spans.c
        query = (
            select(c.span_id, c.parent_span_id, c.layer, c.start_ns, c.end_ns)
            .where(c.start_ns >= since)
            .order_by(c.start_ns.desc())
            .limit(_MAX_SPANS)
        )
        with self._store.begin() as conn:
            rows = conn.execute(query).all()
        return self_time_by_layer(
            [(r.span_id, r.parent_span_id, r.layer, int(r.start_ns), int(r.end_ns)) for r in rows]
        )


def self_time_by_layer(rows: Sequence[tuple[str, str | None, str | None, int, int]]) -> dict[str, float]:
    """Milliseconds per layer of ``(span_id, parent_id, layer, start_ns, end_ns)`` rows, each span counted
    for its duration less its children's (never below zero), largest first."""
    children: dict[str, int] = defaultdict(int)
    for _, parent, _, start, end in rows:
        if parent is not None:
            children[parent] += max(0, end - start)
    totals: dict[str, float] = defaultdict(float)
    for span_id, _, layer, start, end in rows:
        own = max(0, (end - start) - children.get(span_id, 0))
        totals[layer or "unknown"] += own / 1e6
    return {k: round(v, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None
