"""Stored traces read back: one line per trace (``lamina traces``), one trace as a tree (``lamina trace``).

A trace is the spans that share a ``trace_id``; its root is the span without a parent (the gateway's
request span). Where its time went is counted per layer as *self time*: a span's duration less the part
covered by its children, so a dispatch span that waits on an engine span counts only its own overhead and
the engine's time goes to the models layer. The layer with the most self time is the trace's bottleneck.

These read the ``spans`` table directly (a list query joins root spans to their trace's other spans in
one query per page), so they work with or without a running stack.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from lamina.observability._store_exporter import SpanRow, read_trace, span_rows
from lamina.store import Store, spans

#: the most spans read for one listing (a guard against a runaway query on a huge window)
MAX_SPANS_READ = 200_000


@dataclass(frozen=True)
class TraceLine:
    """One request's trace in a line: when, how long, what, and where its time went."""

    trace_id: str
    start: datetime
    duration_ms: float
    #: ``http.route`` of the root span (``/v1/chat/completions``), else its name
    route: str
    #: the model asked for (``gen_ai.request.model``), else the deployment; "" when neither was recorded
    model: str
    #: the HTTP status of the answer (0: not recorded), and whether any span failed
    status: int
    error: bool
    #: self time per layer, milliseconds
    layers_ms: dict[str, float] = field(default_factory=dict)
    #: the layer with the most self time ("" for a trace without layered spans)
    bottleneck: str = ""
    #: milliseconds of the steps the doctor looks at (see :func:`stage_times_ms`)
    stages_ms: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "trace_id": self.trace_id,
            "start": self.start.isoformat(),
            "duration_ms": round(self.duration_ms, 3),
            "route": self.route,
            "model": self.model,
            "status": self.status,
            "error": self.error,
            "layers_ms": {k: round(v, 3) for k, v in sorted(self.layers_ms.items())},
            "bottleneck": self.bottleneck,
            "stages_ms": {k: round(v, 3) for k, v in sorted(self.stages_ms.items())},
        }

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> TraceLine:
        """The line :meth:`to_json` wrote (a gateway's ``/admin/v1/traces`` answer)."""
        return cls(
            str(body["trace_id"]),
            datetime.fromisoformat(body["start"]),
            float(body["duration_ms"]),
            str(body["route"]),
            str(body["model"]),
            int(body["status"]),
            bool(body["error"]),
            {str(k): float(v) for k, v in body.get("layers_ms", {}).items()},
            str(body.get("bottleneck", "")),
            {str(k): float(v) for k, v in body.get("stages_ms", {}).items()},
        )


@dataclass(frozen=True)
class TreeSpan:
    """A span placed in its trace's tree: its depth, and its times relative to the trace's start."""

    span: SpanRow
    depth: int
    offset_ms: float
    duration_ms: float

    def to_json(self) -> dict[str, Any]:
        s = self.span
        return {
            "span_id": s["span_id"],
            "parent_span_id": s["parent_span_id"],
            "name": s["name"],
            "layer": s["layer"],
            "depth": self.depth,
            "offset_ms": round(self.offset_ms, 3),
            "duration_ms": round(self.duration_ms, 3),
            "status": s["status"],
            "attributes": s["attributes"],
        }

    @classmethod
    def from_json(cls, body: Mapping[str, Any], trace: TraceLine) -> TreeSpan:
        """The span :meth:`to_json` wrote, in ``trace`` (its times placed from the trace's start)."""
        start_ns = int(trace.start.timestamp() * 1e9 + float(body["offset_ms"]) * 1e6)
        row = SpanRow(
            span_id=str(body["span_id"]),
            trace_id=trace.trace_id,
            parent_span_id=body.get("parent_span_id"),
            name=str(body["name"]),
            layer=body.get("layer"),
            start_ns=start_ns,
            end_ns=start_ns + int(float(body["duration_ms"]) * 1e6),
            status=str(body["status"]),
            attributes=dict(body.get("attributes") or {}),
        )
        return cls(row, int(body["depth"]), float(body["offset_ms"]), float(body["duration_ms"]))


def _covered_ns(intervals: Iterable[tuple[int, int]]) -> int:
    """The length of the union of ``intervals``."""
    total, end = 0, None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def layer_times_ms(rows: Sequence[SpanRow]) -> dict[str, float]:
    """Self time per layer in milliseconds: each span's duration less what its children cover (clipped
    to the span). Spans without a layer count under their nearest layered ancestor."""
    by_id = {r["span_id"]: r for r in rows}
    children: dict[str, list[SpanRow]] = defaultdict(list)
    for r in rows:
        if r["parent_span_id"] in by_id:
            children[r["parent_span_id"]].append(r)
    out: dict[str, float] = defaultdict(float)
    for r in rows:
        start, end = r["start_ns"], max(r["end_ns"], r["start_ns"])
        inner = [(max(c["start_ns"], start), min(c["end_ns"], end)) for c in children[r["span_id"]]]
        own = (end - start) - _covered_ns((a, b) for a, b in inner if b > a)
        layer = _layer_of(r, by_id)
        if layer is not None:
            out[layer] += own / 1e6
    return dict(out)


def _layer_of(row: SpanRow, by_id: dict[str, SpanRow]) -> str | None:
    seen = 0
    node: SpanRow | None = row
    while node is not None and seen < 64:
        if node["layer"]:
            return node["layer"]
        node = by_id.get(node["parent_span_id"] or "")
        seen += 1
    return None


