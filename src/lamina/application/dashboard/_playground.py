"""The playground: one chat question, asked of the gateway's own ``/v1/chat/completions``.

The browser holds no key it could send (the dashboard's cookie is HttpOnly), so the question comes to
``POST /ui/chat`` as JSON and the dashboard asks the gateway in process (httpx's ASGI transport into the
same app) with the caller's key: the request walks every policy, guard and span a client's request
would, and its answer, citations and trace id come back as they would to a client.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request

from lamina.application._bounds import read_body
from lamina.application._requests import parse_body
from lamina.application.dashboard._session import token_of

#: a playground answer is short: it shows the stack working, it is no chat client
_MAX_TOKENS = 256
_TIMEOUT_S = 300.0


class Question(BaseModel):
    """The body of ``POST /ui/chat``."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=200, description="A chat deployment or a RAG alias.")
    message: str = Field(min_length=1, max_length=8000, description="The user's question.")


@dataclass(frozen=True)
class Citation:
    index: int
    source: str
    text: str
    score: float | None


@dataclass(frozen=True)
class Answer:
    """What the playground shows of one exchange (``error``: the gateway's error message instead)."""

    model: str
    question: str
    text: str = ""
    citations: list[Citation] = field(default_factory=list)
    trace_id: str | None = None
    layers: str | None = None
    error: str = ""
    status: int = 200


def _citations(body: dict[str, Any]) -> list[Citation]:
    found = body.get("citations")
    if not isinstance(found, list):
        return []
    return [
        Citation(
            index=int(c.get("index", i)),
            source=str(c.get("source_uri", "")),
            text=str(c.get("text", ""))[:400],
            score=c.get("score") if isinstance(c.get("score"), int | float) else None,
        )
        for i, c in enumerate(found)
        if isinstance(c, dict)
    ]


def _error(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:300]}"


async def ask(request: Request, max_body_bytes: int) -> Answer:
    """Ask the question of ``request``'s JSON body through the gateway that serves ``request``."""
    raw = await read_body(request, max_body_bytes)
    _, question = parse_body(raw, Question)
    body = {
        "model": question.model,
        "messages": [{"role": "user", "content": question.message}],
        "max_tokens": _MAX_TOKENS,
    }
    headers = {"content-type": "application/json"}
    token = token_of(request)
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    transport = httpx.ASGITransport(app=request.app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://127.0.0.1", timeout=_TIMEOUT_S
    ) as client:
        response = await client.post("/v1/chat/completions", content=json.dumps(body), headers=headers)
    trace_id = response.headers.get("x-lamina-trace-id")
    layers = response.headers.get("x-lamina-layers")
    if response.status_code != 200:
        return Answer(
            question.model,
            question.message,
            trace_id=trace_id,
            error=_error(response),
            status=response.status_code,
        )
    reply = response.json()
    text = str(reply["choices"][0]["message"].get("content") or "")
    return Answer(question.model, question.message, text, _citations(reply), trace_id, layers)
