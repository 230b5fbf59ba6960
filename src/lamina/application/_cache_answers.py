"""Cached answers: what is stored of a plain or streamed answer, and how it is given back either way.

An entry is the plain answer (``chat.completion``, ``text_completion`` or an embeddings ``list``) as the
client got it, without ``id`` and ``created`` (a hit gets new ones) and with the replica's ``usage`` only
(``cost`` and the other fields the policies add are not stored: a hit costs nothing). A streamed answer
is assembled into that form from the events the client got, keeping the text pieces in order, so a hit
replays the same content chunks; a plain answer replayed as a stream is one content chunk. Either way
the replay has the shapes of a replica's stream: role chunk (chat), content chunks, finish chunk, the
usage chunk when asked for, ``[DONE]``.

Not stored: streams that carried an error event, or any delta this module does not know how to
assemble (function_call, logprobs): replaying them would change the answer.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

_FORMAT = 1
_DONE = b"data: [DONE]\n\n"
#: delta fields a chat stream's choices may carry that assembly keeps
_DELTA_FIELDS = frozenset({"role", "content", "tool_calls", "refusal"})
#: stands for a text piece in an event template (never in an answer: it holds a NUL character)
_SLOT_TEXT = "\u0000lamina-cache-slot\u0000"
_SLOT = json.dumps(_SLOT_TEXT, ensure_ascii=False).encode()


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def plain_entry(body: Mapping[str, Any], added_usage: Iterable[str] = ()) -> bytes | None:
    """The entry of a plain answer; None when it cannot be replayed faithfully."""
    stored = {k: v for k, v in body.items() if k not in ("id", "created", "citations")}
    usage = stored.get("usage")
    if isinstance(usage, dict):
        stored["usage"] = {k: v for k, v in usage.items() if k not in set(added_usage)}
    choices = stored.get("choices")
    if isinstance(choices, list) and any(isinstance(c, dict) and c.get("logprobs") for c in choices):
        return None
    return _dumps({"v": _FORMAT, "body": stored, "pieces": None})


def stream_entry(sent: bytes, usage: Mapping[str, Any] | None) -> bytes | None:
    """The entry of a complete stream from the bytes the client got (``usage``: the replica's usage
    chunk's, which the client may not have got); None for a failed or unassemblable stream."""
    first: dict[str, Any] | None = None
    choices: dict[int, dict[str, Any]] = {}
    pieces: dict[int, list[str]] = {}
    for event in sent.split(b"\n\n"):
        payload = event[5:].strip() if event.startswith(b"data:") else b""
        if not payload.startswith(b"{"):
            continue
        chunk = json.loads(payload)
        if not isinstance(chunk, dict) or "error" in chunk:
            return None
        if chunk.get("object") == "lamina.citations" or chunk.get("choices") == []:
            continue
        first = first or chunk
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("logprobs") or not _merge(choice, choices, pieces):
                return None
    if first is None:
        return None
    chat = first.get("object") == "chat.completion.chunk"
    body = {k: v for k, v in first.items() if k not in ("id", "created", "choices", "usage")}
    body["object"] = "chat.completion" if chat else "text_completion"
    body["choices"] = [choices[i] for i in sorted(choices)]  # text: from the pieces, when read
    if usage is not None:
        body["usage"] = {k: v for k, v in usage.items() if k != "cost"}
    return _dumps({"v": _FORMAT, "body": body, "pieces": [pieces[i] for i in sorted(pieces)]})


def _merge(choice: dict[str, Any], choices: dict[int, dict[str, Any]], pieces: dict[int, list[str]]) -> bool:
    index = choice.get("index", 0)
    if not isinstance(index, int):
        return False
    into = choices.setdefault(index, {"index": index, "finish_reason": None})
    texts = pieces.setdefault(index, [])
    if choice.get("finish_reason"):
        into["finish_reason"] = choice["finish_reason"]
    if "delta" not in choice:  # a text completion
        text = choice.get("text")
        if isinstance(text, str) and text:
            texts.append(text)
        return True
    delta = choice["delta"]
    if not isinstance(delta, dict) or not set(delta) <= _DELTA_FIELDS:
        return False
    message = into.setdefault("message", {"role": "assistant", "content": None})
    if isinstance(delta.get("content"), str) and delta["content"]:
        texts.append(delta["content"])
    if delta.get("refusal"):
        message["refusal"] = (message.get("refusal") or "") + str(delta["refusal"])
    for call in delta.get("tool_calls") or []:
        if not isinstance(call, dict):
            return False
        _merge_tool_call(message.setdefault("tool_calls", []), call)
    return True


def _merge_tool_call(calls: list[dict[str, Any]], part: dict[str, Any]) -> None:
    index = part.get("index", len(calls))
    while len(calls) <= index:
        calls.append({"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
    call = calls[index]
    call["id"] = part.get("id") or call["id"]
    call["type"] = part.get("type") or call["type"]
    function: dict[str, Any] = part["function"] if isinstance(part.get("function"), dict) else {}
    call["function"]["name"] += function.get("name") or ""
    call["function"]["arguments"] += function.get("arguments") or ""


def _read(entry: bytes) -> tuple[dict[str, Any], list[list[str]]]:
    """The stored body, its text filled in, and the text pieces of each choice."""
    data = json.loads(entry)
    body: dict[str, Any] = data["body"]
    pieces: list[list[str]] | None = data.get("pieces")
    choices = [c for c in body.get("choices") or [] if isinstance(c, dict)]
    if pieces is None:
        pieces = [[_text_of(c)] if _text_of(c) else [] for c in choices]
    else:
        for choice, texts in zip(choices, pieces, strict=False):
            text = "".join(texts)
            if "message" in choice:
                choice["message"]["content"] = (
                    text if text or not choice["message"].get("tool_calls") else None
                )
            else:
                choice["text"] = text
    return body, pieces


def _text_of(choice: Mapping[str, Any]) -> str:
    message = choice.get("message")
    if isinstance(message, dict):
        content = message.get("content")
        return content if isinstance(content, str) else ""
    text = choice.get("text")
    return text if isinstance(text, str) else ""


def _new_id(body: Mapping[str, Any]) -> str:
    prefix = "chatcmpl" if str(body.get("object", "")).startswith("chat") else "cmpl"
    return f"{prefix}-{uuid.uuid4().hex}"


def plain_answer(entry: bytes) -> dict[str, Any]:
    """The answer of an entry as a plain response body, with a new id and creation time."""
    body, _ = _read(entry)
    if body.get("object") == "list":  # embeddings carry no id
        return body
    return {"id": _new_id(body), "object": body.get("object"), "created": int(time.time()), **body}


def stream_answer(entry: bytes, include_usage: bool, trailer: bytes | None = None) -> bytes:
    """The answer of an entry as a whole SSE stream (``trailer``: an event to send just before [DONE])."""
    body, pieces = _read(entry)
    chat = body.get("object") == "chat.completion"
    base = {
        "id": _new_id(body),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        **{k: v for k, v in body.items() if k not in ("object", "choices", "usage")},
    }
    out: list[bytes] = []

    def emit(choice: dict[str, Any]) -> None:
        out.append(b"data: " + _dumps({**base, "choices": [choice]}) + b"\n\n")

    def emit_texts(choice: dict[str, Any], texts: list[str]) -> None:
        """One event per piece, from a template split around the text (like the replica's encoder)."""
        head, _, tail = (b"data: " + _dumps({**base, "choices": [choice]}) + b"\n\n").partition(_SLOT)
        out.extend(head + _dumps(text) + tail for text in texts)

    for choice, texts in zip(body.get("choices") or [], pieces, strict=False):
        index = choice.get("index", 0)
        if chat:
            emit(_delta(index, {"role": "assistant", "content": ""}))
            emit_texts(_delta(index, {"content": _SLOT_TEXT}), texts)
            message = choice.get("message") or {}
            if message.get("tool_calls"):
                calls = [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]
                emit(_delta(index, {"tool_calls": calls}))
            if message.get("refusal"):
                emit(_delta(index, {"refusal": message["refusal"]}))
            emit(_delta(index, {}, choice.get("finish_reason")))
        else:
            emit_texts({"text": _SLOT_TEXT, "index": index, "logprobs": None, "finish_reason": None}, texts)
            emit({"text": "", "index": index, "logprobs": None, "finish_reason": choice.get("finish_reason")})
    if include_usage and isinstance(body.get("usage"), dict):
        out.append(b"data: " + _dumps({**base, "choices": [], "usage": body["usage"]}) + b"\n\n")
    return b"".join(out) + (trailer or b"") + _DONE


def _delta(index: int, delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
