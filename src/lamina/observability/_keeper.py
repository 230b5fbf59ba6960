"""The span processor that holds each trace's spans until its root ends, then keeps or drops the trace.

It runs on the thread that starts and ends spans (the request path), so its work there is a few dict
operations per span (``_open_trace.py``) and one sampling decision per trace; spans become
``ReadableSpan`` objects only in kept traces, and everything else (rows, the summary, the database)
happens on the :class:`~lamina.observability._store_exporter.SpanWriter`'s thread. A kept trace's spans
also go to the other processors (an OTLP exporter), so sampling applies to every backend.

While a request runs, :meth:`TraceKeeper.breakdown` reads its per-layer time so far (summed as its spans
end, those still running up to now): that is what the ``x-lamina-layers`` header and the ``lamina``
extension of the answer carry.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, Status, StatusCode, TraceFlags
from opentelemetry.util.types import Attributes

from lamina.observability._breakdown import Breakdown
from lamina.observability._caller import joined
from lamina.observability._fast_metrics import Family
from lamina.observability._light import LightSpan
from lamina.observability._open_trace import Deferred, Held, Later, OpenTrace, Record
from lamina.observability._sampling import Kept, TraceSampler
from lamina.observability._store_exporter import LAYER, SpanWriter

#: traces whose root never ends (a bug) are forgotten, oldest first, beyond this many open ones
MAX_OPEN_TRACES = 10_000


def _is_local_root(span: ReadableSpan) -> bool:
    return span.parent is None or span.parent.is_remote


def _layer(attributes: Attributes) -> str | None:
    layer = (attributes or {}).get(LAYER)
    return layer if isinstance(layer, str) else None


class TraceKeeper(SpanProcessor):
    """Tail-aware sampling in front of the store writer and any other span processors.

    The light tracer (``_light.py``) calls :meth:`open` for a local root and :meth:`close` when it ends,
    and ends its other spans on their :class:`OpenTrace` directly; SDK spans (a ``TracerProvider`` with
    this processor) come through :meth:`on_start` and :meth:`on_end`.
    """

    def __init__(
        self,
        sampler: TraceSampler,
        writer: SpanWriter | None = None,
        sinks: Sequence[SpanProcessor] = (),
        decisions: Family | None = None,
        resource: Resource | None = None,
    ) -> None:
        self.sampler = sampler
        self.writer = writer
        self.sinks = tuple(sinks)
        self._open: dict[int, OpenTrace] = {}
        self.resource = resource or Resource.get_empty()
        self.scope = InstrumentationScope("lamina")
        self._ids = RandomIdGenerator()
        #: traces decided so far, by outcome (for the metrics and the benchmark)
        self.decided: dict[str, int] = {"dropped": 0, **{k.value: 0 for k in Kept}}
        self._decisions = {k: decisions.labels(k) for k in self.decided} if decisions is not None else {}

    def open(self, trace_id: int, flags: int, parent: SpanContext | None = None) -> OpenTrace:
        """A local root starts a trace (``parent``: its remote parent, if any)."""
        opened = self._open[trace_id] = OpenTrace(trace_id, flags, parent)
        if len(self._open) > MAX_OPEN_TRACES:
            with contextlib.suppress(RuntimeError, StopIteration, KeyError):  # raced: next time
                self._open.pop(next(iter(self._open))).closed = True
        return opened

    def on_start(self, span: ReadableSpan, parent_context: Context | None = None) -> None:
        ctx = span.context
        assert ctx is not None
        opened = self._open.get(ctx.trace_id)
        if _is_local_root(span) and opened is None:
            opened = self.open(ctx.trace_id, ctx.trace_flags, span.parent)
        if opened is not None:  # a span starting after its trace was decided is not kept
            opened.sdk = True
            parent = span.parent
            parent_id = None if parent is None or parent.is_remote else parent.span_id
            opened.begin(span, ctx.span_id, parent_id, _layer(span.attributes), span.start_time or 0)

    def on_end(self, span: ReadableSpan) -> None:
        ctx = span.context
        assert ctx is not None
        opened = self._open.get(ctx.trace_id)
        if opened is None:
            return
        opened.end(ctx.span_id, span.end_time or 0)
        if ctx.span_id == opened.root_id:
            status = (span.attributes or {}).get("http.response.status_code")
            self.close(opened, span, status, (span.end_time or 0) - (span.start_time or 0))

    def close(self, opened: OpenTrace, root: ReadableSpan, status: object, duration_ns: int) -> None:
        """The root of ``opened`` ended: keep the trace (to the sinks and the writer) or drop it."""
        if opened.closed:
            return
        opened.closed = True
        if self._open.get(opened.trace_id) is opened:
            del self._open[opened.trace_id]
        caller = opened.caller
        if opened.failed or opened.sdk or caller is not None:
            kept = self._decide(opened, status, duration_ns)
        else:  # most traces: nothing failed, no caller's decision to follow
            kept = self.sampler.ordinary(duration_ns / 1e6)
        decision = "dropped" if kept is None else kept  # a StrEnum: its own value (``.value`` costs more)
        self.decided[decision] += 1
        counter = self._decisions.get(decision)
        if counter is not None:
            counter.value += 1  # a fast series (``_fast_metrics.Value``): no call
        # the trace holds its light spans and they hold it: letting go of them breaks the cycle, so a
        # request's spans are freed by reference counting, not left to the cyclic garbage collector
        held, opened.held = opened.held, []
        extra, opened.extra = opened.extra, None
        if kept is None:
            return
        more, deferred = extra() if extra is not None else ({}, ())
        if more and isinstance(root, LightSpan):
            root.merge(more)
        done = self._spans(opened, held, deferred)
        exported = done if caller is None or not self.sinks else joined(done, caller)
        for sink in self.sinks:
            for s in exported:
                sink.on_end(s)
        if self.writer is not None:
            self.writer.put(done[0], done, kept)

    def _decide(self, opened: OpenTrace, status: object, duration_ns: int) -> Kept | None:
        """The sampler's decision on a trace that may have failed (a span marked ERROR; a 4xx is the
        client's) or came with its caller's."""
        failed = opened.failed or (
            opened.sdk
            and any(
                isinstance(h[0], ReadableSpan) and h[0].status.status_code is StatusCode.ERROR
                for h in opened.held
            )
        )
        refused = failed and isinstance(status, int) and 400 <= status < 500  # the client's request
        caller = opened.caller
        return self.sampler.decide(
            error=failed and not refused,
            duration_ms=duration_ns / 1e6,
            client_error=refused,
            caller_sampled=caller is not None and caller.trace_flags.sampled,
        )

    def _spans(self, opened: OpenTrace, held: list[Held], deferred: Sequence[Deferred]) -> list[ReadableSpan]:
        """The ended spans of a kept trace (the root first) as ``ReadableSpan`` objects."""
        out: list[ReadableSpan] = []
        trace_id, flags = opened.trace_id, TraceFlags(opened.flags)
        for obj, sid, pid, start in held:
            if isinstance(obj, ReadableSpan):
                if obj.end_time is not None:
                    out.append(obj)
                continue
            if not isinstance(obj, Record):
                if obj.end_time is not None:
                    out.append(obj.readable(self.resource, self.scope))
                continue
            ctx = SpanContext(trace_id, sid or self._ids.generate_span_id(), False, flags)
            parent = SpanContext(trace_id, pid if pid is not None else opened.root_id, False, flags)
            out.append(self._readable(obj.name, ctx, parent, obj.attributes, start, obj.end_time))
            for name, attrs, c_start, c_end in obj.later:
                child = SpanContext(trace_id, self._ids.generate_span_id(), False, flags)
                out.append(self._readable(name, child, ctx, attrs, c_start, c_end))
        if deferred:
            root = opened.root_id
            for name, attrs, start, end, sid, pid, error in deferred:
                ctx = SpanContext(trace_id, sid or self._ids.generate_span_id(), False, flags)
                parent = SpanContext(trace_id, pid if pid is not None else root, False, flags)
                status = Status(StatusCode.ERROR, error) if error is not None else None
                out.append(self._readable(name, ctx, parent, attrs, start, end, status))
        return out

    def _readable(
        self,
        name: str,
        ctx: SpanContext,
        parent: SpanContext,
        attributes: Attributes,
        start: int,
        end: int | None,
        status: Status | None = None,
    ) -> ReadableSpan:
        return ReadableSpan(
            name,
            ctx,
            parent,
            self.resource,
            attributes,
            status=status or Status(StatusCode.UNSET),
            start_time=start,
            end_time=end,
            instrumentation_scope=self.scope,
        )

    def add(
        self,
        trace_id: int,
        parent_id: int,
        name: str,
        attributes: Attributes,
        start_ns: int,
        end_ns: int,
        later: tuple[Later, ...] = (),
    ) -> int | None:
        """A finished span under the span ``parent_id`` whose times are known after the fact (the
        replica's engine, the gateway's admission), with its children ``later`` (``(name, attributes,
        start_ns, end_ns)``, e.g. the engine's queue, prefill and decode): plain records, made spans only
        if the trace is kept. Returns its span id, or None when the trace is not open (not recorded, or
        decided already)."""
        opened = self._open.get(trace_id)
        if opened is None:
            return None
        span_id = self._ids.generate_span_id()
        opened.record(span_id, parent_id, name, attributes, start_ns, end_ns, later)
        return span_id

    @staticmethod
    def trace_of(span: object) -> OpenTrace | None:
        """The open trace of a light span (the request's root), None for any other span."""
        opened = getattr(span, "trace", None)
        return opened if isinstance(opened, OpenTrace) else None

    def breakdown(self, root: object) -> Breakdown | None:
        """Where the trace of ``root`` spent its time so far; None once it is decided (or not recorded)."""
        opened = getattr(root, "trace", None)
        if not isinstance(opened, OpenTrace):
            ctx = root.get_span_context() if isinstance(root, trace.Span) else None
            opened = self._open.get(ctx.trace_id) if ctx is not None else None
        if opened is None or opened.closed:
            return None
        return opened.breakdown(time.time_ns())

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
