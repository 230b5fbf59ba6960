"""The streaming relay: a replica's SSE stream passed to the client byte for byte, as it arrives.

This path is what the tokens/s benchmark measures, so the per-token work is kept to finding the end of
the last complete event and one regex scan of it; the bytes themselves go out as they came in. Only the
events that need the gateway's attention are parsed: those before the first content (to time the first
token), the replica's final usage chunk (``"choices": []``, dropped unless the client asked for usage,
and always stripped of its ``lamina`` extension) and error events.

The relay is an ASGI response that opens the upstream itself, so the status it sends is the replica's:
an error answer is relayed with its status and body, and a dispatcher error raised before the first byte
reaches the gateway's one error handler. A failure after the 200 becomes an SSE error event and ``[DONE]``.

A stream that output guards apply to leaves the per-token path: every event is parsed and its text given
to the stream's :class:`~lamina.application.guards.StreamGuard`, which may hold text back (redaction) or
end the stream with a ``content_blocked`` error event and ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
from anyio import CancelScope
from opentelemetry import trace
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from lamina.application._cache import CacheLookup
from lamina.application._policy import Admission, Usage
from lamina.application._ports import Dispatcher
from lamina.application._tracing import Exchange
from lamina.application.guards import OutputGuards, StreamGuard, stream_guard
from lamina.errors import EngineCrashedError, EngineError, LaminaError, from_body

_DONE = b"data: [DONE]\n\n"
#: headers of a replica's error answer that the client gets too
_KEPT_ERROR_HEADERS = ("retry-after", "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
_EVENT_END = b"\n\n"
#: events worth a look: the usage chunk (no choices) and errors; never matches inside a JSON string,
#: where every quote is escaped
_NOTABLE = re.compile(rb'"choices"\s*:\s*\[\s*\]|"error"\s*:')
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


@dataclass(frozen=True)
class Forward:
    """A request as the replica gets it."""

    deployment: str
    path: str
    body: dict[str, Any]


def _payload(event: bytes) -> bytes:
    return event[5:].strip() if event.startswith(b"data:") else b""


def _has_content(chunk: Any) -> bool:
    choices = chunk.get("choices") if isinstance(chunk, dict) else None
    for choice in choices if isinstance(choices, list) else ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if (isinstance(delta, dict) and delta.get("content")) or (
            isinstance(choice, dict) and choice.get("text")
        ):
            return True
    return False


def upstream_error(status: int, content: bytes) -> LaminaError:
    """The error a replica's error answer stands for (for telemetry: the client gets the answer as is)."""
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    if isinstance(body, dict):
        return from_body(status, body)
    return EngineError(f"the replica answered HTTP {status} without an error body")


def relayed_error(upstream: httpx.Response, content: bytes, exchange: Exchange, span: trace.Span) -> Response:
    """The replica's error answer, status and body unchanged."""
    error = upstream_error(upstream.status_code, content)
    exchange.fail(error)
    span.set_status(trace.Status(trace.StatusCode.ERROR, f"HTTP {upstream.status_code} {error.code}"))
    content_type = upstream.headers.get("content-type", "application/json")
    # when to try again, as the replica (or its upstream) said
    kept = {name: upstream.headers[name] for name in _KEPT_ERROR_HEADERS if name in upstream.headers}
    return Response(content, status_code=upstream.status_code, media_type=content_type, headers=kept)


def _without_text(chunk: dict[str, Any]) -> bytes:
    """``chunk`` with its text taken out of every choice (that text was sent already, held back)."""
    choices = []
    for choice in chunk.get("choices") or []:
        if isinstance(choice, dict):
            choice = {**choice}
            if isinstance(choice.get("delta"), dict):
                choice["delta"] = {k: v for k, v in choice["delta"].items() if k != "content"}
            elif "text" in choice:
                choice["text"] = ""
        choices.append(choice)
    return b"data: " + json.dumps({**chunk, "choices": choices}, separators=(",", ":")).encode() + _EVENT_END


def error_event(exc: LaminaError) -> bytes:
    return b"data: " + json.dumps(exc.to_body()).encode() + _EVENT_END + _DONE


