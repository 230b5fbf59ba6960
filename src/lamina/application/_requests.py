"""Request bodies: parsed by the gateway itself so that every problem becomes one OpenAI-style 400.

The raw JSON object is kept next to the validated model: the gateway forwards what the client sent (every
field, known or not) and uses the model only to route, check and annotate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from lamina.errors import InvalidRequestError
from lamina.models import read_json

RequestT = TypeVar("RequestT", bound=BaseModel)

_MAX_LISTED = 3
#: location parts pydantic adds for the member of a union (``content.str``); not fields of the body
_UNION_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def field_path(loc: Sequence[int | str]) -> str:
    """``("messages", 0, "role")`` as ``messages[0].role``, the way a client developer writes it."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _UNION_TAGS or "[" in part or "-" in part:
            break  # a union member's tag: the field is the path so far
        else:
            path += f".{part}" if path else part
    return path


def _problems(errors: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Each bad field's problem; the members of one union that all failed become one line."""
    msgs: dict[str, list[str]] = {}
    inputs: dict[str, str] = {}
    for error in errors:
        path = field_path(error.get("loc", ())) or "the body"
        if error.get("type") == "missing":
            msgs.setdefault(path, []).append("is required")
            continue
        shown = repr(error.get("input"))
        inputs[path] = shown if len(shown) <= 60 else shown[:57] + "..."
        msgs.setdefault(path, []).append(str(error.get("msg", "invalid value")))
    return {
        path: f": {' or '.join(dict.fromkeys(found))} (got {inputs[path]})"
        if path in inputs
        else " is required"
        for path, found in msgs.items()
    }


def invalid_fields(errors: Sequence[Mapping[str, Any]]) -> InvalidRequestError:
    """One error naming the first bad field as ``param`` and listing the first few problems."""
    problems = _problems(errors)
    if not problems:
        return InvalidRequestError("the request body is invalid; check it against the API reference")
    listed = "; ".join(f"`{path}`{msg}" for path, msg in list(problems.items())[:_MAX_LISTED])
    more = f" (and {len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
    first = next(iter(problems))
    return InvalidRequestError(
        f"invalid request body: {listed}{more}; fix the field and send the request again",
        param=None if first == "the body" else first,
    )


def parse_body(
    raw: bytes,
    model: type[RequestT],
    *,
    max_depth: int | None = None,
    check: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, Any], RequestT]:
    """The JSON object of ``raw`` and its validated form; InvalidRequestError names what is wrong.
    ``check`` sees the decoded object before it is validated (the gateway's request limits)."""
    data = read_json(raw) if max_depth is None else read_json(raw, max_depth)
    if not isinstance(data, dict):
        raise InvalidRequestError(
            f"the request body must be a JSON object, not a JSON {type(data).__name__}; "
            'send e.g. {"model": ..., ...}'
        )
    if check is not None:
        check(data)
    try:
        return data, model.model_validate(data)
    except ValidationError as exc:
        raise invalid_fields(exc.errors(include_url=False)) from None
