"""Spans kept in the metadata store, so a trace can be read back by its id without a tracing backend.

:class:`SpanWriter` is the path kept traces take (see ``_keeper.py``): a thread of its own that turns
spans into rows and writes them with multi-row INSERTs (``insert_rows``), in transactions of at most
:data:`ROWS_PER_TRANSACTION` spans, so SQLite's write lock is only ever held for a few milliseconds and
the event loop's own reads and writes (keys, budgets) never wait long behind it. Each trace also gets
its row in ``traces`` (its per-layer breakdown, for listing and retention). A failing store loses that
batch (logged) and never reaches the request path; a writer that falls behind drops whole traces
(counted in :attr:`SpanWriter.dropped`) rather than hold memory without bound.

:class:`StoreSpanExporter` is the same rows as a plain OpenTelemetry exporter (every span it is given).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypedDict

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from lamina.errors import InvalidRequestError, StoreError
from lamina.observability._breakdown import Timed, breakdown
from lamina.observability._sampling import Kept
from lamina.store import Store, insert_rows, spans, traces

log = logging.getLogger(__name__)

#: the span attribute that names the layer a span belongs to (also its own column in the store)
LAYER = "lamina.layer"
#: the most span rows one transaction inserts
ROWS_PER_TRANSACTION = 400
#: the fixed part of a span row's size estimate (ids, name, times, status, three index entries): with it
#: the estimate matches the SQLite file's growth per span (bench/tracing_overhead.py measured ~380 bytes)
_ROW_OVERHEAD = 280


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


def _size(row: Mapping[str, Any]) -> int:
    """About how many bytes ``row`` takes in the store (its attributes as JSON, plus a fixed part)."""
    attrs = row["attributes"]
    return _ROW_OVERHEAD + len(row["name"]) + sum(len(k) + len(str(v)) + 6 for k, v in attrs.items())


def _summary(root: ReadableSpan, rows: Sequence[Mapping[str, Any]], kept: Kept, size: int) -> dict[str, Any]:
    """The ``traces`` row of a kept trace whose root is ``root`` and spans are ``rows``."""
    assert root.context is not None
    root_id = format(root.context.span_id, "016x")
    root_row = next(r for r in rows if r["span_id"] == root_id)
    attrs = root_row["attributes"]
    timings: list[Timed] = []
    for r in rows:
        parent = r["parent_span_id"]
        timings.append(
            Timed(
                int(r["span_id"], 16),
                int(parent, 16) if parent else None,
                r["layer"],
                r["start_ns"],
                r["end_ns"],
            )
        )
    result = breakdown(timings, int(root_row["span_id"], 16), root_row["end_ns"])
    status = attrs.get("http.response.status_code")
    error = any(r["status"] == "error" for r in rows)
    return {
        "trace_id": root_row["trace_id"],
        "start_ns": root_row["start_ns"],
        "duration_ms": round((root_row["end_ns"] - root_row["start_ns"]) / 1e6, 3),
        "status": "error" if error else "ok",
        "http_status": int(status) if isinstance(status, int) else None,
        "route": str(attrs.get("http.route") or root_row["name"])[:100],
        "model": str(attrs.get("lamina.deployment") or "")[:200],
        "layers": result.layers,
        "bottleneck": result.bottleneck,
        "kept": kept.value,
        "span_count": len(rows),
        "size_bytes": size,
    }


def _insert(store: Store, span_rows: list[dict[str, Any]], trace_rows: list[dict[str, Any]]) -> None:
    """Span rows in transactions of at most :data:`ROWS_PER_TRANSACTION`; the trace rows with the last."""
    for at in range(0, max(len(span_rows), 1), ROWS_PER_TRANSACTION):
        chunk = span_rows[at : at + ROWS_PER_TRANSACTION]
        last = at + ROWS_PER_TRANSACTION >= len(span_rows)
        with store.begin() as conn:
            if chunk:
                insert_rows(conn, spans, chunk)
            if last and trace_rows:
                insert_rows(conn, traces, trace_rows)


_STOP = object()
#: ends the writer's wait for more traces: a flush writes what is queued now
_FLUSH = object()


class SpanWriter:
    """Writes kept traces to the store from a thread of its own (see the module doc)."""

    def __init__(self, store: Store, *, max_queued: int = 2000, linger_s: float = 1.0) -> None:
        self._store = store
        self._linger_s = linger_s
        self._queue: queue.Queue[object] = queue.Queue(max_queued)
        self._idle = threading.Condition()
        self._pending = 0
        #: spans of traces dropped because the writer fell behind, and of batches the store refused
        self.dropped = 0
        self.lost = 0
        self._thread = threading.Thread(target=self._run, name="lamina-span-writer", daemon=True)
        self._thread.start()

    def put(self, root: ReadableSpan, spans_: Sequence[ReadableSpan], kept: Kept) -> None:
        """Queue one kept trace (called on the request path: never blocks)."""
        with self._idle:
            self._pending += 1
        try:
            self._queue.put_nowait((root, spans_, kept))
        except queue.Full:
            self.dropped += len(spans_)
            self._done(1)

    def _done(self, n: int) -> None:
        with self._idle:
            self._pending -= n
            if self._pending <= 0:
                self._idle.notify_all()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if item is _FLUSH:
                continue
            batch, stop = [item], False
            # a moment for more traces: at the default sampling (2 a second) one transaction a second
            until = time.monotonic() + self._linger_s
            while len(batch) < 200 and not stop:
                try:
                    more = self._queue.get(timeout=max(until - time.monotonic(), 0.0))
                except queue.Empty:
                    break
                if more is _FLUSH:
                    break
                stop = more is _STOP
                if not stop:
                    batch.append(more)
            self._write(batch)
            if stop:
                return

    def _write(self, batch: list[Any]) -> None:
        span_rows: list[dict[str, Any]] = []
        trace_rows: list[dict[str, Any]] = []
        try:
            for root, spans_, kept in batch:
                rows = [_row(s) for s in spans_]
                size = sum(_size(r) for r in rows)
                span_rows.extend(rows)
                trace_rows.append(_summary(root, rows, kept, size))
            _insert(self._store, span_rows, trace_rows)
        except (StoreError, SQLAlchemyError) as exc:
            self.lost += len(span_rows)
            log.warning("lost %d spans of %d traces: %s", len(span_rows), len(batch), exc)
        except Exception:  # a bug here must not end the writer for the process's life
            self.lost += len(span_rows)
            log.exception("lost %d spans of %d traces", len(span_rows), len(batch))
        finally:
            self._done(len(batch))

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every trace queued so far is written (or lost); False on timeout."""
        with contextlib.suppress(queue.Full):  # full: the writer is not lingering anyway
            self._queue.put_nowait(_FLUSH)
        with self._idle:
            return self._idle.wait_for(lambda: self._pending <= 0, timeout_s)

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued, then stop the thread."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout_s)