class _Events:
    """Frames the upstream bytes into whole SSE events and decides, per event, what the client gets."""

    def __init__(
        self,
        exchange: Exchange,
        dispatch: trace.Span,
        include_usage: bool,
        admission: Admission,
        replica: str,
        trailer: bytes | None = None,
        guard: StreamGuard | None = None,
        cache: CacheLookup | None = None,
    ) -> None:
        self._guard = guard
        self._guard_done = False
        # the response cache: what the client got, and the replica's usage (sent or not)
        self._cache = cache
        self._sent: list[bytes] | None = [] if cache is not None and cache.stores else None
        self._replica_usage: dict[str, Any] | None = None
        self._admission = admission
        self._replica = replica
        self._trailer = trailer
        self._exchange = exchange
        self._dispatch = dispatch
        self._include_usage = include_usage
        self._pending = b""
        self._content_seen = False
        self.done = False
        #: the replica's usage chunk (its id and model name the final event's), until that event is sent
        self._last: dict[str, Any] | None = None
        #: the usage chunk as sent (with the breakdown) and as the cache keeps it (without)
        self._shown: tuple[bytes, bytes] | None = None

    async def feed(self, data: bytes) -> bytes:
        """The bytes to send for ``data`` (whole events only; a partial event waits for its end)."""
        out = await self._feed(data)
        tail = len(_DONE)  # what stays after the breakdown's chunk: [DONE], and the trailer before it
        if self._trailer is not None and out.endswith(_DONE):  # the trailer goes just before [DONE]
            tail += len(self._trailer)
            out, self._trailer = out[: -len(_DONE)] + self._trailer + _DONE, None
        if self._sent is not None:  # the cache keeps the answer without this request's breakdown
            self._sent.append(out if self._shown is None else out.replace(*self._shown))
        if out.endswith(_DONE) and self._last is not None:  # no usage chunk asked: a last chunk of its own
            final, self._last = self._exchange.final_event(self._last), None
            out = out[:-tail] + final + out[-tail:]
        return out

    async def store(self) -> None:
        """The stream is complete: give the response cache what the client got (it keeps only answers
        without an error event)."""
        if self._cache is not None and self._sent is not None:
            await self._cache.store_stream(b"".join(self._sent), self._replica_usage)

    async def _feed(self, data: bytes) -> bytes:
        buf = self._pending + data if self._pending else data
        cut = buf.rfind(_EVENT_END) + len(_EVENT_END)
        if cut < len(_EVENT_END):
            self._pending = buf
            return b""
        if cut == len(buf):
            ready, self._pending = buf, b""  # the usual case: one write of the replica, whole events
        else:
            ready, self._pending = buf[:cut], buf[cut:]
        if self._content_seen and self._guard is None and _NOTABLE.search(ready) is None:
            self.done = ready.endswith(_DONE)
            return ready  # the per-token path: pass through untouched
        return b"".join(
            [await self._event(e + _EVENT_END) for e in ready[: -len(_EVENT_END)].split(_EVENT_END)]
        )

    async def _event(self, event: bytes) -> bytes:
        payload = _payload(event)
        if payload == b"[DONE]":
            self.done = True
            return await self._guard_end() + event
        if not payload.startswith(b"{"):
            return event
        chunk = json.loads(payload)
        if isinstance(chunk, dict) and isinstance(chunk.get("error"), dict):
            error = from_body(502, chunk)  # the replica failed after its 200: relayed as it is
            self._exchange.fail(error)
            self._exchange.outcome = error.status
            return event
        if isinstance(chunk, dict) and chunk.get("choices") == []:
            return await self._guard_end() + await self._usage(chunk)
        if not self._content_seen and _has_content(chunk):
            self._content_seen = True
            self._exchange.first_token()
        if self._guard is not None and isinstance(chunk, dict):
            return await self._guarded(chunk, event)
        return event

    async def _guarded(self, chunk: dict[str, Any], event: bytes) -> bytes:
        """A chunk through the stream's output guards (a block raises: the stream ends with an error)."""
        assert self._guard is not None
        replaced = await self._guard.chunk(chunk)
        out = event if replaced is None else replaced
        choices = chunk.get("choices")
        finished = isinstance(choices, list) and any(
            isinstance(c, dict) and c.get("finish_reason") for c in choices
        )
        if not finished:
            return out
        tail = await self._guard_end()  # held text goes before the finish reason
        if replaced is None:
            return tail + event
        return replaced + tail + _without_text(chunk)

    async def _guard_end(self) -> bytes:
        """The end of the answer for the output guards (once): the last check and any held text."""
        if self._guard is None or self._guard_done:
            return b""
        self._guard_done = True
        return await self._guard.end()

    async def _usage(self, chunk: dict[str, Any]) -> bytes:
        ext = self._exchange.record_reply(chunk, self._dispatch)  # takes the lamina extension out
        self._last = None if self._include_usage else chunk
        if isinstance(chunk.get("usage"), dict):
            self._replica_usage = dict(chunk["usage"])
        call = self._admission.call
        with anyio.CancelScope(shield=True):
            await self._admission.settle(Usage.of(chunk.get("usage"), ext, self._replica))
        if not self._include_usage:
            return b""
        if call.usage_extra and isinstance(chunk.get("usage"), dict):
            chunk["usage"] = {**chunk["usage"], **call.usage_extra}
        raw = json.dumps(chunk, separators=(",", ":")).encode()
        plain = b"data: " + raw + _EVENT_END
        layers = self._exchange.with_extension(raw)  # the last chunk carries the per-layer breakdown
        if layers is None:
            return plain
        shown = b"data: " + layers + _EVENT_END
        self._shown = (shown, plain)
        return shown


