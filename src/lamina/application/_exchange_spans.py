"""The gateway's own steps of one request as spans, made only when its trace is kept.

While a request runs, :class:`~lamina.application._tracing.Exchange` keeps its steps as timestamps (a
span object per step cost more than the rest of the tracing); :func:`deferred_spans` turns them into the
spans a kept trace stores, under the root unless said otherwise:

- ``auth``, ``parse``, ``cache`` and the policies' steps (application): before routing under the root,
  between routing and the first dispatch under ``admission``, after the reply under ``respond``;
- ``route`` (models), ``admission`` (application, routing to the first dispatch);
- ``dispatch`` (orchestration, :class:`DispatchStep`: one per try), and per reply, under it: ``engine``
  (models, the replica's clock, same host) with ``queue``, then ``prefill`` up to the first token and
  ``decode`` after it (``embed`` for an embedding), and ``device`` (compute: the device and its
  utilisation then);
- ``respond`` (application: output guards, cache store, settling, sending, after the reply).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanContext, Status, StatusCode, TraceFlags
from opentelemetry.util.types import Attributes, AttributeValue

from lamina.observability import LAYER, Deferred, Layer, LightSpan, OpenTrace

_APPLICATION_LAYER = Layer.APPLICATION.value
_ORCHESTRATION_LAYER = Layer.ORCHESTRATION.value
_APPLICATION: dict[str, AttributeValue] = {LAYER: Layer.APPLICATION.value}
_MODELS: dict[str, AttributeValue] = {LAYER: Layer.MODELS.value}

#: one reply: its dispatch span, the replica's ``lamina`` extension, the answer's usage, and the device
#: span's attributes
Reply = tuple[Any, Mapping[str, Any], Mapping[str, Any], dict[str, AttributeValue]]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def new_span_id() -> int:
    """A random span id (64 bits, never the invalid 0)."""
    return random.getrandbits(64) or 1


def root_attributes(
    described: Callable[[], dict[str, AttributeValue]] | None,
    route: Any,
    replies: Sequence[tuple[Mapping[str, Any], Mapping[str, Any], object, object]],
    breakdown: Any,
) -> dict[str, AttributeValue]:
    """The root span's attributes kept aside while the request ran (made only if its trace is kept): the
    request's own, its route, then what the (last) reply says, and the layer that took longest."""
    attrs: dict[str, AttributeValue] = described() if described is not None else {}
    if route is not None:
        attrs["lamina.deployment"] = route.deployment
        attrs["gen_ai.response.model"] = route.served_name
        if route.model_version:
            attrs["lamina.model_version"] = route.model_version
    for usage, ext, model, _ in replies:
        if isinstance(model, str):
            attrs["gen_ai.response.model"] = model
        if isinstance(ext.get("model_version"), str):
            attrs["lamina.model_version"] = ext["model_version"]
        tokens_in, tokens_out = _number(usage.get("prompt_tokens")), _number(usage.get("completion_tokens"))
        if tokens_in is not None:
            attrs["gen_ai.usage.input_tokens"] = int(tokens_in)
        if tokens_out is not None:
            attrs["gen_ai.usage.output_tokens"] = int(tokens_out)
    if breakdown is not None and breakdown.bottleneck is not None:
        attrs["lamina.bottleneck"] = breakdown.bottleneck
    return attrs


def deferred_spans(
    steps: Sequence[tuple[str, int, int]],
    route: tuple[int, int, dict[str, AttributeValue], str | None] | None,
    admission: tuple[int, int],
    respond: tuple[int, int],
    replies: Sequence[Reply],
) -> list[Deferred]:
    """The spans of a kept trace's gateway steps (see the module doc); ``admission`` and ``respond`` are
    (start_ns, end_ns), 0 when the request never got there."""
    out: list[Deferred] = []
    admitted_id = new_span_id() if admission[0] and admission[1] else None
    respond_id = new_span_id() if respond[0] else None
    if route is not None:
        out.append(("route", route[2], route[0], route[1], 0, None, route[3]))
    if admitted_id is not None:
        out.append(("admission", _APPLICATION, admission[0], admission[1], admitted_id, None, None))
    if respond_id is not None:
        out.append(("respond", _APPLICATION, respond[0], respond[1], respond_id, None, None))
    for step, start, end in steps:
        parent = None
        if respond_id is not None and start >= respond[0]:
            parent = respond_id
        elif admitted_id is not None and admission[0] <= start < admission[1] + 1:
            parent = admitted_id
        out.append((step, _APPLICATION, start, end, 0, parent, None))
    for reply in replies:
        out.extend(_engine(*reply))
    return out


