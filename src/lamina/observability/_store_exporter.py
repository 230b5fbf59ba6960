"""Spans kept in the metadata store, so a trace can be read back by its id without a tracing backend.

The exporter runs on the BatchSpanProcessor's thread: a failing store loses that batch (logged) and never
reaches the request path.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from sqlalchemy import select

from lamina.errors import StoreError
from lamina.store import Store, spans

log = logging.getLogger(__name__)

#: the span attribute that names the layer a span belongs to (also its own column in the store)
LAYER = "lamina.layer"


class SpanRow(TypedDict):
    """One span as the store holds it; ids are lowercase hex, times are epoch nanoseconds."""

    span_id: str
    trace_id: str
    parent_span_id: str | None
    name: str
    layer: str | None
    start_ns: int
    end_ns: int
    #: ``unset``, ``ok`` or ``error``
    status: str
    attributes: dict[str, Any]


def _plain(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    """Attributes as JSON-ready values: sequences become lists, str subclasses (enums) plain str."""
    out: dict[str, Any] = {}
    for key, value in (attributes or {}).items():
        if isinstance(value, tuple | list):
            out[key] = list(value)
        elif isinstance(value, str):
            out[key] = str(value)
        else:
            out[key] = value
    return out


def _row(span: ReadableSpan) -> dict[str, Any]:
    ctx = span.context
    assert ctx is not None  # an SDK span always has its context
    attributes = _plain(span.attributes)
    layer = attributes.get(LAYER)
    return {
        "span_id": format(ctx.span_id, "016x"),
        "trace_id": format(ctx.trace_id, "032x"),
        "parent_span_id": format(span.parent.span_id, "016x") if span.parent else None,
        "name": span.name[:200],
        "layer": str(layer) if layer is not None else None,
        "start_ns": span.start_time or 0,
        "end_ns": span.end_time or span.start_time or 0,
        "status": span.status.status_code.name.lower(),
        "attributes": attributes,
    }


class StoreSpanExporter(SpanExporter):
    """Writes finished spans to the ``spans`` table of a migrated store (the store stays the caller's)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def export(self, spans_: Sequence[ReadableSpan]) -> SpanExportResult:
        rows = [_row(s) for s in spans_]
        if not rows:
            return SpanExportResult.SUCCESS
        try:
            with self._store.begin() as conn:
                conn.execute(spans.insert(), rows)
        except StoreError as exc:
            log.warning("lost %d spans: %s", len(rows), exc.message)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to release: the store belongs to whoever built it."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def read_trace(store: Store, trace_id: str) -> list[SpanRow]:
    """Every stored span of one trace (its id as the ``x-lamina-trace-id`` header gives it), oldest first."""
    query = (
        select(spans).where(spans.c.trace_id == trace_id.lower()).order_by(spans.c.start_ns, spans.c.span_id)
    )
    with store.begin() as conn:
        result = conn.execute(query).mappings().all()
    return [
        SpanRow(
            span_id=r["span_id"],
            trace_id=r["trace_id"],
            parent_span_id=r["parent_span_id"],
            name=r["name"],
            layer=r["layer"],
            start_ns=int(r["start_ns"]),
            end_ns=int(r["end_ns"]),
            status=r["status"],
            attributes=dict(r["attributes"] or {}),
        )
        for r in result
    ]
