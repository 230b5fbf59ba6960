"""A model group's stream: one relay per try, failures held back from the client, the answer continued.

Streams (:class:`FallbackStream`) watch what their relay sends. A failure before the 200 (an error answer,
a dispatcher error, the timeout) moves to the next member as a plain call does. A failure after it, where
the relay would end the stream with an error event (the replica died, or sent an error event of a 5xx
kind), is continued: the next member gets the original request again, and what it streams is compared
with the text the client already has. While it reproduces that text nothing is sent; past it, the rest
goes out; if it says something else, the stream ends with a clean ``engine_crashed`` error event saying
how far the text is good. Restarting was chosen over asking the fallback to continue an assistant prefix:
few OpenAI-compatible servers continue a final assistant message (most answer it as a new turn), while a
restart is exact for the deterministic cases (the same model elsewhere at temperature 0, a seed) and
detectably wrong otherwise, so the client never gets a silently spliced or truncated answer. Each
continuation is a new admission under the policies (the broken try is settled with nothing).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from lamina.application._relay import Forward, error_event
from lamina.application._routing import Tries, recovered, retryable, tried_next
from lamina.application._tracing import Exchange
from lamina.errors import EngineCrashedError, LaminaError, UpstreamTimeoutError, from_body

_ERROR = re.compile(rb'"error"\s*:')
_EVENT_END = b"\n\n"


#: builds the relay of a later try: (member, its forward) -> an ASGI response streaming it
RelayFactory = Callable[[str, Forward], Awaitable[Callable[[Scope, Receive, Send], Awaitable[None]]]]


class FallbackStream(Response):
    """A group's stream: its relays, one per try, with the continuation of the module doc."""

    media_type = "text/event-stream"

    def __init__(
        self, tries: Tries, fwd: Forward, exchange: Exchange, first: Response, relay_to: RelayFactory
    ) -> None:
        self._tries, self._fwd, self._exchange = tries, fwd, exchange
        self._first, self._relay_to = first, relay_to
        self.status_code = 200
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tries, router = self._tries, self._tries.router
        tap = _Tap(send)
        last: LaminaError | None = None
        for number, member in enumerate(tries.members):
            if not await tries._pause(number):
                break
            try:
                relay = (
                    self._first
                    if number == 0
                    else await self._relay_to(member, tries._forward(member, self._fwd))
                )
            except LaminaError as exc:  # the policies refused the later try (a rate limit, a budget)
                return await self._fatal(tap, exc)
            tap.next_try()
            fatal: LaminaError | None = None
            started = time.perf_counter()
            with router.attempt(member, number + 1) as span:
                with anyio.CancelScope() as scope_:
                    scope_.deadline = anyio.current_time() + tries._limit()
                    tap.on_start = _lifting(scope_)
                    try:
                        await relay(scope, receive, tap)
                    except LaminaError as exc:  # raised before this try's answer began
                        tap.failure = exc
                        fatal = None if retryable(exc.status) else exc
                if scope_.cancelled_caught and tap.failure is None:
                    tap.failure = UpstreamTimeoutError(f"{member} did not start its answer in time")
                if tap.failure is not None:
                    tried_next(span, tap.failure.status)
            if fatal is not None:
                return await self._fatal(tap, fatal)
            if tap.failure is None:  # its latency: until its answer started (the length is the client's)
                router.latency.record(member, (tap.started_at or time.perf_counter()) - started)
                recovered(self._exchange, number)
                return await tap.close()
            last = tap.failure
            if tap.diverged:
                break
        if not tap.started and tap.held:
            for message in tap.held:
                await send(message)
        elif not tap.started:
            raise last or UpstreamTimeoutError(f"no member of {tries.group.name!r} could be tried in time")
        else:
            await tap.give_up(last)

    @staticmethod
    async def _fatal(tap: _Tap, error: LaminaError) -> None:
        """An error no other member can help with: the error answer, or the stream's last event."""
        if not tap.started:
            raise error
        await tap.give_up(error)


def _lifting(scope: anyio.CancelScope) -> Callable[[], None]:
    """Lifts the try's timeout once its answer has started."""

    def lift() -> None:
        scope.deadline = math.inf

    return lift