def _engine(
    dispatch: Any, ext: Mapping[str, Any], usage: Mapping[str, Any], device: dict[str, AttributeValue]
) -> list[Deferred]:
    """The replica's work as spans timed by the replica's clock (same host): ``engine`` (models) from
    receipt to the end, with ``queue``, then ``prefill`` up to the first token and ``decode`` after it
    (``embed`` for an embedding), and ``device`` (compute): the device and its utilisation then."""
    start, end = ext.get("start_ns"), ext.get("end_ns")
    if not (isinstance(start, int) and isinstance(end, int)) or isinstance(start, bool) or end < start:
        return []
    queue_ms = _number(ext.get("queue_ms")) or 0.0
    ttft_ms = _number(ext.get("ttft_ms"))
    prefill_ms = (
        None if ttft_ms is None or _number(ext.get("queue_ms")) is None else max(ttft_ms - queue_ms, 0.0)
    )
    generates = _number(usage.get("completion_tokens")) is not None
    received = max(start - int(queue_ms * 1e6), 0)
    attrs: dict[str, AttributeValue] = {LAYER: Layer.MODELS.value}
    for key in ("queue_ms", "ttft_ms", "engine_ms", "compute_ms"):
        value = _number(ext.get(key))
        if value is not None:
            attrs[f"lamina.{key}"] = value
    if isinstance(ext.get("model_version"), str):
        attrs["lamina.model_version"] = ext["model_version"]
    engine_id = new_span_id()
    out: list[Deferred] = [("engine", attrs, received, end, engine_id, dispatch.span_id, None)]
    if start > received:
        out.append(("queue", _MODELS, received, start, 0, engine_id, None))
    if generates and prefill_ms is not None:
        first = min(max(start + int(prefill_ms * 1e6), start), end)
        out.append(("prefill", _MODELS, start, first, 0, engine_id, None))
        if end > first:
            out.append(("decode", _MODELS, first, end, 0, engine_id, None))
    else:
        out.append(("embed" if not generates else "generate", _MODELS, start, end, 0, engine_id, None))
    out.append(("device", device, start, start, 0, engine_id, None))
    return out


class DispatchStep(trace.Span):
    """The ``dispatch`` span of one try (orchestration), kept as timestamps and attributes: it counts in
    the trace's per-layer time while it runs and when it ends, and is made a span (:meth:`deferred`) only
    if the trace is kept. The API of a span for the code around the dispatcher (attributes, an ERROR
    status, an exception); not made current: nothing below the dispatcher records spans."""

    __slots__ = ("_opened", "attributes", "end_ns", "error", "parent_id", "span_id", "start_ns")

    def __init__(
        self, opened: OpenTrace, parent: trace.Span | None, attributes: dict[str, AttributeValue]
    ) -> None:
        self._opened = opened
        self.span_id = span_id = random.getrandbits(64) or 1
        self.attributes = attributes
        self.error: str | None = None
        self.end_ns = 0
        self.start_ns = start = time.time_ns()
        parent_layer = _APPLICATION_LAYER
        self.parent_id: int | None = None  # the root (also when ``parent`` is None)
        if (
            parent is not None
            and isinstance(parent, LightSpan)
            and parent.trace is opened
            and parent.span_id != opened.root_id
        ):
            self.parent_id, parent_layer = parent.span_id, parent.layer  # a model group's attempt
        opened.begin_step(span_id, start, _ORCHESTRATION_LAYER, parent_layer)

    @property
    def layer(self) -> str:
        return _ORCHESTRATION_LAYER

    @property
    def start_time(self) -> int:
        return self.start_ns

    def traceparent(self) -> str:
        """The W3C ``traceparent`` header that carries this span to the replica."""
        opened = self._opened
        return f"00-{opened.trace_id:032x}-{self.span_id:016x}-{opened.flags:02x}"

    def deferred(self) -> Deferred:
        return (
            "dispatch",
            self.attributes,
            self.start_ns,
            self.end_ns,
            self.span_id,
            self.parent_id,
            self.error,
        )

    def end(self, end_time: int | None = None) -> None:
        if not self.end_ns:
            self.end_ns = end_time or time.time_ns()
            self._opened.end(self.span_id, self.end_ns)

    def get_span_context(self) -> SpanContext:
        opened = self._opened
        return SpanContext(opened.trace_id, self.span_id, False, TraceFlags(opened.flags))

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        self.attributes.update(attributes)

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        self.attributes[key] = value

    def add_event(self, name: str, attributes: Attributes = None, timestamp: int | None = None) -> None:
        """Events are not kept on a dispatch (exceptions are, as attributes)."""

    def update_name(self, name: str) -> None:
        """The name is ``dispatch``."""

    def is_recording(self) -> bool:
        return not self.end_ns

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        code = status.status_code if isinstance(status, Status) else status
        if isinstance(status, Status):
            description = status.description
        if code is StatusCode.ERROR:
            self.error = description or ""
            self._opened.failed = True

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        self.attributes["exception.type"] = type(exception).__qualname__
        self.attributes["exception.message"] = str(exception)
