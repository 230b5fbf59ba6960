"""What a replica worker sends back: response bodies and the SSE events of a stream, in OpenAI's shapes.

Per-token work on the common path (no tools, no log probabilities) is kept to a ``json.dumps`` of the
token's text between prebuilt bytes, because the worker must stream nearly as fast as llama.cpp called
in-process. Chunks that carry log probabilities or tool-call deltas are built as objects, and an answer read
for tool calls goes through the plan's :class:`~lamina.models._tool_stream.ToolStream`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any, Literal

from lamina.models._engine import Delta, FinishReason, TokenLogprob, TopLogprob, Usage
from lamina.models._tool_stream import ToolEvent
from lamina.models._tools import ToolPlan

_SLOT = "__lamina_slot__"
#: what OpenAI writes for a log probability too small to tell (JSON has no -Infinity)
_FLOOR = -9999.0


def _split(template: dict[str, Any]) -> tuple[bytes, bytes]:
    """The bytes before and after the placeholder string of a JSON-encoded template."""
    head, tail = json.dumps(template, separators=(",", ":")).split(f'"{_SLOT}"')
    return b"data: " + head.encode(), tail.encode() + b"\n\n"


def _logprob(value: float) -> float:
    return value if math.isfinite(value) and value > _FLOOR else _FLOOR


def _top(t: TopLogprob) -> dict[str, Any]:
    return {"token": t.token, "logprob": _logprob(t.logprob), "bytes": list(t.bytes)}


def chat_logprobs(tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
    """A chat choice's ``logprobs``: ``{"content": [...], "refusal": null}``, an entry per token:
    ``{token, logprob, bytes, top_logprobs}``, each of its ``top_logprobs`` a ``{token, logprob, bytes}``."""
    content = [
        {
            "token": t.token,
            "logprob": _logprob(t.logprob),
            "bytes": list(t.bytes),
            "top_logprobs": [_top(a) for a in t.top],
        }
        for t in tokens
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(tokens: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """A text completion's legacy ``logprobs``: parallel lists, each token's text starting at its offset."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [_logprob(t.logprob) for t in tokens],
        "top_logprobs": [{a.token: _logprob(a.logprob) for a in t.top} for t in tokens],
        "text_offset": offsets,
    }


