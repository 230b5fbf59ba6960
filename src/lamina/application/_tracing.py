"""One request's telemetry: its root span, its ``x-lamina-trace-id`` header and its metrics.

:class:`TelemetryMiddleware` opens the root span of every API request and closes it (and counts the
request) when the response has been sent, streams included. The handlers reach the request's
:class:`Exchange` through the ASGI scope and hang the child spans and the usage on it. Probes and unknown
paths get a trace id too, from a span that is not recorded, so the spans table holds API traffic only.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import SpanContext, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lamina.application._ports import DispatchResult, Route
from lamina.errors import LaminaError
from lamina.observability import LAYER, Breakdown, Layer, Telemetry

log = logging.getLogger("lamina.gateway")

TRACE_HEADER = "x-lamina-trace-id"
#: the per-layer breakdown, ``layer=ms;...`` (observability/_breakdown.py documents the format)
LAYERS_HEADER = "x-lamina-layers"
#: the routes that get a recorded root span and request metrics
METERED = frozenset({"/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
_SCOPE_KEY = "lamina.exchange"
_LAYERS_HEADER = LAYERS_HEADER.encode()
_IDS = RandomIdGenerator()
#: the attributes of the application steps recorded after the fact (shared: records are never changed)
_APPLICATION: dict[str, AttributeValue] = {LAYER: Layer.APPLICATION.value}
_MODELS: dict[str, AttributeValue] = {LAYER: Layer.MODELS.value}
_PROPAGATOR = TraceContextTextMapPropagator()


def _endpoint(path: str) -> str | None:
    if path in METERED:
        return path
    return "/v1/models/{model}" if path.startswith("/v1/models/") else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class Exchange:
    """The telemetry of one request, from the first byte received to the last byte sent."""

    def __init__(self, telemetry: Telemetry, span: trace.Span, endpoint: str | None) -> None:
        self.telemetry = telemetry
        self.span = span
        self.endpoint = endpoint
        self.started = time.perf_counter()
        #: the deployment serving it, once routed (the ``model`` label of the metrics)
        self.model = ""
        #: the status to count instead of the HTTP one (a stream that failed after its 200)
        self.outcome: int | None = None
        self._in_flight = False
        self._first_token = False
        #: the deployment counted in lamina_num_requests_waiting, until its first dispatch
        self._waiting: str | None = None
        #: the breakdown the answer's body reports (the header repeats it)
        self.reported: Breakdown | None = None
        #: when it was routed, and when the (last) reply came: the bounds of the application steps
        self._bound_ns = 0
        self._replied_ns = 0
        #: the gateway's steps so far, ``(step, start_ns, end_ns)`` (auth, parse, cache, the policies): the
        #: ``Call`` of the request appends its policies' admissions here too
        self.steps: list[tuple[str, int, int]] = []

    def timed(self, step: str, since_ns: int) -> None:
        """The step ``step`` ran from ``since_ns`` until now (an application span if the trace is kept)."""
        self.steps.append((step, since_ns, time.time_ns()))

    @staticmethod
    def of(request: Request) -> Exchange:
        exchange = request.scope.get(_SCOPE_KEY)
        assert isinstance(exchange, Exchange), "TelemetryMiddleware is not installed"
        return exchange

    @property
    def trace_id(self) -> str:
        return format(self.span.get_span_context().trace_id, "032x")

    def bind(self, route: Route) -> None:
        """The request is routed: label it with its deployment and count it in flight."""
        self.model = route.deployment
        self.span.set_attribute("lamina.deployment", route.deployment)
        self.span.set_attribute("gen_ai.response.model", route.served_name)
        if route.model_version:
            self.span.set_attribute("lamina.model_version", route.model_version)
        metrics = self.telemetry.metrics
        metrics.child(metrics.in_flight, self.model).inc()
        self._in_flight = True
        metrics.child(metrics.engine.waiting, self.model).inc()
        self._waiting = self.model
        self._bound_ns = time.time_ns()

    def breakdown(self) -> Breakdown | None:
        """Where this request's time went so far, per layer (None when its spans are not recorded)."""
        return self.telemetry.keeper.breakdown(self.span)

    def extension(self) -> dict[str, Any] | None:
        """The ``lamina`` extension of the answer: ``{"layers": {layer: ms}, "bottleneck", "total_ms"}``;
        the response's ``x-lamina-layers`` header, if not sent yet, says the same."""
        result = self.reported = self.breakdown()
        return None if result is None else result.as_json()

    def final_event(self, chunk: Mapping[str, Any] | None) -> bytes:
        """The stream's last chunk before ``[DONE]`` when the client asked for no usage chunk: one empty
        choice (no text, no finish reason, so a client reading ``choices[0]`` of every chunk still works)
        and the ``lamina`` extension; ``id``, ``object``, ``created``, ``model`` are the replica's."""
        ext = self.extension()
        if ext is None:
            return b""
        event: dict[str, Any] = {
            k: chunk[k] for k in ("id", "object", "created", "model") if chunk and k in chunk
        }
        completion = event.get("object") == "text_completion"
        empty: dict[str, Any] = {"text": ""} if completion else {"delta": {}}
        event["choices"] = [{"index": 0, **empty, "finish_reason": None}]
        event["lamina"] = ext
        return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"

    @contextmanager
    def step(self, name: str, layer: Layer = Layer.APPLICATION) -> Iterator[trace.Span]:
        """A child span of this request for one step (auth, limits, guards, cache, template, ...)."""
        with self.telemetry.span(name, layer) as span:
            yield span

    def _dispatching(self, deployment: str) -> None:
        metrics = self.telemetry.metrics
        if self._waiting is not None:  # the first try: the gateway's checks before it are one span
            metrics.child(metrics.engine.waiting, self._waiting).dec()
            self._waiting = None
            self._step("admission", self._bound_ns)
        metrics.child(metrics.engine.running, deployment).inc()

    def _step(self, name: str, since_ns: int) -> None:
        """An application span of the root from ``since_ns`` to now, recorded after the fact (cheap):
        ``admission`` (between routing and the first dispatch: the cache lookup, rate limits, budgets,
        input guards as its children) and ``respond`` (output guards, cache store, settling, sending,
        after the reply). Steps timed before ``since_ns`` (auth, parsing) hang off the root."""
        if not self.span.is_recording():
            return
        ctx = self.span.get_span_context()
        add, trace_id, root = self.telemetry.keeper.add, ctx.trace_id, ctx.span_id
        steps, self.steps = self.steps, []
        for step, start, end in steps:
            if not since_ns or start < since_ns:
                add(trace_id, root, step, _APPLICATION, start, end)
        if since_ns:
            inside = tuple((s, _APPLICATION, start, end) for s, start, end in steps if start >= since_ns)
            add(trace_id, root, name, _APPLICATION, since_ns, time.time_ns(), inside)

    def fail(self, exc: LaminaError) -> None:
        """Mark the request failed with ``exc`` (the error body the client gets says the same)."""
        self.span.set_status(Status(StatusCode.ERROR, f"{exc.code}: {exc.message}"))
        self.span.set_attribute("error.type", exc.code)

    def first_token(self) -> None:
        """The first content chunk is on its way to the client: time to first token, once per request."""
        if self._first_token:
            return
        self._first_token = True
        seconds = time.perf_counter() - self.started
        self.span.set_attribute("lamina.gateway_ttft_ms", round(seconds * 1000, 3))
        self.telemetry.metrics.observe_first_token(model=self.model, seconds=seconds)

    @contextmanager
    def dispatch_span(self, deployment: str) -> Iterator[tuple[trace.Span, dict[str, str]]]:
        """The orchestration span around a dispatcher call, and the headers that carry it to the replica."""
        attrs: dict[str, AttributeValue] = {LAYER: Layer.ORCHESTRATION.value, "lamina.deployment": deployment}
        self._dispatching(deployment)
        try:
            with self.telemetry.tracer.start_as_current_span("dispatch", attributes=attrs) as span:
                headers: dict[str, str] = {}
                _PROPAGATOR.inject(headers)
                yield span, headers
        finally:
            metrics = self.telemetry.metrics
            metrics.child(metrics.engine.running, deployment).dec()

    @staticmethod
    def dispatched(span: trace.Span, result: DispatchResult) -> None:
        span.set_attribute("lamina.replica.id", result.replica_id)
        span.set_attribute("lamina.replica.url", result.url)
        span.set_attribute("lamina.dispatch.attempts", result.attempts)
        span.set_attribute("http.response.status_code", result.response.status_code)

    def record_reply(self, body: dict[str, Any], dispatch: trace.Span) -> Mapping[str, Any]:
        """Take the replica's ``lamina`` extension out of ``body``; turn it and the usage into telemetry.
        Returns the extension (empty when there was none)."""
        raw = body.pop("lamina", None)
        ext: Mapping[str, Any] = raw if isinstance(raw, dict) else {}
        if isinstance(body.get("model"), str):
            self.span.set_attribute("gen_ai.response.model", body["model"])
        if isinstance(ext.get("model_version"), str):
            self.span.set_attribute("lamina.model_version", ext["model_version"])
        usage: Mapping[str, Any] = body["usage"] if isinstance(body.get("usage"), dict) else {}
        tokens_in, tokens_out = _number(usage.get("prompt_tokens")), _number(usage.get("completion_tokens"))
        if tokens_in is not None:
            self.span.set_attribute("gen_ai.usage.input_tokens", int(tokens_in))
        if tokens_out is not None:
            self.span.set_attribute("gen_ai.usage.output_tokens", int(tokens_out))
        engine_ms = _number(ext.get("engine_ms"))
        metrics = self.telemetry.metrics
        metrics.observe_tokens(
            model=self.model,
            input_tokens=int(tokens_in or 0),
            output_tokens=int(tokens_out or 0),
            seconds=engine_ms / 1000 if engine_ms is not None else None,
        )
        queue_ms, ttft_ms = _number(ext.get("queue_ms")), _number(ext.get("ttft_ms"))
        prefill_ms = None if ttft_ms is None or queue_ms is None else max(ttft_ms - queue_ms, 0.0)
        decode_ms = None
        if engine_ms is not None and prefill_ms is not None and tokens_out is not None:
            decode_ms = max(engine_ms - prefill_ms, 0.0)
        metrics.engine.observe_engine(
            self.model,
            queue_ms=queue_ms,
            prefill_ms=prefill_ms if tokens_out is not None else None,
            decode_ms=decode_ms,
            output_tokens=int(tokens_out or 0),
        )
        details = usage.get("prompt_tokens_details")
        cached = _number(details.get("cached_tokens")) if isinstance(details, dict) else None
        if cached is not None and tokens_in is not None:
            metrics.engine.observe_prefix_cache(
                self.model, prompt_tokens=int(tokens_in), cached_tokens=int(cached)
            )
        if self.span.is_recording():
            self._replied_ns = time.time_ns()
            self._engine_span(dispatch, ext, prefill_ms, tokens_out is not None)
        return ext

    def _engine_span(
        self, parent: trace.Span, ext: Mapping[str, Any], prefill_ms: float | None, generates: bool
    ) -> None:
        """The replica's work as spans timed by the replica's clock (same host): ``engine`` (models) from
        receipt to the end, with ``queue``, then ``prefill`` up to the first token and ``decode`` after it
        (``embed`` for an embedding), and ``device`` (compute): the device and its utilisation then."""
        start, end = ext.get("start_ns"), ext.get("end_ns")
        if not (isinstance(start, int) and isinstance(end, int)) or isinstance(start, bool) or end < start:
            return
        queue_ms = _number(ext.get("queue_ms")) or 0.0
        received = max(start - int(queue_ms * 1e6), 0)
        attrs: dict[str, AttributeValue] = {LAYER: Layer.MODELS.value}
        for key in ("queue_ms", "ttft_ms", "engine_ms", "compute_ms"):
            value = _number(ext.get(key))
            if value is not None:
                attrs[f"lamina.{key}"] = value
        if isinstance(ext.get("model_version"), str):
            attrs["lamina.model_version"] = ext["model_version"]
        models = _MODELS
        later: list[tuple[str, dict[str, AttributeValue], int, int]] = []
        if start > received:
            later.append(("queue", models, received, start))
        if generates and prefill_ms is not None:
            first = min(max(start + int(prefill_ms * 1e6), start), end)
            later.append(("prefill", models, start, first))
            if end > first:
                later.append(("decode", models, first, end))
        else:
            later.append(("embed" if not generates else "generate", models, start, end))
        later.append(("device", self.telemetry.device_span(self.model), start, start))
        ctx = parent.get_span_context()
        # records, not spans: cheap unless the trace is kept
        self.telemetry.keeper.add(ctx.trace_id, ctx.span_id, "engine", attrs, received, end, tuple(later))

    def finish(self, status: int) -> None:
        """The last byte is sent (or the client left): count the request and end its root span."""
        status = self.outcome or status
        self.span.set_attribute("http.response.status_code", status)
        if status >= 500:
            self.span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
        metrics = self.telemetry.metrics
        if self._in_flight:
            metrics.child(metrics.in_flight, self.model).dec()
        if self._waiting is not None:
            metrics.child(metrics.engine.waiting, self._waiting).dec()
            self._waiting = None
        if self.endpoint is not None:
            seconds = time.perf_counter() - self.started
            metrics.observe_request(endpoint=self.endpoint, model=self.model, status=status, seconds=seconds)
            if self.model:
                metrics.child(metrics.engine.e2e, self.model).observe(seconds)
        self._step("respond", self._replied_ns)
        self._count_outcomes()
        self.span.end()

    def _count_outcomes(self) -> None:
        """The per-layer time and what the policies recorded on the root span, as metrics: the breakdown
        the answer reported (all but the sending of its last bytes), else the one of now."""
        result = self.reported or self.breakdown()
        if result is None:
            return
        traffic, child = self.telemetry.metrics.traffic, self.telemetry.metrics.child
        for layer, ms in result.layers.items():
            if ms > 0:
                child(traffic.layer_seconds, layer).inc(ms / 1000)
        bottleneck = result.bottleneck
        if bottleneck is not None:
            child(traffic.bottleneck, bottleneck).inc()
            self.span.set_attribute("lamina.bottleneck", bottleneck)
        attributes = getattr(self.span, "attributes", None) or {}
        cache = attributes.get("lamina.cache")
        if isinstance(cache, str):
            child(traffic.cache, cache).inc()
        limited = attributes.get("lamina.rate_limited")
        if isinstance(limited, str):
            child(traffic.rate_limited, limited).inc()


