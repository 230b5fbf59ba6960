"""Request bodies as JSON, refusing what Python's parser lets through but nothing downstream can take."""

from __future__ import annotations

import json
import re
from typing import Any

from lamina.errors import InvalidRequestError

#: how deep a request body may nest objects and arrays (a JSON Schema in response_format nests the most)
MAX_JSON_DEPTH = 100
#: the only way a lone surrogate gets into parsed JSON: a \\uD800-\\uDFFF escape (raw bytes are strict UTF-8)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def read_json(raw: bytes) -> Any:
    """A request body's JSON; an InvalidRequestError (a 400) for text that is not JSON, ``NaN`` and
    ``Infinity``, nesting deeper than ``MAX_JSON_DEPTH``, and lone UTF-16 surrogates (``"\\ud800"``),
    which are not text. Each of these used to end in a 500 somewhere further on."""
    try:
        data = json.loads(raw, parse_constant=_not_a_number)
    except RecursionError:
        raise InvalidRequestError(_too_deep()) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(
            f"the request body is not valid JSON ({exc}); send one JSON object, with the header "
            "Content-Type: application/json"
        ) from None
    _check_values(data, 0, strings=_SURROGATE_ESCAPE.search(raw) is not None)
    return data


def _not_a_number(name: str) -> Any:
    raise InvalidRequestError(
        f"the request body holds {name}, which JSON does not allow; send a finite number"
    )


def _too_deep() -> str:
    return f"the request body nests objects and arrays more than {MAX_JSON_DEPTH} deep; flatten it"


def _check_values(value: Any, depth: int, *, strings: bool) -> None:
    """Nesting depth, and (only when the raw text has a surrogate escape) that every string is text."""
    if depth > MAX_JSON_DEPTH:
        raise InvalidRequestError(_too_deep())
    if strings and isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequestError(
                "the request body holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its pair), "
                "which is not text; send valid Unicode"
            ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_values(key, depth + 1, strings=strings)
            _check_values(item, depth + 1, strings=strings)
    elif isinstance(value, list):
        for item in value:
            _check_values(item, depth + 1, strings=strings)