class _Tap:
    """Between the relays and the client: forwards, remembers what the client has, holds failures back."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.on_start: Callable[[], None] = lambda: None
        self.started_at: float | None = None
        self.failure: LaminaError | None = None
        self.diverged = False
        self._closed = False
        self._sent = bytearray()
        self._pending = b""
        #: while continuing: the client's text per choice, and the fallback's so far
        self._have: dict[int, str] | None = None
        self._redo: dict[int, str] = {}
        #: the last error answer received before the stream began (start and body messages)
        self.held: list[Message] = []

    def next_try(self) -> None:
        self.failure, self._closed, self._pending, self.diverged = None, False, b"", False
        if self.started:
            self._have, self._redo = _texts(bytes(self._sent)), {}
        self.on_start, self.started_at = (lambda: None), None

    async def __call__(self, message: Message) -> None:
        if self.failure is not None:  # the rest of a failed try (its error event, its end) stays here
            if self.held:
                self.held.append(message)  # an error answer before the stream began: kept to relay it last
            return
        if message["type"] == "http.response.start":
            status = int(message["status"])
            if retryable(status) or (self.started and status != 200):
                self.failure = EngineCrashedError(f"the member answered HTTP {status}")
                self.held = [] if self.started else [message]
                return
            self.on_start()
            self.started_at = time.perf_counter()
            if not self.started:
                self.started, self.held = True, []
                await self._send(message)
            return
        body: bytes = message.get("body", b"")
        if not message.get("more_body", False):
            self._closed = True
        if body:
            await self._body(body)

    async def _body(self, body: bytes) -> None:
        if self._have is None and _ERROR.search(body) is None:
            self._sent += body
            await self._send({"type": "http.response.body", "body": body, "more_body": True})
            return
        buf = self._pending + body
        cut = buf.rfind(_EVENT_END) + len(_EVENT_END)
        ready, self._pending = buf[:cut], buf[cut:]
        kept = []
        for event in ready.split(_EVENT_END)[:-1]:
            one = self._event(event + _EVENT_END)
            if self.failure is not None:
                break
            kept.append(one)
        if out := b"".join(kept):
            self._sent += out
            await self._send({"type": "http.response.body", "body": out, "more_body": True})

    def _event(self, event: bytes) -> bytes:
        chunk = _json(event)
        if isinstance(chunk, dict) and isinstance(chunk.get("error"), dict):
            error = from_body(502, chunk)
            if retryable(error.status):
                self.failure = error
                return b""
            return event
        if self._have is None or not isinstance(chunk, dict) or chunk.get("choices") == []:
            return event
        return self._resumed(chunk, event)

    def _resumed(self, chunk: dict[str, Any], event: bytes) -> bytes:
        """A chunk of a continuing try: only the text past what the client has goes out."""
        assert self._have is not None
        keep, changed = [], False
        for choice in chunk.get("choices") or []:
            index = int(choice.get("index", 0))
            delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else None
            text = (delta or {}).get("content") if delta is not None else choice.get("text")
            have = self._have.get(index, "")
            seen = self._redo.get(index, "") + (text or "")
            self._redo[index] = seen
            if not (have.startswith(seen) or seen.startswith(have)):
                self.diverged = True
                self.failure = EngineCrashedError(
                    f"the stream broke off and the fallback answered differently; the text so far (choice "
                    f"{index}, {len(have)} characters) is good but incomplete: send the request again"
                )
                return b""
            new = seen[max(len(have), len(seen) - len(text or "")) :]
            if new != (text or ""):
                changed = True
                if delta is not None:
                    choice = {
                        **choice,
                        "delta": {k: v for k, v in delta.items() if k not in ("content", "role")},
                    }
                    if new:
                        choice["delta"]["content"] = new
                else:
                    choice = {**choice, "text": new}
            if new or choice.get("finish_reason") or (delta or {}).get("tool_calls"):
                keep.append(choice)
        if not keep:
            return b""
        if not changed:
            return event
        return b"data: " + json.dumps({**chunk, "choices": keep}, separators=(",", ":")).encode() + _EVENT_END

    async def close(self) -> None:
        if self._closed:
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    async def give_up(self, failure: LaminaError | None) -> None:
        """Every try failed after the stream began: it ends with a clean error event."""
        error = failure or EngineCrashedError("the stream broke off and no fallback was left")
        await self._send({"type": "http.response.body", "body": error_event(error), "more_body": True})
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})


def _json(event: bytes) -> Any:
    payload = event[5:].strip() if event.startswith(b"data:") else b""
    if not payload.startswith(b"{"):
        return None
    try:
        return json.loads(payload)
    except ValueError:
        return None


def _texts(sent: bytes) -> dict[int, str]:
    """The text per choice that the client got in ``sent`` (whole SSE events)."""
    texts: dict[int, str] = {}
    for event in sent.split(_EVENT_END):
        chunk = _json(event)
        for choice in chunk.get("choices") or [] if isinstance(chunk, dict) else []:
            delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else None
            text = delta.get("content") if delta is not None else choice.get("text")
            if isinstance(text, str):
                index = int(choice.get("index", 0))
                texts[index] = texts.get(index, "") + text
    return texts
