"""The ASGI middleware that opens every request's root span and :class:`Exchange`, and closes them.

:class:`TelemetryMiddleware` opens the root span of every API request and closes it (and counts the
request) when the response has been sent, streams included. Probes and unknown paths get a trace id too,
from a span that is not recorded, so the spans table holds API traffic only.
"""

from __future__ import annotations

import logging
import time

from opentelemetry import trace
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import SpanContext
from opentelemetry.util.types import AttributeValue
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lamina.application._tracing import LAYERS_HEADER, SCOPE_KEY, TRACE_HEADER, Exchange, endpoint_of, log
from lamina.errors import LaminaError
from lamina.observability import LAYER, Layer, Telemetry, caller_of

_LAYERS_HEADER = LAYERS_HEADER.encode()
_TRACE_HEADER = TRACE_HEADER.encode()
_IDS = RandomIdGenerator()
_APPLICATION_LAYER = Layer.APPLICATION.value
#: one line per API request when ``observability.access_log`` is on
access_log = logging.getLogger("lamina.access")
#: the paths the access log covers: the API's (probes, scrapes and the dashboard's polls would drown it)
_LOGGED = ("/v1/", "/admin/v1/")


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
            LAYER: _APPLICATION_LAYER,
            "http.request.method": method,
            "http.route": endpoint,
            "url.path": str(scope.get("path", "")),
        }
        caller = None
        for name, value in scope["headers"] if self.telemetry.tracing else ():
            if name == b"traceparent":  # the caller's trace, which the exported spans join
                caller = caller_of(value)
                if caller is not None:
                    attrs["lamina.caller.traceparent"] = value.decode("ascii")
                break
        return self.telemetry.tracer.start_root(f"{method} {endpoint}", attributes=attrs, caller=caller)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = endpoint_of(str(scope.get("path", "")))
        exchange = Exchange(self.telemetry, self._root_span(scope, endpoint), endpoint)
        scope[SCOPE_KEY] = exchange
        header = (_TRACE_HEADER, exchange.trace_id.encode())
        status: int | None = None

        async def send_traced(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [*message.get("headers", []), header]
                layers = exchange.reported or exchange.breakdown()  # a stream's: up to its first byte
                if layers is not None:
                    headers.append((_LAYERS_HEADER, layers.header_bytes()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            with trace.use_span(exchange.span, record_exception=False, set_status_on_exception=False):
                await self.app(scope, receive, send_traced)
        except Exception as exc:
            exchange.span.record_exception(exc)
            if status is not None:
                raise  # the response is under way: the server closes the connection and logs it
            trace_id = exchange.trace_id
            log.exception(
                "unexpected error serving %s (trace id %s)",
                scope.get("path"),
                trace_id,
                extra={"trace_id": trace_id},
            )
            error = internal_error(trace_id)
            exchange.fail(error)
            await JSONResponse(error.to_body(), status_code=error.status)(scope, receive, send_traced)
        finally:
            exchange.finish(status or 500)


class AccessLog:
    """The access log (``observability.access_log``): a line for each API request, refused ones
    included, written when its last byte is sent. The outermost middleware: it reads what the
    :class:`TelemetryMiddleware` within left in the scope (the request's :class:`Exchange`); a request
    refused before it (the site guard's 403 and 415) has no model, bottleneck or trace."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if scope["type"] != "http" or not path.startswith(_LOGGED):
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def seen(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, seen)
        finally:
            _log_access(scope, scope.get(SCOPE_KEY), status, time.perf_counter() - started)


def _log_access(scope: Scope, exchange: Exchange | None, status: int, seconds: float) -> None:
    """``POST /v1/chat/completions 200 812.4 ms model=chat bottleneck=models trace=...`` (as JSON, the
    same as fields)."""
    method, path, ms = str(scope.get("method", "")), str(scope.get("path", "")), round(seconds * 1000, 1)
    model = bottleneck = trace_id = None
    if isinstance(exchange, Exchange):
        model, bottleneck, trace_id = exchange.model or None, exchange.bottleneck, exchange.trace_id
        status = exchange.outcome or status  # as the metrics count it: 499 for a client that left
    fields = {"method": method, "path": path, "status": status, "duration_ms": ms, "model": model}
    fields["bottleneck"] = bottleneck
    access_log.info(
        "%s %s %d %.1f ms model=%s bottleneck=%s trace=%s",
        method,
        path,
        status,
        ms,
        model or "-",
        bottleneck or "-",
        trace_id or "-",
        extra={"fields": fields, "trace_id": trace_id},
    )
