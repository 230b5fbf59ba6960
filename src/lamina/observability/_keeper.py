"""The span processor that holds each trace's spans until its root ends, then keeps or drops the trace.

It runs on the thread that starts and ends spans (the request path), so its work there is a dict lookup
and a list append per span, and one sampling decision per trace; everything else (rows, the summary,
the database) happens on the :class:`~lamina.observability._store_exporter.SpanWriter`'s thread. A kept
trace's spans also go to the other processors (an OTLP exporter), so sampling applies to every backend.

While a request runs, :meth:`TraceKeeper.breakdown` reads its spans (those still running count up to now)
to say where its time went so far: that is what the ``x-lamina-layers`` header and the ``lamina``
extension of the answer carry.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, StatusCode
from opentelemetry.util.types import Attributes
from prometheus_client import Counter

from lamina.observability._breakdown import Breakdown, Timed, breakdown
from lamina.observability._sampling import Kept, TraceSampler
from lamina.observability._store_exporter import LAYER, SpanWriter


class _Record:
    """A span known only after the fact (see :meth:`TraceKeeper.add`), until its trace is kept."""

    __slots__ = ("attributes", "end_time", "name")

    def __init__(self, name: str, attributes: Attributes, end_time: int) -> None:
        self.name = name
        self.attributes = attributes
        self.end_time: int | None = end_time


#: a span (or record) of an open trace, with its id, its parent's id, its layer and its start
_Held = tuple[ReadableSpan | _Record, int, int | None, str | None, int]

#: traces whose root never ends (a bug) are forgotten, oldest first, beyond this many open ones
MAX_OPEN_TRACES = 10_000


def _held(span: ReadableSpan) -> _Held:
    """What the breakdown needs of ``span`` that never changes, read once when it starts."""
    ctx, parent = span.context, span.parent
    assert ctx is not None  # an SDK span always has its context
    layer = (span.attributes or {}).get(LAYER)
    parent_id = None if parent is None or parent.is_remote else parent.span_id
    return span, ctx.span_id, parent_id, layer if isinstance(layer, str) else None, span.start_time or 0


def _is_local_root(span: ReadableSpan) -> bool:
    return span.parent is None or span.parent.is_remote


class TraceKeeper(SpanProcessor):
    """Tail-aware sampling in front of the store writer and any other span processors."""

    def __init__(
        self,
        sampler: TraceSampler,
        writer: SpanWriter | None = None,
        sinks: Sequence[SpanProcessor] = (),
        decisions: Counter | None = None,
        resource: Resource | None = None,
    ) -> None:
        self.sampler = sampler
        self.writer = writer
        self.sinks = tuple(sinks)
        self._open: dict[int, list[_Held]] = {}
        self._resource = resource
        self._scope = InstrumentationScope("lamina")
        self._ids = RandomIdGenerator()
        #: traces decided so far, by outcome (for the metrics and the benchmark)
        self.decided: dict[str, int] = {"dropped": 0, **{k.value: 0 for k in Kept}}
        self._decisions = decisions

    def on_start(self, span: ReadableSpan, parent_context: Context | None = None) -> None:
        assert span.context is not None
        trace_id = span.context.trace_id
        if _is_local_root(span):
            held = self._open.get(trace_id)
            if held is None:
                self._open[trace_id] = [_held(span)]
                if len(self._open) > MAX_OPEN_TRACES:
                    with contextlib.suppress(RuntimeError, StopIteration, KeyError):  # raced: next time
                        del self._open[next(iter(self._open))]
            else:
                held.append(_held(span))
            return
        held = self._open.get(trace_id)
        if held is not None:  # a span starting after its trace was decided is not kept
            held.append(_held(span))

    def on_end(self, span: ReadableSpan) -> None:
        if not _is_local_root(span):
            return
        assert span.context is not None
        held = self._open.pop(span.context.trace_id, None)
        if held is None:
            return
        failed = any(
            isinstance(h[0], ReadableSpan) and h[0].status.status_code is StatusCode.ERROR for h in held
        )
        status = (span.attributes or {}).get("http.response.status_code")
        refused = failed and isinstance(status, int) and 400 <= status < 500  # the client's request
        duration_ms = ((span.end_time or 0) - (span.start_time or 0)) / 1e6
        kept = self.sampler.decide(
            error=failed and not refused, duration_ms=duration_ms, client_error=refused
        )
        decision = "dropped" if kept is None else kept.value
        self.decided[decision] += 1
        if self._decisions is not None:
            self._decisions.labels(decision).inc()
        if kept is None:
            return
        done = self._spans(span.context, held)
        for sink in self.sinks:
            for s in done:
                sink.on_end(s)
        if self.writer is not None:
            self.writer.put(span, done, kept)

    def _spans(self, root: SpanContext, held: list[_Held]) -> list[ReadableSpan]:
        """The ended spans of a kept trace, its records turned into ``ReadableSpan`` objects now."""
        out: list[ReadableSpan] = []
        trace_id, flags = root.trace_id, root.trace_flags
        for obj, sid, pid, _, start in held:
            if isinstance(obj, ReadableSpan):
                if obj.end_time is not None:
                    out.append(obj)
                continue
            parent = SpanContext(trace_id, pid, False, flags) if pid is not None else None
            ctx = SpanContext(trace_id, sid, False, flags)
            out.append(
                ReadableSpan(
                    obj.name,
                    ctx,
                    parent,
                    self._resource,
                    obj.attributes,
                    start_time=start,
                    end_time=obj.end_time,
                    instrumentation_scope=self._scope,
                )
            )
        return out

    def add(
        self, trace_id: int, parent_id: int, name: str, attributes: Attributes, start_ns: int, end_ns: int
    ) -> int | None:
        """A finished span under the span ``parent_id`` whose times are known after the fact (the
        replica's queue, prefill, decode; the gateway's admission): a record of plain fields, made a span
        only if the trace is kept. Returns its span id (for children), or None when the trace is not open
        (not recorded, or decided already)."""
        held = self._open.get(trace_id)
        if held is None:
            return None
        span_id = self._ids.generate_span_id()
        layer = (attributes or {}).get(LAYER)
        record = _Record(name, attributes, end_ns)
        held.append((record, span_id, parent_id, layer if isinstance(layer, str) else None, start_ns))
        return span_id

    def breakdown(self, root: ReadableSpan) -> Breakdown | None:
        """Where the trace of ``root`` spent its time so far; None once it is decided (or not recorded)."""
        assert root.context is not None
        held = self._open.get(root.context.trace_id)
        if held is None:
            return None
        spans = [Timed(sid, pid, layer, start, s.end_time) for s, sid, pid, layer, start in held]
        return breakdown(spans, root.context.span_id, time.time_ns())

    def shutdown(self) -> None:
        for sink in self.sinks:
            sink.shutdown()
        if self.writer is not None:
            self.writer.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        ok = all(sink.force_flush(timeout_millis) for sink in self.sinks)
        if self.writer is not None:
            ok = self.writer.flush(timeout_millis / 1000) and ok
        return ok