def internal_error(trace_id: str) -> LaminaError:
    """What a client sees of a bug: a generic error whose trace id finds the logged traceback."""
    return LaminaError(
        f"internal error in the gateway; its log has the details under trace id {trace_id}. "
        "Retry, and report the trace id if it happens again"
    )


class TelemetryMiddleware:
    """Root span, trace id header and request metrics around every HTTP request (a pure ASGI middleware).

    It is also the last resort for bugs: an unexpected exception becomes a logged, generic 500 that still
    carries the trace id header (the LaminaErrors were already rendered by the gateway's handler).
    """

    def __init__(self, app: ASGIApp, telemetry: Telemetry) -> None:
        self.app = app
        self.telemetry = telemetry

    def _root_span(self, scope: Scope, endpoint: str | None) -> trace.Span:
        if endpoint is None:
            ctx = SpanContext(_IDS.generate_trace_id(), _IDS.generate_span_id(), is_remote=False)
            return trace.NonRecordingSpan(ctx)
        method = str(scope.get("method", "GET"))
        attrs: dict[str, AttributeValue] = {
            LAYER: Layer.APPLICATION.value,
            "http.request.method": method,
            "http.route": endpoint,
            "url.path": str(scope.get("path", "")),
        }
        return self.telemetry.tracer.start_span(f"{method} {endpoint}", Context(), attributes=attrs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = _endpoint(str(scope.get("path", "")))
        exchange = Exchange(self.telemetry, self._root_span(scope, endpoint), endpoint)
        scope[_SCOPE_KEY] = exchange
        header = (TRACE_HEADER.encode(), exchange.trace_id.encode())
        status: int | None = None

        async def send_traced(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [*message.get("headers", []), header]
                layers = exchange.reported or exchange.breakdown()  # a stream's: up to its first byte
                if layers is not None:
                    headers.append((_LAYERS_HEADER, layers.header().encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            with trace.use_span(exchange.span, record_exception=False, set_status_on_exception=False):
                await self.app(scope, receive, send_traced)
        except Exception as exc:
            exchange.span.record_exception(exc)
            if status is not None:
                raise  # the response is under way: the server closes the connection and logs it
            log.exception("unexpected error serving %s (trace id %s)", scope.get("path"), exchange.trace_id)
            error = internal_error(exchange.trace_id)
            exchange.fail(error)
            await JSONResponse(error.to_body(), status_code=error.status)(scope, receive, send_traced)
        finally:
            exchange.finish(status or 500)
