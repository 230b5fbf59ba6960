"""A tracer whose spans are plain records until a trace is kept: the OpenTelemetry API at a fraction of
the SDK's cost per span.

The SDK's spans pay on the request path for what only kept traces need (bounded attribute maps with a
lock per write, a sampler and span processors per span, a copy of every span when it ends). Here a span
is a :class:`LightSpan`: the OpenTelemetry API (``set_attribute``, ``set_status``, ``add_event``,
``record_exception``, context propagation through ``trace.use_span``) over plain fields. A local root opens
an :class:`~lamina.observability._open_trace.OpenTrace` with the
:class:`~lamina.observability._keeper.TraceKeeper`; its descendants find it through their parent span (no
lookup), add their layer's time to it when they end, and become ``ReadableSpan`` objects for the store
writer and the OTLP exporter only if the keeper keeps the trace (at its root's end).
"""

from __future__ import annotations

import random
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

from lamina.observability._open_trace import ROOT_LAYER, OpenTrace

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSET = Status(StatusCode.UNSET)
_LAYER = "lamina.layer"


class LightSpan(trace.Span):
    """One span of a recorded trace (see the module doc); thread-compatible like the SDK's for the
    request path's use: one task writes it, the keeper reads it after it ended. It reads like a
    ``ReadableSpan`` (``name``, ``context``, ``parent``, ``attributes``, ``events``, ``status``, times)."""

    __slots__ = (
        "_attributes",
        "_context",
        "_events",
        "_keeper",
        "_parent_id",
        "_status",
        "end_time",
        "layer",
        "name",
        "span_id",
        "start_time",
        "trace",
    )

    def __init__(
        self,
        keeper: Any,
        opened: OpenTrace,
        name: str,
        span_id: int,
        parent_id: int | None,
        attributes: Attributes,
        start_time: int | None,
    ) -> None:
        self._keeper = keeper
        self.trace = opened
        self.name = name
        self.span_id = span_id
        self._parent_id = parent_id
        self._attributes: dict[str, Any] = dict(attributes) if attributes else {}
        self._events: list[Event] = []
        self._status = _UNSET
        self._context: SpanContext | None = None
        self.start_time = start_time if start_time is not None else time.time_ns()
        self.end_time: int | None = None
        layer = self._attributes.get(_LAYER)
        self.layer = opened.begin(
            self, span_id, parent_id, layer if isinstance(layer, str) else None, self.start_time
        )

    @classmethod
    def root(cls, keeper: Any, opened: OpenTrace, name: str, attributes: dict[str, Any]) -> LightSpan:
        """A trace's local root (:meth:`LightTracer.start_root`), made on every request: ``attributes``
        become its own (not copied), and its layer is theirs, else the application's."""
        span = cls.__new__(cls)
        span._keeper = keeper
        span.trace = opened
        span.name = name
        span.span_id = span_id = random.getrandbits(64) or 1
        span._parent_id = None
        span._attributes = attributes
        span._events = []
        span._status = _UNSET
        span._context = None
        span.start_time = start = time.time_ns()
        span.end_time = None
        layer = attributes.get(_LAYER)
        span.layer = opened.begin_root(span, span_id, layer if isinstance(layer, str) else ROOT_LAYER, start)
        return span

    @property
    def context(self) -> SpanContext:
        return self.get_span_context()

    @property
    def parent(self) -> SpanContext | None:
        opened = self.trace
        if self._parent_id is None:
            parent: SpanContext | None = opened.parent
            return parent
        return SpanContext(opened.trace_id, self._parent_id, False, TraceFlags(opened.flags))

    @property
    def attributes(self) -> Mapping[str, Any]:
        return self._attributes

    @property
    def events(self) -> tuple[Event, ...]:
        return tuple(self._events)

    @property
    def status(self) -> Status:
        return self._status

    def get_span_context(self) -> SpanContext:
        if self._context is None:
            opened = self.trace
            self._context = SpanContext(opened.trace_id, self.span_id, False, TraceFlags(opened.flags))
        return self._context

    def is_recording(self) -> bool:
        return self.end_time is None

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if self.end_time is None:
            self._attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        if self.end_time is None:
            self._attributes.update(attributes)

    def add_event(self, name: str, attributes: Attributes = None, timestamp: int | None = None) -> None:
        if self.end_time is None:
            self._events.append(Event(name, attributes, timestamp))

    def merge(self, attributes: Mapping[str, Any]) -> None:
        """Attributes its owner kept aside until the trace was kept (after the span ended)."""
        self._attributes.update(attributes)

    def add_link(self, context: SpanContext, attributes: Attributes = None) -> None:
        """Links are not kept (no span of Lamina makes one)."""

    def update_name(self, name: str) -> None:
        if self.end_time is None:
            self.name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self.end_time is not None:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if self._status.status_code is StatusCode.OK:  # OK is final, as in the SDK
            return
        self._status = status
        if status.status_code is StatusCode.ERROR:
            self.trace.failed = True

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
        if self.end_time is not None:
            return
        end = self.end_time = end_time if end_time is not None else time.time_ns()
        opened = self.trace
        if opened.closed:
            return
        opened.end(self.span_id, end)
        if self.span_id == opened.root_id:
            status = self._attributes.get("http.response.status_code")
            self._keeper.close(opened, self, status, end - self.start_time)

    def readable(self, resource: Resource, scope: InstrumentationScope) -> ReadableSpan:
        """This span as the SDK's ``ReadableSpan`` (for the store writer and the exporters)."""
        return ReadableSpan(
            self.name,
            self.get_span_context(),
            self.parent,
            resource,
            self._attributes,
            tuple(self._events),
            (),
            SpanKind.INTERNAL,
            None,
            self._status,
            self.start_time,
            self.end_time,
            scope,
        )