#: spans whose durations are a named step: ``queue`` (waiting for a replica's engine), ``engine``,
#: ``retrieve`` (data), ``dispatch`` (orchestration, retries included), ``guards`` (input/output guards)
STAGES = ("queue", "engine", "retrieve", "dispatch", "guards")


def stage_times_ms(rows: Sequence[SpanRow]) -> dict[str, float]:
    """Milliseconds per step of one trace (only the steps it has). A replica's queue wait is its
    ``queue`` span, else the ``lamina.queue_ms`` its engine span reports; ``engine`` is the engine's
    time after the queue (a ``queue`` span inside the engine span is taken out of it)."""
    out: dict[str, float] = defaultdict(float)
    engines = {r["span_id"] for r in rows if r["name"] == "engine"}
    queue_reported = queued_inside = 0.0
    for r in rows:
        name = r["name"]
        stage = "guards" if name.startswith("guards") else name
        ms = (r["end_ns"] - r["start_ns"]) / 1e6
        if stage in STAGES:
            out[stage] += ms
        if name == "queue" and r["parent_span_id"] in engines:
            queued_inside += ms
        reported = r["attributes"].get("lamina.queue_ms")
        if name == "engine" and isinstance(reported, int | float) and not isinstance(reported, bool):
            queue_reported += float(reported)
    if "queue" not in out and queue_reported:
        out["queue"] = queue_reported
    if "engine" in out:
        out["engine"] = max(0.0, out["engine"] - queued_inside)
    return dict(out)


def bottleneck_of(layers_ms: dict[str, float]) -> str:
    """The layer with the most self time; ties go to the lower layer name alphabetically (stable)."""
    if not layers_ms:
        return ""
    return max(sorted(layers_ms), key=lambda layer: layers_ms[layer])


def _root(rows: Sequence[SpanRow]) -> SpanRow:
    ids = {r["span_id"] for r in rows}
    roots = [r for r in rows if r["parent_span_id"] not in ids]
    return min(roots or rows, key=lambda r: (r["start_ns"], -r["end_ns"]))


def summarize(rows: Sequence[SpanRow]) -> TraceLine:
    """The summary of one trace from its spans (at least one)."""
    root = _root(rows)
    attrs = root["attributes"]
    start_ns = min(r["start_ns"] for r in rows)
    end_ns = max(r["end_ns"] for r in rows)
    layers = layer_times_ms(rows)
    status = attrs.get("http.response.status_code")
    model = attrs.get("gen_ai.request.model") or attrs.get("lamina.deployment") or ""
    return TraceLine(
        trace_id=root["trace_id"],
        start=datetime.fromtimestamp(start_ns / 1e9, UTC),
        duration_ms=(end_ns - start_ns) / 1e6,
        route=str(attrs.get("http.route") or root["name"]),
        model=str(model),
        status=status if isinstance(status, int) else 0,
        error=any(r["status"] == "error" for r in rows),
        layers_ms=layers,
        bottleneck=bottleneck_of(layers),
        stages_ms=stage_times_ms(rows),
    )


def tree(rows: Sequence[SpanRow]) -> list[TreeSpan]:
    """The spans of one trace in depth-first order (children by start time), each with its depth."""
    if not rows:
        return []
    ids = {r["span_id"] for r in rows}
    children: dict[str | None, list[SpanRow]] = defaultdict(list)
    for r in rows:
        children[r["parent_span_id"] if r["parent_span_id"] in ids else None].append(r)
    start_ns = min(r["start_ns"] for r in rows)
    out: list[TreeSpan] = []
    stack: list[tuple[SpanRow, int]] = [
        (r, 0) for r in sorted(children[None], key=lambda r: r["start_ns"], reverse=True)
    ]
    while stack:
        row, depth = stack.pop()
        out.append(
            TreeSpan(row, depth, (row["start_ns"] - start_ns) / 1e6, (row["end_ns"] - row["start_ns"]) / 1e6)
        )
        kids = sorted(children[row["span_id"]], key=lambda r: r["start_ns"], reverse=True)
        stack.extend((k, depth + 1) for k in kids)
    return out


def recent_traces(store: Store, since: datetime, limit: int = 50) -> list[TraceLine]:
    """The newest traces (at most ``limit``) whose root span started at or after ``since``, newest first."""
    since_ns = int(since.timestamp() * 1e9)
    roots = (
        select(spans.c.trace_id)
        .where(spans.c.parent_span_id.is_(None), spans.c.start_ns >= since_ns)
        .order_by(spans.c.start_ns.desc())
        .limit(limit)
    )
    with store.begin() as conn:
        ids = [r[0] for r in conn.execute(roots)]
        if not ids:
            return []
        query = select(spans).where(spans.c.trace_id.in_(ids)).limit(MAX_SPANS_READ)
        rows = span_rows(conn.execute(query).mappings())
    grouped: dict[str, list[SpanRow]] = defaultdict(list)
    for row in rows:
        grouped[row["trace_id"]].append(row)
    summaries = [summarize(grouped[i]) for i in ids if grouped.get(i)]
    return sorted(summaries, key=lambda s: s.start, reverse=True)


def trace_json(store: Store, trace_id: str) -> dict[str, Any] | None:
    """One trace as JSON (its summary and its spans as a tree); None when no span of it is stored."""
    rows = read_trace(store, trace_id)
    if not rows:
        return None
    return {**summarize(rows).to_json(), "spans": [t.to_json() for t in tree(rows)]}
