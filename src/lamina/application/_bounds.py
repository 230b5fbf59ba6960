"""Request limits: what one body may hold, refused before it is parsed or any work is queued.

Each limit is checked at the cheapest point that sees what it limits:

- bytes, by :func:`read_body`: a declared ``Content-Length`` over the limit is refused before a byte of
  the body is read; a chunked body (no length declared) is dropped at the chunk that passes the limit,
  so no more than the limit and one chunk (the server's read size, 64 KiB for uvicorn) is ever held;
- nesting depth, by :func:`lamina.models.read_json` while it decodes;
- counts and text lengths, by :func:`check_bounds`, on the decoded JSON before pydantic validates it:
  a body with a million messages costs one JSON parse, never a million message models.

Every route that reads a body calls :func:`read_body` with its limit; a pure-ASGI middleware that wraps
``receive`` would count the same bytes, but the routes' own call says which limit each body meets, and
the error it raises goes through the gateway's one error handler like any other.

A body over ``limits.max_body_bytes`` is a 413 (``request_too_large``); every other limit is a 400
naming the field, the limit's value, what was sent and the config key that raises it.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import aclosing
from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.requests import ClientDisconnect, Request

from lamina.application._requests import parse_body
from lamina.config import RequestLimitsConfig
from lamina.errors import InvalidRequestError, PayloadTooLargeError

RequestT = TypeVar("RequestT", bound=BaseModel)

#: the limits of a route that is not handed the gateway's (the admin API's ingest route: its bodies are
#: a few paths and settings, far below any of them)
DEFAULT_LIMITS = RequestLimitsConfig()
#: the fields that hold a request's generation limit (the chat API's newer name, and the older one)
_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")


def _too_large(sent: str, limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"the request body is {sent}; this gateway takes at most {limit} bytes (limits.max_body_bytes). "
        "Send a smaller body (split the work over several requests), or raise limits.max_body_bytes in "
        "the gateway's config"
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The body of ``request``, read only while it stays within ``limit`` bytes; else a 413.

    The body can be read once: ``request.body()`` after this raises (nothing in the gateway calls it).
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(f"{int(declared)} bytes (its Content-Length)", limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async with aclosing(request.stream()) as stream:
            async for chunk in stream:
                size += len(chunk)
                if size > limit:
                    raise _too_large(f"over {limit} bytes ({size} had arrived when it was stopped)", limit)
                chunks.append(chunk)
    except ClientDisconnect:
        raise InvalidRequestError(
            "the client closed the connection before the whole request body arrived; send it again"
        ) from None
    return b"".join(chunks)


def _over(param: str, sent: str, limit: int, key: str, advice: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"`{param}` {sent}; this gateway takes at most {limit} (limits.{key}). {advice}, or raise "
        f"limits.{key} in the gateway's config",
        param=param,
    )


def _check_count(items: object, param: str, what: str, limit: int, key: str, advice: str) -> None:
    if isinstance(items, list) and len(items) > limit:
        raise _over(param, f"holds {len(items)} {what}", limit, key, advice)


def _too_long(param: str, text: str, limit: int) -> InvalidRequestError:
    return _over(param, f"is {len(text)} characters long", limit, "max_input_chars", "Send a shorter text")


def _check_texts(value: object, param: str, limit: int) -> None:
    """A field that holds a text or a list of texts (``prompt``, ``input``, ``query``)."""
    if isinstance(value, list):
        for i, text in enumerate(value):
            if isinstance(text, str) and len(text) > limit:
                raise _too_long(f"{param}[{i}]", text, limit)
    elif isinstance(value, str) and len(value) > limit:
        raise _too_long(param, value, limit)


def _check_messages(messages: list[Any], limit: int) -> None:
    """Each message's content: a string, or the texts of its parts (a field's path is only spelled out
    for the error: this loop runs over every message of every chat request)."""
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            if len(content) > limit:
                raise _too_long(f"messages[{i}].content", content, limit)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                text = part.get("text") if isinstance(part, dict) else None
                if isinstance(text, str) and len(text) > limit:
                    raise _too_long(f"messages[{i}].content[{j}].text", text, limit)


def check_bounds(body: Mapping[str, Any], limits: RequestLimitsConfig) -> None:
    """Refuse a decoded request body (any endpoint's) that holds more than ``limits`` allow."""
    messages = body.get("messages")
    _check_count(
        messages,
        "messages",
        "messages",
        limits.max_messages,
        "max_messages",
        "Send fewer (drop or summarise the oldest turns)",
    )
    if isinstance(messages, list):
        _check_messages(messages, limits.max_input_chars)
    inputs = body.get("input")
    _check_count(
        inputs,
        "input",
        "texts",
        limits.max_embedding_inputs,
        "max_embedding_inputs",
        "Split the texts over several requests",
    )
    _check_texts(inputs, "input", limits.max_input_chars)
    _check_texts(body.get("prompt"), "prompt", limits.max_input_chars)
    _check_texts(body.get("query"), "query", limits.max_input_chars)
    _check_count(
        body.get("stop"), "stop", "stop sequences", limits.max_stop, "max_stop", "Send fewer stop sequences"
    )
    for name in _TOKEN_FIELDS:
        value = body.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > limits.max_tokens:
            shown = value if value < 10**18 else f"a {len(str(int(value)))}-digit number"
            raise _over(name, f"is {shown}", limits.max_tokens, "max_tokens", "Ask for fewer tokens")


def parse_bounded(
    raw: bytes, model: type[RequestT], limits: RequestLimitsConfig
) -> tuple[dict[str, Any], RequestT]:
    """The JSON object of ``raw`` within ``limits``, and its validated form; a 400 names what is wrong."""
    return parse_body(
        raw, model, max_depth=limits.max_json_depth, check=lambda data: check_bounds(data, limits)
    )
