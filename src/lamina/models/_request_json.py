"""Request bodies as JSON, refusing what Python's parser lets through but nothing downstream can take."""

from __future__ import annotations

import json
import re
import sys
from typing import Any

from lamina.errors import InvalidRequestError

#: how deep a request body may nest objects and arrays (a JSON Schema in response_format nests the most)
MAX_JSON_DEPTH = 100
#: how a lone surrogate gets into parsed UTF-8 JSON: a \\uD800-\\uDFFF escape, or its three bytes encoded
#: as if it were a character (``json.loads`` decodes bytes with ``surrogatepass``); a body in UTF-16 or
#: UTF-32 (which ``json.loads`` also reads) is always checked
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def read_json(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A request body's JSON; an InvalidRequestError (a 400) for text that is not JSON, ``NaN`` and
    ``Infinity``, objects and arrays nested more than ``max_depth`` deep (``max_depth`` nested arrays
    pass), and lone UTF-16 surrogates (``"\\ud800"``), which are not text. Each of these used to end in a
    500 somewhere further on."""
    try:
        data = json.loads(raw, parse_constant=_not_a_number)
    except RecursionError:
        raise InvalidRequestError(_too_deep(max_depth)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(
            f"the request body is not valid JSON ({exc}); send one JSON object, with the header "
            "Content-Type: application/json"
        ) from None
    except ValueError:  # the only other: an integer longer than Python converts (it used to be a 500)
        raise InvalidRequestError(
            f"the request body holds an integer of more than {sys.get_int_max_str_digits()} digits, which "
            "cannot be read; send a shorter number"
        ) from None
    strings = json.detect_encoding(raw) != "utf-8" or _SURROGATE.search(raw) is not None
    _check_values(data, 0, max_depth, strings=strings)
    return data


def _not_a_number(name: str) -> Any:
    raise InvalidRequestError(
        f"the request body holds {name}, which JSON does not allow; send a finite number"
    )


def _too_deep(max_depth: int) -> str:
    return (
        f"the request body nests objects and arrays more than {max_depth} deep (a gateway's "
        "limits.max_json_depth); flatten it, or raise that limit in the gateway's config"
    )


def _check_values(value: Any, depth: int, max_depth: int, *, strings: bool) -> None:
    """Nesting depth (``depth`` containers hold ``value``), and (only when the raw text has a surrogate
    escape) that every string is text."""
    if depth >= max_depth and isinstance(value, dict | list):
        raise InvalidRequestError(_too_deep(max_depth))
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
            _check_values(key, depth + 1, max_depth, strings=strings)
            _check_values(item, depth + 1, max_depth, strings=strings)
    elif isinstance(value, list):
        for item in value:
            _check_values(item, depth + 1, max_depth, strings=strings)
