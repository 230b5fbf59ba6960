"""Request JSON: what Python's parser accepts but no model, engine or response can take is a 400."""

from __future__ import annotations

import pytest

from lamina.errors import InvalidRequestError
from lamina.models import read_json
from lamina.models._request_json import MAX_JSON_DEPTH


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def test_ordinary_json_passes_unchanged() -> None:
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "caf\\u00e9 \\ud83d\\ude00"}], "x": 1.5}'
    assert read_json(raw) == {"model": "m", "messages": [{"role": "user", "content": "café 😀"}], "x": 1.5}
    assert read_json(nested(MAX_JSON_DEPTH)) is not None


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (nested(MAX_JSON_DEPTH + 2), "deep"),
        (nested(1_000_000), "deep"),
        (b'{"a": -Infinity}', "-Infinity"),
        (b'{"a": [1, NaN]}', "NaN"),
        (b'{"\\udfff": 1}', "surrogate"),
        (b'["ok", "\\ud800"]', "surrogate"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"{", "not valid JSON"),
    ],
)
def test_refused_with_a_400_that_says_why(raw: bytes, says: str) -> None:
    with pytest.raises(InvalidRequestError, match=says) as refused:
        read_json(raw)
    assert refused.value.status == 400
