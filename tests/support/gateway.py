"""Fakes of the gateway's ports that answer in the replica wire format.

The dispatcher implements the gateway's Dispatcher port and answers with real ``httpx.Response`` objects
shaped exactly like a replica worker's (bodies with the ``lamina`` extension; SSE streams that end with a
usage chunk and ``[DONE]``), so everything from parsing to relaying to telemetry runs for real.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

from lamina.errors import ModelNotFoundError
from lamina.models import ModelCard

CHAT, EMBED, PLAIN = "chat-model", "embed-model", "no-stream-model"
START_NS = time.time_ns() - 50_000_000
LAMINA = {
    "queue_ms": 1.5,
    "engine_ms": 40.0,
    "ttft_ms": 8.0,
    "start_ns": START_NS,
    "end_ns": START_NS + 40_000_000,
    "model_version": "chat-model@1",
}


@dataclass(frozen=True)
class FixedRoute:
    deployment: str
    served_name: str
    model_version: str | None
    capabilities: frozenset[str]


class StaticCatalog:
    """Three deployments; ``NAME@1`` reaches each too."""

    def __init__(self) -> None:
        self.routes = {
            CHAT: FixedRoute(CHAT, CHAT, f"{CHAT}@1", frozenset({"chat", "completion", "streaming"})),
            EMBED: FixedRoute(EMBED, EMBED, f"{EMBED}@1", frozenset({"embedding"})),
            PLAIN: FixedRoute(PLAIN, PLAIN, None, frozenset({"chat"})),
        }

    def models(self) -> list[ModelCard]:
        return [
            ModelCard(
                id=r.deployment, created=1, capabilities=sorted(r.capabilities), version=r.model_version
            )
            for r in self.routes.values()
        ]

    def resolve(self, name: str) -> FixedRoute:
        route = self.routes.get(name.removesuffix("@1"))
        if route is None:
            raise ModelNotFoundError(
                f"the model {name!r} does not exist; available models: {', '.join(sorted(self.routes))}",
                param="model",
            )
        return route


@dataclass(frozen=True)
class Dispatched:
    response: httpx.Response
    replica_id: str = "chat-model-0"
    url: str = "http://127.0.0.1:9100"
    attempts: int = 1


def sse(chunk: Mapping[str, Any] | str) -> bytes:
    return b"data: " + (chunk if isinstance(chunk, str) else json.dumps(chunk)).encode() + b"\n\n"


def chat_events(model: str, words: Sequence[str] = ("Hello", " world")) -> list[bytes]:
    """A replica's chat stream: role, content, finish, the usage chunk with the extension, [DONE]."""
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model}
    deltas = [{"role": "assistant", "content": ""}, *({"content": w} for w in words)]
    events = [sse({**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]}) for d in deltas]
    events.append(sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    usage = {"prompt_tokens": 9, "completion_tokens": len(words), "total_tokens": 9 + len(words)}
    events.append(sse({**base, "choices": [], "usage": usage, "lamina": LAMINA}))
    return [*events, sse("[DONE]")]


async def trickle(pieces: Sequence[bytes], fail: Exception | None = None) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece
    if fail is not None:
        raise fail


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def replica(path: str, body: Mapping[str, Any]) -> httpx.Response:
    """What a healthy replica worker answers."""
    model = str(body["model"])
    usage = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    if body.get("stream"):
        sse_type = {"content-type": "text/event-stream"}
        return httpx.Response(200, headers=sse_type, content=trickle(chat_events(model)))
    if path == "/v1/embeddings":
        data = [{"object": "embedding", "index": 0, "embedding": [0.6, 0.8]}]
        usage = {"prompt_tokens": 3, "total_tokens": 3}
        return httpx.Response(
            200, json={"object": "list", "data": data, "model": model, "usage": usage, "lamina": LAMINA}
        )
    if path == "/v1/completions":
        choice = {"index": 0, "text": " blue", "finish_reason": "stop"}
        body_ = {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 1,
            "model": model,
            "choices": [choice],
        }
        return httpx.Response(200, json={**body_, "usage": usage, "lamina": LAMINA})
    message = {"role": "assistant", "content": "Hello world"}
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    body_ = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [choice],
    }
    return httpx.Response(200, json={**body_, "usage": usage, "lamina": LAMINA})


@dataclass
class Sent:
    deployment: str
    path: str
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass
class ReplayDispatcher:
    """Implements the Dispatcher port; ``reply`` plays the replica, ``error`` the dispatcher failing."""

    reply: Callable[[str, Mapping[str, Any]], httpx.Response] = replica
    error: Exception | None = None
    sent: list[Sent] = field(default_factory=list)
    closed: int = 0

    def _dispatch(self, deployment: str, path: str, body: Mapping[str, Any], headers: Any) -> httpx.Response:
        self.sent.append(Sent(deployment, path, dict(body), dict(headers or {})))
        if self.error is not None:
            raise self.error
        return self.reply(path, body)

    async def request(
        self,
        deployment: str,
        path: str,
        json_body: Mapping[str, Any],
        headers: Mapping[str, str] | None = None,
    ) -> Dispatched:
        return Dispatched(self._dispatch(deployment, path, json_body, headers))

    @asynccontextmanager
    async def stream(
        self,
        deployment: str,
        path: str,
        json_body: Mapping[str, Any],
        headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[Dispatched]:
        response = self._dispatch(deployment, path, json_body, headers)
        try:
            yield Dispatched(response)
        finally:
            await response.aclose()
            self.closed += 1


def events_of(text: str) -> list[str]:
    assert text.endswith("\n\n")
    return [e.removeprefix("data: ") for e in text[:-2].split("\n\n")]


def chat_scope() -> dict[str, Any]:
    """The ASGI scope of a POST /v1/chat/completions from 127.0.0.1 (for tests that play the client)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 50000),
        "server": ("gateway", 80),
    }


async def stalled_stream(model: str) -> AsyncIterator[bytes]:
    """A replica's stream that sends its first two events and then goes on generating, never ending
    (what a client that leaves mid-stream is cut off from)."""
    for event in chat_events(model)[:2]:
        yield event
    await anyio.Event().wait()
    yield b""


def client_leaving(body: Mapping[str, Any]) -> tuple[Any, Any, list[Mapping[str, Any]]]:
    """An ASGI client's ``receive`` and ``send`` (and what it was sent): it posts ``body`` and leaves once
    the first content ("Hello", :func:`chat_events`) has reached it."""
    inbox = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]
    got_content = anyio.Event()
    sent: list[Mapping[str, Any]] = []

    async def receive() -> Mapping[str, Any]:
        if inbox:
            return inbox.pop()
        await got_content.wait()
        return {"type": "http.disconnect"}

    async def send(message: Mapping[str, Any]) -> None:
        sent.append(message)
        if b"Hello" in message.get("body", b""):
            got_content.set()

    return receive, send, sent
