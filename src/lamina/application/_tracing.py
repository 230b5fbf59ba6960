"""One request's telemetry: its root span, its gateway steps, its per-layer breakdown and its metrics.

The middleware (``_tracing_middleware.py``) opens an :class:`Exchange` for every request; the handlers
reach it through the ASGI scope and hang the steps, the dispatches and the usage on it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from json.encoder import encode_basestring_ascii
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from opentelemetry.util.types import AttributeValue
from starlette.requests import Request
from starlette.responses import Response

from lamina.application._exchange_spans import DispatchStep, deferred_spans, root_attributes
from lamina.application._exchange_spans import new_span_id as _new_span_id
from lamina.application._ports import DispatchResult, ModelCatalog, Route
from lamina.errors import LaminaError
from lamina.observability import LAYER, Breakdown, Deferred, Layer, ModelSeries, Telemetry

log = logging.getLogger("lamina.gateway")

TRACE_HEADER = "x-lamina-trace-id"
#: the per-layer breakdown, ``layer=ms;...`` (observability/_breakdown.py documents the format)
LAYERS_HEADER = "x-lamina-layers"
#: the routes that get a recorded root span and request metrics
METERED = frozenset({"/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
#: where the request's Exchange is kept in the ASGI scope
SCOPE_KEY = "lamina.exchange"
_APPLICATION_LAYER = Layer.APPLICATION.value
_MODELS_LAYER = Layer.MODELS.value
_ORCHESTRATION_LAYER = Layer.ORCHESTRATION.value
#: the ``lamina`` extension of a stream's last event, compact (one encoder, not one per answer)
_COMPACT = json.JSONEncoder(separators=(",", ":"))
#: the fields of the replica's chunk the stream's final event repeats, and that event's one empty choice
_EVENT_KEYS = ("id", "object", "created", "model")
_DELTA_CHOICE = '"choices":[{"index":0,"delta":{},"finish_reason":null}]}'
_TEXT_CHOICE = '"choices":[{"index":0,"text":"","finish_reason":null}]}'
#: a JSON string, as the compact encoder writes it (ASCII)
_quoted = encode_basestring_ascii
#: a plain answer, as Starlette's JSONResponse writes it
_ANSWER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def endpoint_of(path: str) -> str | None:
    """The route a metered request is counted under (None: not metered)."""
    if path in METERED:
        return path
    return "/v1/models/{model}" if path.startswith("/v1/models/") else None


class Exchange:
    """The telemetry of one request, from the first byte received to the last byte sent.

    The gateway's own steps are timestamps on it, not spans: ``auth``, ``parse``, the cache and the
    policies' admissions (``steps``), ``route``, ``admission`` (routing to the first dispatch),
    ``engine`` with its ``queue``, ``prefill``, ``decode`` and ``device`` (the replica's report), and
    ``respond``. Those of another layer than their parent shift the trace's per-layer time as they end;
    all become spans only if the trace is kept (:meth:`_deferred`), which is what keeps tracing cheap.
    """

    __slots__ = (
        "_bound",
        "_bound_ns",
        "_described",
        "_dispatched_ns",
        "_finished",
        "_first_token",
        "_opened",
        "_replied_ns",
        "_replies",
        "_route",
        "_steps",
        "_ttft_s",
        "_waiting",
        "endpoint",
        "model",
        "outcome",
        "reported",
        "series",
        "span",
        "started",
        "steps",
        "telemetry",
    )

    def __init__(self, telemetry: Telemetry, span: trace.Span, endpoint: str | None) -> None:
        self.telemetry = telemetry
        self.span = span
        #: the open trace of the root span (None when spans are not recorded)
        self._opened = telemetry.keeper.trace_of(span)
        self.endpoint = endpoint
        self.started = time.perf_counter()
        #: the deployment serving it, once routed (the ``model`` label of the metrics), and its series
        self.model = ""
        self.series: ModelSeries | None = None
        #: the status to count instead of the HTTP one (a stream that failed after its 200)
        self.outcome: int | None = None
        self._first_token = False
        #: seconds from the request's start to its first content chunk (streams), for the kept trace's root
        self._ttft_s: float | None = None
        #: the series counting it in lamina_num_requests_waiting, until its first dispatch
        self._waiting: ModelSeries | None = None
        #: the breakdown the answer's body reports (the header repeats it)
        self.reported: Breakdown | None = None
        #: when it was routed, first dispatched, and when the (last) reply came: the application steps
        self._bound_ns = self._dispatched_ns = self._replied_ns = 0
        #: the gateway's steps so far, ``(step, start_ns, end_ns)`` (auth, parse, cache, the policies): the
        #: ``Call`` of the request appends its policies' admissions here too
        self.steps: list[tuple[str, int, int]] = []
        #: the ``route`` step: (start_ns, end_ns, the model asked for, its route or the error)
        self._route: tuple[int, int, str, Route | LaminaError] | None = None
        #: kept for the trace's root if it is kept: the request's attributes, its route, its breakdown
        self._described: Callable[[], dict[str, AttributeValue]] | None = None
        self._bound: Route | None = None
        self._finished: Breakdown | None = None
        #: each reply: (its usage, the replica's ``lamina`` extension, its ``model``, its dispatch span)
        self._replies: list[tuple[Mapping[str, Any], Mapping[str, Any], object, trace.Span]] = []
        #: the dispatch spans of its tries
        self._steps: list[DispatchStep] = []

    def timed(self, step: str, since_ns: int) -> None:
        """The step ``step`` ran from ``since_ns`` until now (an application span if the trace is kept)."""
        self.steps.append((step, since_ns, time.time_ns()))

    @staticmethod
    def of(request: Request) -> Exchange:
        exchange = request.scope.get(SCOPE_KEY)
        assert isinstance(exchange, Exchange), "TelemetryMiddleware is not installed"
        return exchange

    @property
    def trace_id(self) -> str:
        opened = self._opened
        trace_id = opened.trace_id if opened is not None else self.span.get_span_context().trace_id
        return format(trace_id, "032x")

    def resolve(self, catalog: ModelCatalog, name: str) -> Route:
        """``catalog.resolve(name)`` as the request's ``route`` step (models); an unknown name fails it."""
        began = time.time_ns()
        try:
            route = catalog.resolve(name)
        except LaminaError as exc:
            self._routed(name, exc, began)
            raise
        self._routed(name, route, began)
        return route

    def _routed(self, name: str, route: Route | LaminaError, since_ns: int) -> None:
        opened = self._opened
        if opened is None:
            return
        end = time.time_ns()
        self._route = (since_ns, end, name, route)  # a span only if the trace is kept (``_route_step``)
        opened.shift(_MODELS_LAYER, _APPLICATION_LAYER, end - since_ns)

    def _route_step(self) -> tuple[int, int, dict[str, AttributeValue], str | None] | None:
        """The ``route`` step of a kept trace: (start_ns, end_ns, its attributes, its error or None)."""
        if self._route is None:
            return None
        since_ns, end, name, route = self._route
        attrs: dict[str, AttributeValue] = {LAYER: _MODELS_LAYER, "gen_ai.request.model": name}
        if isinstance(route, LaminaError):
            return since_ns, end, attrs, f"{route.code}: {route.message}"
        attrs["lamina.deployment"] = route.deployment
        if route.model_version:
            attrs["lamina.model_version"] = route.model_version
        return since_ns, end, attrs, None

    def bind(self, route: Route) -> None:
        """The request is routed: label it with its deployment and count it in flight."""
        self.model = route.deployment
        self._bound = route
        series = self.series = self._waiting = self.telemetry.metrics.model(self.model)
        series.in_flight.inc()
        series.waiting.inc()
        self._bound_ns = time.time_ns()

    def describe(self, attributes: Callable[[], dict[str, AttributeValue]]) -> None:
        """The request's own attributes (model, parameters), made only if its trace is kept."""
        self._described = attributes

    @property
    def bottleneck(self) -> str | None:
        """The layer that took longest, once the request is finished (None: spans not recorded)."""
        result = self._finished or self.reported
        return None if result is None else result.bottleneck

    def breakdown(self) -> Breakdown | None:
        """Where this request's time went so far, per layer (None when its spans are not recorded)."""
        opened = self._opened
        return None if opened is None or opened.closed else opened.breakdown(time.time_ns())

    def with_extension(self, raw: bytes) -> bytes | None:
        """``raw`` (a JSON object) with the ``lamina`` extension added last, written by the breakdown
        (not encoded again), or None when spans are not recorded; the ``x-lamina-layers`` header, if not
        sent yet, says the same."""
        result = self.reported = self.breakdown()
        if result is None:
            return None
        return raw[:-1] + (b',"lamina":' if len(raw) > 2 else b'"lamina":') + result.json() + b"}"

    def answer(self, content: Mapping[str, Any], headers: Mapping[str, str]) -> Response:
        """``content`` as the JSON answer, with the ``lamina`` extension when spans are recorded."""
        raw = _ANSWER.encode(content).encode()
        return Response(self.with_extension(raw) or raw, media_type="application/json", headers=headers)

    def final_event(self, chunk: Mapping[str, Any] | None) -> bytes:
        """The stream's last chunk before ``[DONE]`` when the client asked for no usage chunk: one empty
        choice (no text, no finish reason, so a client reading ``choices[0]`` of every chunk still works)
        and the ``lamina`` extension; ``id``, ``object``, ``created``, ``model`` are the replica's."""
        if self._opened is None:
            return b""
        parts = ["{"]  # written by hand: the encoder's setup costs more than these few fields
        for key in _EVENT_KEYS:
            if chunk and key in chunk:
                value = chunk[key]
                kind = type(value)
                text = (
                    _quoted(value) if kind is str else str(value) if kind is int else _COMPACT.encode(value)
                )
                parts.append(f'"{key}":{text},')
        completion = chunk is not None and chunk.get("object") == "text_completion"
        parts.append(_TEXT_CHOICE if completion else _DELTA_CHOICE)
        shown = self.with_extension("".join(parts).encode())
        return b"" if shown is None else b"data: " + shown + b"\n\n"

    def fail(self, exc: LaminaError) -> None:
        """Mark the request failed with ``exc`` (the error body the client gets says the same)."""
        self.span.set_status(Status(StatusCode.ERROR, f"{exc.code}: {exc.message}"))
        self.span.set_attribute("error.type", exc.code)

    def first_token(self) -> None:
        """The first content chunk is on its way to the client: time to first token, once per request."""
        if self._first_token:
            return
        self._first_token = True
        seconds = self._ttft_s = time.perf_counter() - self.started
        if self._opened is None:  # a span of the SDK's: the attribute now (else only if the trace is kept)
            self.span.set_attribute("lamina.gateway_ttft_ms", round(seconds * 1000, 3))
        self.telemetry.metrics.model(self.model).time_to_first_token.observe(seconds)

    @contextmanager
    def dispatch_span(self, deployment: str) -> Iterator[tuple[trace.Span, dict[str, str]]]:
        """The orchestration span around a dispatcher call (a :class:`DispatchStep`, timestamps until
        the trace is kept), and the headers that carry it to the replica (W3C ``traceparent``)."""
        if self._waiting is not None:  # the first try: the gateway's checks before it are one span
            self._waiting.waiting.dec()
            self._waiting = None
            self._dispatched_ns = time.time_ns()
        running = self.telemetry.metrics.model(deployment).running
        running.inc()
        opened = self._opened
        span: trace.Span
        if opened is not None and not opened.closed:
            attrs: dict[str, AttributeValue] = {LAYER: _ORCHESTRATION_LAYER, "lamina.deployment": deployment}
            # the current span matters only when a span besides the root runs (a model group's attempt)
            parent = trace.get_current_span() if len(opened.running) > 1 else None
            step = DispatchStep(opened, parent, attrs)
            self._steps.append(step)
            span, headers = step, {"traceparent": step.traceparent()}
        else:
            ctx = self.span.get_span_context()
            span = trace.NonRecordingSpan(ctx)
            headers = {"traceparent": f"00-{ctx.trace_id:032x}-{_new_span_id():016x}-{ctx.trace_flags:02x}"}
        try:
            yield span, headers
        except Exception as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            running.dec()
            span.end()

    @staticmethod
    def dispatched(span: trace.Span, result: DispatchResult) -> None:
        if isinstance(span, DispatchStep):
            attrs = span.attributes
            attrs["lamina.replica.id"] = result.replica_id
            attrs["lamina.replica.url"] = result.url
            attrs["lamina.dispatch.attempts"] = result.attempts
            attrs["http.response.status_code"] = result.response.status_code

    def record_reply(self, body: dict[str, Any], dispatch: trace.Span) -> Mapping[str, Any]:
        """Take the replica's ``lamina`` extension out of ``body``; keep it and the usage for the metrics
        (counted in batches) and the trace (the engine's spans, if kept). Returns the extension (empty
        when there was none)."""
        raw = body.pop("lamina", None)
        ext: Mapping[str, Any] = raw if isinstance(raw, dict) else {}
        usage = body.get("usage")
        self._replies.append((usage if isinstance(usage, dict) else {}, ext, body.get("model"), dispatch))
        opened = self._opened
        if opened is not None and isinstance(dispatch, DispatchStep):
            self._replied_ns = now = time.time_ns()
            start, end = ext.get("start_ns"), ext.get("end_ns")
            if isinstance(start, int) and isinstance(end, int) and end >= start:  # the replica's clock
                queue_ms = ext.get("queue_ms")
                queued = int(queue_ms * 1e6) if isinstance(queue_ms, int | float) else 0
                opened.shift(
                    _MODELS_LAYER,
                    _ORCHESTRATION_LAYER,
                    min(end, now) - max(start - queued, dispatch.start_ns),
                )
        return ext

    def finish(self, status: int) -> None:
        """The last byte is sent (or the client left): count the request and end its root span."""
        status = self.outcome or status
        span = self.span
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
        if self.series is not None:
            self.series.in_flight.dec()
        if self._waiting is not None:
            self._waiting.waiting.dec()
            self._waiting = None
        result = self.reported or self.breakdown()
        attributes = getattr(span, "attributes", None) or {}
        cache, limited = attributes.get("lamina.cache"), attributes.get("lamina.rate_limited")
        self.telemetry.metrics.record(
            (
                self.model,
                self.endpoint,
                status,
                time.perf_counter() - self.started,
                [(usage, ext) for usage, ext, _, _ in self._replies],
                None if result is None else result.micros,
                cache if isinstance(cache, str) else None,
                limited if isinstance(limited, str) else None,
            )
        )
        if self._opened is not None:
            self._finished = result
            self._opened.extra = self._deferred
        span.end()

    def _deferred(self) -> tuple[dict[str, AttributeValue], list[Deferred]]:
        """For a trace that is kept: the root's attributes kept aside, and the gateway's steps as spans
        (the root's end is their bound)."""
        root_end = getattr(self.span, "end_time", None) or time.time_ns()
        spans = deferred_spans(
            self.steps,
            self._route_step(),
            (self._bound_ns, self._dispatched_ns),
            (self._replied_ns, root_end),
            [
                (d, ext, usage, self.telemetry.device_span(self.model))
                for usage, ext, _, d in self._replies
                if isinstance(d, DispatchStep)
            ],
        )
        spans.extend(step.deferred() for step in self._steps)
        attributes = root_attributes(self._described, self._bound, self._replies, self._finished)
        if self._ttft_s is not None:
            attributes["lamina.gateway_ttft_ms"] = round(self._ttft_s * 1000, 3)
        return attributes, spans