def _event_delta(event: ToolEvent, legacy: bool) -> dict[str, Any]:
    """One reader event as a chat chunk's ``delta``: content, or a tool call's start or arguments."""
    if event.kind == "content":
        return {"content": event.text}
    if legacy:
        start = event.kind == "call"
        return {
            "function_call": {"name": event.name, "arguments": ""} if start else {"arguments": event.text}
        }
    if event.kind == "call":
        call = {"id": event.call_id, "type": "function", "function": {"name": event.name, "arguments": ""}}
        return {"tool_calls": [{"index": event.index, **call}]}
    return {"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]}


def _called(reason: FinishReason, tools: ToolPlan, calls: int) -> str:
    """The finish reason of an answer that made ``calls`` calls: ``tool_calls`` (``function_call``)."""
    if calls and reason == "stop":
        return "function_call" if tools.legacy else "tool_calls"
    return reason


class ChunkEncoder:
    """SSE events of one streamed response, built around prebuilt bytes.

    ``delta(d)`` encodes each engine step: plain text on the fast path, or, when the request asked for log
    probabilities or offered tools, chunks built as objects (tool calls as OpenAI's ``tool_calls`` deltas).
    """

    def __init__(
        self,
        kind: Literal["chat", "completion"],
        response_id: str,
        created: int,
        model: str,
        *,
        tools: ToolPlan | None = None,
        logprobs: bool = False,
    ):
        self._base = {"id": response_id, "created": created, "model": model}
        self._kind = kind
        if kind == "chat":
            self._object = "chat.completion.chunk"
            choice: dict[str, Any] = {"index": 0, "delta": {"content": _SLOT}, "logprobs": None}
        else:
            self._object = "text_completion"
            choice = {"text": _SLOT, "index": 0, "logprobs": None}
        self._head, self._tail = _split(self._chunk({**choice, "finish_reason": None}))
        self._finals = {
            reason: _split(self._chunk({**choice, "finish_reason": reason})) for reason in ("stop", "length")
        }
        self._tools = tools
        self._reader = None if tools is None else tools.stream()
        self._fast = tools is None and not logprobs
        self._logprobs = logprobs
        self._unsent: list[TokenLogprob] = []
        self._offset = 0

    @property
    def done(self) -> bool:
        """True once the answer is complete though the engine may go on: the one tool call asked for is made
        (a worker may stop generating then)."""
        return self._reader is not None and self._reader.done

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        return {**self._base, "object": self._object, "choices": [choice]}

    def opening(self) -> bytes:
        """The first chat event, announcing the assistant's role; nothing for completions."""
        if self._kind != "chat":
            return b""
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
        return self._event(self._chunk({**choice, "finish_reason": None}))

    def token(self, text: str) -> bytes:
        return self._head + json.dumps(text).encode() + self._tail

    def final(self, text: str, reason: FinishReason) -> bytes:
        head, tail = self._finals[reason]
        return head + json.dumps(text).encode() + tail

    def delta(self, d: Delta) -> bytes:
        """The events of one engine step (its last one ends with the finish reason)."""
        if self._fast:
            return self.token(d.text) if d.finish_reason is None else self.final(d.text, d.finish_reason)
        if self._reader is None:
            return self._plain(d)
        assert self._tools is not None
        self._unsent += d.logprobs
        events = self._reader.feed(d.text)
        if d.finish_reason is not None:
            events += self._reader.finish()
        out = [self._event(self._chunk(self._choice(_event_delta(e, self._tools.legacy)))) for e in events]
        if d.finish_reason is not None:
            reason = _called(d.finish_reason, self._tools, self._reader.calls)
            out.append(self._event(self._chunk(self._choice({}, reason))))
        return b"".join(out)

    def _plain(self, d: Delta) -> bytes:
        """A chunk of text with its tokens' log probabilities (the legacy shape for completions)."""
        if self._kind == "chat":
            self._unsent += d.logprobs
            choice = self._choice({"content": d.text}, d.finish_reason)
        else:
            logprobs = completion_logprobs(d.logprobs, self._offset) if self._logprobs else None
            self._offset += len(d.text)
            choice = {"text": d.text, "index": 0, "logprobs": logprobs, "finish_reason": d.finish_reason}
        return self._event(self._chunk(choice))

    def _choice(self, delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        """A chat choice; the log probabilities not yet sent ride on it."""
        logprobs = chat_logprobs(self._unsent) if self._logprobs and self._unsent else None
        self._unsent = []
        return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}

    def usage(self, usage: Usage, lamina: dict[str, Any]) -> bytes:
        """The usage event that always ends the stream (the gateway drops it unless asked for it)."""
        body = {**self._base, "object": self._object, "choices": [], "usage": usage_json(usage)}
        return self._event({**body, "lamina": lamina})

    @staticmethod
    def error(body: dict[str, Any]) -> bytes:
        return ChunkEncoder._event(body)

    @staticmethod
    def _event(body: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


def usage_json(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _message(text: str, reason: FinishReason, tools: ToolPlan | None) -> tuple[dict[str, Any], str]:
    """A chat answer's ``message`` and finish reason, its tool calls read from the text."""
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if tools is None:
        return message, reason
    parsed = tools.parse(text)
    message["content"] = parsed.content
    if parsed.calls and tools.legacy:
        call = parsed.calls[0]
        message["function_call"] = {"name": call.name, "arguments": call.arguments}
    elif parsed.calls:
        message["tool_calls"] = [c.json() for c in parsed.calls]
    return message, _called(reason, tools, len(parsed.calls))


def completion_body(
    kind: Literal["chat", "completion"],
    rid: str,
    created: int,
    model: str,
    text: str,
    final: Delta,
    lamina: dict[str, Any],
    *,
    logprobs: Sequence[TokenLogprob] | None = None,
    tools: ToolPlan | None = None,
) -> dict[str, Any]:
    """The JSON body of a non-streamed chat or text completion.

    ``logprobs``: every generated token's, when the request asked for them (else None: ``"logprobs": null``);
    ``tools``: the request's tool plan, whose calls are read from ``text``.
    """
    assert final.usage is not None and final.finish_reason is not None, "engines end with reason and usage"
    if kind == "chat":
        message, reason = _message(text, final.finish_reason, tools)
        shaped = None if logprobs is None else chat_logprobs(logprobs)
        choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": shaped, "finish_reason": reason}
    else:
        shaped = None if logprobs is None else completion_logprobs(logprobs)
        choice = {"text": text, "index": 0, "logprobs": shaped, "finish_reason": final.finish_reason}
    return {
        "id": rid,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage_json(final.usage),
        "lamina": lamina,
    }