class StreamRelay(Response):
    """``POST`` with ``"stream": true``, answered by relaying a replica's stream (see the module doc)."""

    media_type = "text/event-stream"

    def __init__(
        self,
        dispatcher: Dispatcher,
        forward: Forward,
        exchange: Exchange,
        include_usage: bool,
        admission: Admission,
        trailer: bytes | None = None,
        guards: OutputGuards | None = None,
        cache: CacheLookup | None = None,
    ) -> None:
        self._cache = cache
        self._guards = guards
        self._admission = admission
        self._trailer = trailer
        self._dispatcher = dispatcher
        self._forward = forward
        self._exchange = exchange
        self._include_usage = include_usage
        self.status_code = 200
        self.background = None
        self._gone = False

    def again(self, forward: Forward, admission: Admission) -> StreamRelay:
        """This stream sent to ``forward`` under ``admission``: a later try of a model group
        (application/_fallback_stream.py), neither looked up in nor stored to the cache."""
        return StreamRelay(
            self._dispatcher,
            forward,
            self._exchange,
            self._include_usage,
            admission,
            self._trailer,
            self._guards,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._relay(scope, receive, send)
        finally:  # no usage came (an error, the client left): the policies release what they reserved
            with anyio.CancelScope(shield=True):
                await self._admission.settle(None)

    async def _relay(self, scope: Scope, receive: Receive, send: Send) -> None:
        fwd, exchange = self._forward, self._exchange
        with exchange.dispatch_span(fwd.deployment) as (span, headers):
            async with self._dispatcher.stream(fwd.deployment, fwd.path, fwd.body, headers=headers) as result:
                exchange.dispatched(span, result)
                upstream = result.response
                if upstream.status_code >= 400:
                    refusal = relayed_error(upstream, await upstream.aread(), exchange, span)
                    await refusal(scope, receive, send)
                    return
                sse = _SSE_HEADERS + [
                    (k.encode(), v.encode()) for k, v in self._admission.call.headers.items()
                ]
                await send({"type": "http.response.start", "status": 200, "headers": sse})
                guard = None if self._guards is None else stream_guard(self._guards, self._admission.call)
                events = _Events(
                    exchange,
                    span,
                    self._include_usage,
                    self._admission,
                    result.replica_id,
                    self._trailer,
                    guard,
                    self._cache,
                )
                # the watcher is a bare task, as in _plain.py: a task group's cancelled child left its
                # CancelledError's traceback in a cycle with the loop's frames (about 90 objects a stream
                # for the cyclic collector)
                with anyio.CancelScope() as pumping:
                    watcher = asyncio.ensure_future(self._watch_disconnect(receive, pumping))
                    try:
                        await self._pump(upstream, events, span, result.replica_id, send)
                    finally:
                        watcher.cancel()
        if not self._gone:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        if self.background is not None:
            await self.background()

    async def _pump(
        self, upstream: httpx.Response, events: _Events, span: trace.Span, replica: str, send: Send
    ) -> None:
        try:
            async for data in upstream.aiter_bytes():
                out = await events.feed(data)
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
            if not events.done:
                raise httpx.RemoteProtocolError("the stream ended without its final `data: [DONE]`")
            await events.store()
        except (httpx.HTTPError, LaminaError, ValueError) as exc:
            error = exc if isinstance(exc, LaminaError) else self._broken(exc, replica)
            span.record_exception(exc)
            span.set_status(trace.Status(trace.StatusCode.ERROR, error.code))
            self._exchange.fail(error)
            self._exchange.outcome = error.status
            # a partial event the replica left unfinished is dropped: it would garble the error event
            await send({"type": "http.response.body", "body": error_event(error), "more_body": True})
        except OSError:
            self._client_gone()  # a server on ASGI 2.4 says so by failing the send

    def _broken(self, exc: Exception, replica: str) -> LaminaError:
        return EngineCrashedError(
            f"the replica {replica} of {self._forward.deployment} broke off the stream ({exc}); "
            "the text so far is incomplete: send the request again"
        )

    async def _watch_disconnect(self, receive: Receive, scope: CancelScope) -> None:
        """Stop relaying (and so stop the replica's work) as soon as the client goes away."""
        await until_disconnected(receive)
        self._client_gone()
        scope.cancel()

    def _client_gone(self) -> None:
        self._gone = True
        client_gone(self._exchange)


async def until_disconnected(receive: Receive) -> None:
    """Return when the client disconnects (call once the request body has been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def client_gone(exchange: Exchange) -> None:
    """Record on the request that its client left before the answer was complete."""
    exchange.outcome = 499  # nginx's "client closed request"
    exchange.span.set_attribute("lamina.client_disconnected", True)