class StoreSpanExporter(SpanExporter):
    """Writes finished spans to the ``spans`` table of a migrated store (the store stays the caller's)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def export(self, spans_: Sequence[ReadableSpan]) -> SpanExportResult:
        rows = [_row(s) for s in spans_]
        if not rows:
            return SpanExportResult.SUCCESS
        try:
            _insert(self._store, rows, [])
        except (StoreError, SQLAlchemyError) as exc:
            log.warning("lost %d spans: %s", len(rows), exc)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to release: the store belongs to whoever built it."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


#: a W3C trace id as the ``x-lamina-trace-id`` header gives it
_TRACE_ID = re.compile(r"[0-9a-fA-F]{32}")


def check_trace_id(trace_id: str) -> str:
    """``trace_id`` in lower case, or an InvalidRequestError saying what a trace id looks like."""
    trace_id = trace_id.strip()
    if not _TRACE_ID.fullmatch(trace_id):
        raise InvalidRequestError(
            f"{trace_id!r} is not a trace id: give the 32 hex digits of an answer's x-lamina-trace-id header",
            param="trace_id",
        )
    return trace_id.lower()


def read_trace(store: Store, trace_id: str) -> list[SpanRow]:
    """Every stored span of one trace (its id as the ``x-lamina-trace-id`` header gives it), oldest first."""
    query = (
        select(spans).where(spans.c.trace_id == trace_id.lower()).order_by(spans.c.start_ns, spans.c.span_id)
    )
    with store.begin() as conn:
        result = conn.execute(query).mappings().all()
    return span_rows(result)


def span_rows(result: Iterable[Any]) -> list[SpanRow]:
    """Rows of the ``spans`` table (as mappings) as SpanRow dicts."""
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
