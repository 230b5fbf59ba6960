"""What a replica worker sends back: response bodies and the SSE events of a stream.

Per-token work is kept to a ``json.dumps`` of the token's text between prebuilt bytes, because the worker must
stream nearly as fast as llama.cpp called in-process.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from lamina.models._engine import Delta, FinishReason, Usage

_SLOT = "__lamina_slot__"


def _split(template: dict[str, Any]) -> tuple[bytes, bytes]:
    """The bytes before and after the placeholder string of a JSON-encoded template."""
    head, tail = json.dumps(template, separators=(",", ":")).split(f'"{_SLOT}"')
    return b"data: " + head.encode(), tail.encode() + b"\n\n"


class ChunkEncoder:
    """SSE events of one streamed response, built around prebuilt bytes."""

    def __init__(self, kind: Literal["chat", "completion"], response_id: str, created: int, model: str):
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


def completion_body(
    kind: Literal["chat", "completion"],
    rid: str,
    created: int,
    model: str,
    text: str,
    final: Delta,
    lamina: dict[str, Any],
) -> dict[str, Any]:
    """The JSON body of a non-streamed chat or text completion."""
    if kind == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
    else:
        choice = {"text": text, "index": 0}
    assert final.usage is not None, "engines put usage on their final delta"
    return {
        "id": rid,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "choices": [{**choice, "logprobs": None, "finish_reason": final.finish_reason}],
        "usage": usage_json(final.usage),
        "lamina": lamina,
    }