def _new_id(bits: int) -> int:
    """A random trace (128 bits) or span (64 bits) id; never 0, the invalid one."""
    return random.getrandbits(bits) or 1


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
        parent = trace.get_current_span(context)
        if isinstance(parent, LightSpan):
            opened, parent_id = parent.trace, parent.span_id
        else:
            ctx = parent.get_span_context()
            if ctx.is_valid and not ctx.is_remote:  # a local span that is not recorded: neither is this
                return trace.NonRecordingSpan(
                    SpanContext(ctx.trace_id, self._ids.generate_span_id(), False, ctx.trace_flags)
                )
            if not self.record:
                trace_id = ctx.trace_id if ctx.is_valid else self._ids.generate_trace_id()
                return trace.NonRecordingSpan(
                    SpanContext(trace_id, self._ids.generate_span_id(), False, _SAMPLED)
                )
            if ctx.is_valid:
                opened = self.keeper.open(ctx.trace_id, ctx.trace_flags, ctx)
            else:
                opened = self.keeper.open(self._ids.generate_trace_id(), _SAMPLED)
            parent_id = None
        return LightSpan(
            self.keeper, opened, name, self._ids.generate_span_id(), parent_id, attributes, start_time
        )

    def start_root(
        self, name: str, attributes: Attributes = None, caller: SpanContext | None = None
    ) -> trace.Span:
        """A new trace's root, whatever the current span (a request's): ``start_span`` with an empty
        context, without its parent lookups; the span takes ``attributes`` as its own (a dict made for
        it: not copied). ``caller``: the span of the request's ``traceparent``, whose trace the exported
        spans join (``_caller.py``)."""
        if not self.record:
            return trace.NonRecordingSpan(SpanContext(_new_id(128), _new_id(64), False, _SAMPLED))
        keeper = self.keeper
        opened = keeper.open(random.getrandbits(128) or 1, _SAMPLED)
        if caller is not None:
            opened.caller = caller
        return LightSpan.root(
            keeper, opened, name, attributes if isinstance(attributes, dict) else dict(attributes or {})
        )

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
