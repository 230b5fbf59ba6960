"""One request's telemetry: its root span, its ``x-lamina-trace-id`` header and its metrics.

:class:`TelemetryMiddleware` opens the root span of every API request and closes it (and counts the
request) when the response has been sent, streams included. The handlers reach the request's
:class:`Exchange` through the ASGI scope and hang the child spans and the usage on it. Probes and unknown
paths get a trace id too, from a span that is not recorded, so the spans table holds API traffic only.
"""

from __future__ import annotations

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
from lamina.observability import LAYER, Layer, Telemetry

log = logging.getLogger("lamina.gateway")

TRACE_HEADER = "x-lamina-trace-id"
#: the routes that get a recorded root span and request metrics
METERED = frozenset({"/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
_SCOPE_KEY = "lamina.exchange"
_IDS = RandomIdGenerator()
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
        self.telemetry.metrics.in_flight.labels(self.model).inc()
        self._in_flight = True

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
        with self.telemetry.tracer.start_as_current_span("dispatch", attributes=attrs) as span:
            headers: dict[str, str] = {}
            _PROPAGATOR.inject(headers)
            yield span, headers

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
        self.telemetry.metrics.observe_tokens(
            model=self.model,
            input_tokens=int(tokens_in or 0),
            output_tokens=int(tokens_out or 0),
            seconds=engine_ms / 1000 if engine_ms is not None else None,
        )
        self._engine_span(dispatch, ext)
        return ext

    def _engine_span(self, parent: trace.Span, ext: Mapping[str, Any]) -> None:
        """The replica's engine work as a span of its own, timed by the replica's clock (same host)."""
        start, end = ext.get("start_ns"), ext.get("end_ns")
        if not (isinstance(start, int) and isinstance(end, int)) or isinstance(start, bool) or end < start:
            return
        attrs: dict[str, AttributeValue] = {LAYER: Layer.MODELS.value}
        for key in ("queue_ms", "ttft_ms", "engine_ms"):
            value = _number(ext.get(key))
            if value is not None:
                attrs[f"lamina.{key}"] = value
        if isinstance(ext.get("model_version"), str):
            attrs["lamina.model_version"] = ext["model_version"]
        context = trace.set_span_in_context(parent)
        self.telemetry.tracer.start_span("engine", context, attributes=attrs, start_time=start).end(end)

    def finish(self, status: int) -> None:
        """The last byte is sent (or the client left): count the request and end its root span."""
        status = self.outcome or status
        self.span.set_attribute("http.response.status_code", status)
        if status >= 500:
            self.span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
        if self._in_flight:
            self.telemetry.metrics.in_flight.labels(self.model).dec()
        if self.endpoint is not None:
            seconds = time.perf_counter() - self.started
            self.telemetry.metrics.observe_request(
                endpoint=self.endpoint, model=self.model, status=status, seconds=seconds
            )
        self.span.end()


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
                message = {**message, "headers": [*message.get("headers", []), header]}
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
