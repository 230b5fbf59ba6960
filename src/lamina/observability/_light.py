"""A tracer whose spans are plain records until a trace is kept: the OpenTelemetry API at a fraction of
the SDK's cost per span.

The SDK's spans pay on the request path for what only kept traces need (bounded attribute maps with a
lock per write, a sampler and span processors per span, a copy of every span when it ends). Here a span
is a :class:`LightSpan`: the OpenTelemetry API (``set_attribute``, ``set_status``, ``add_event``,
``record_exception``, context propagation through ``trace.use_span``), its data kept in plain fields, and
itself a ``ReadableSpan``, so the store writer and the OTLP exporter take it as it is once the
:class:`~lamina.observability._keeper.TraceKeeper` decides to keep its trace (at its root's end).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util.types import Attributes, AttributeValue

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSET = Status(StatusCode.UNSET)


class LightSpan(trace.Span, ReadableSpan):
    """One span of a recorded trace (see the module doc); thread-compatible like the SDK's for the
    request path's use: one task writes it, the keeper reads it after it ended."""

    def __init__(
        self,
        tracer: LightTracer,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        attributes: Attributes,
        start_time: int | None,
    ) -> None:
        ReadableSpan.__init__(
            self,
            name,
            context,
            parent,
            tracer.resource,
            dict(attributes) if attributes else {},
            [],
            (),
            SpanKind.INTERNAL,
            None,
            _UNSET,
            start_time if start_time is not None else time.time_ns(),
            None,
            tracer.scope,
        )
        self._tracer = tracer
        tracer.keeper.on_start(self)

    def get_span_context(self) -> SpanContext:
        assert self._context is not None
        return self._context

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if self._end_time is None:
            self._attributes[key] = value  # type: ignore[index]

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        if self._end_time is None:
            self._attributes.update(attributes)  # type: ignore[union-attr]

    def add_event(self, name: str, attributes: Attributes = None, timestamp: int | None = None) -> None:
        if self._end_time is None:
            self._events.append(Event(name, attributes, timestamp))  # type: ignore[attr-defined]

    def add_link(self, context: SpanContext, attributes: Attributes = None) -> None:
        """Links are not kept (no span of Lamina makes one)."""

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._end_time is not None:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if self._status.status_code is StatusCode.OK:  # OK is final, as in the SDK
            return
        self._status = status

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        attrs: dict[str, AttributeValue] = {
            "exception.type": type(exception).__qualname__,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        attrs.update(attributes or {})
        self.add_event("exception", attrs, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            return
        self._end_time = end_time if end_time is not None else time.time_ns()
        self._tracer.keeper.on_end(self)


class LightTracer(trace.Tracer):
    """Starts :class:`LightSpan`\\ s (every one recorded) or, with ``record=False``, non-recording spans
    that still carry a trace id (the ``x-lamina-trace-id`` header has one either way)."""

    def __init__(self, keeper: Any, resource: Resource, record: bool = True) -> None:
        self.keeper = keeper
        self.resource = resource
        self.scope = InstrumentationScope("lamina")
        self.record = record
        self._ids = RandomIdGenerator()

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        parent = trace.get_current_span(context).get_span_context()
        if not parent.is_valid:
            parent_ctx, trace_id, flags = None, self._ids.generate_trace_id(), _SAMPLED
        else:
            parent_ctx, trace_id, flags = parent, parent.trace_id, parent.trace_flags
        ctx = SpanContext(trace_id, self._ids.generate_span_id(), False, flags)
        if not self.record:
            return trace.NonRecordingSpan(ctx)
        return LightSpan(self, name, ctx, parent_ctx, attributes, start_time)

    def start_as_current_span(  # type: ignore[override]  # a plain class, not the API's private decorator
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Current:
        return Current(self.start_span(name, context, kind, attributes, links, start_time), end_on_exit)


class Current:
    """``with``: ``span`` is the current span inside; an exception marks it ERROR (recorded as an event)
    and propagates; it ends on exit (as ``trace.use_span`` does, in a class: no generator per span)."""

    __slots__ = ("_end", "_token", "span")

    def __init__(self, span: trace.Span, end_on_exit: bool = True) -> None:
        self.span = span
        self._end = end_on_exit
        self._token: object = None

    def __enter__(self) -> trace.Span:
        self._token = context_api.attach(trace.set_span_in_context(self.span))
        return self.span

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        context_api.detach(self._token)  # type: ignore[arg-type]
        if isinstance(exc, Exception) and self.span.is_recording():
            self.span.record_exception(exc)
            self.span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        if self._end:
            self.span.end()
