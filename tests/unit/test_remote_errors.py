"""How the ``openai`` engine reads its key and maps an upstream's error answers (no network needed)."""

from __future__ import annotations

import re

import httpx
import pytest

from lamina.errors import (
    ConfigError,
    InvalidRequestError,
    LaminaError,
    PayloadTooLargeError,
    RateLimitError,
    UpstreamError,
)
from lamina.models._remote import api_key, upstream_failure
from lamina.models._remote_options import OpenAIOptions

KEYED = OpenAIOptions(base_url="https://api.example.com/v1", model="m", api_key_env="EXAMPLE_KEY")
KEYLESS = OpenAIOptions(base_url="http://10.0.0.7:8080/v1", model="m")


def body(message: str, param: str | None = None) -> bytes:
    return httpx.Response(400, json={"error": {"message": message, "param": param}}).content


def test_the_key_is_read_from_the_named_variable_and_its_absence_names_it() -> None:
    assert api_key(KEYED, {"EXAMPLE_KEY": " sk-1 \n"}) == "sk-1"
    assert api_key(KEYLESS, {}) is None
    for environ in ({}, {"EXAMPLE_KEY": "  "}):
        with pytest.raises(
            ConfigError, match=r"names \$EXAMPLE_KEY, which is not set .* export EXAMPLE_KEY="
        ):
            api_key(KEYED, environ)


@pytest.mark.parametrize(
    ("options", "status", "content", "kind", "answered", "says"),
    [
        (
            KEYED,
            401,
            body("bad key"),
            UpstreamError,
            502,
            r"rejected the API key in \$EXAMPLE_KEY \(HTTP 401: bad key\)",
        ),
        (KEYED, 403, body("no access"), UpstreamError, 502, r"rejected the API key in \$EXAMPLE_KEY"),
        (
            KEYLESS,
            401,
            body("key?"),
            UpstreamError,
            502,
            r"wants an API key .* name it in the deployment's `api_key_env`",
        ),
        (KEYED, 429, body("slow down"), RateLimitError, 429, r"rate limiting .* retry later"),
        (
            KEYED,
            422,
            body("bad field", "temperature"),
            InvalidRequestError,
            400,
            r"refused the request \(HTTP 422",
        ),
        (KEYED, 413, b"too big", PayloadTooLargeError, 413, r"as too large \(HTTP 413: too big\)"),
        (KEYED, 404, body("no model"), UpstreamError, 502, r"check the deployment's `model` \('m'\)"),
        (KEYED, 500, b"<html>" + b"x" * 400, UpstreamError, 502, r"failed \(HTTP 500: <html>x+\.\.\.\)"),
        (KEYED, 503, b"", UpstreamError, 502, r"\(HTTP 503: no body\)"),
    ],
)
def test_upstream_error_answers_map_to_lamina_errors(
    options: OpenAIOptions, status: int, content: bytes, kind: type[LaminaError], answered: int, says: str
) -> None:
    error = upstream_failure(options, status, content)
    assert type(error) is kind and error.status == answered
    assert error.details == {"upstream_status": status}
    assert re.search(says, error.message), error.message


def test_a_429_passes_retry_after_on_and_a_400_its_param() -> None:
    limited = upstream_failure(KEYED, 429, body("slow"), httpx.Headers({"Retry-After": "12"}))
    assert limited.headers == {"Retry-After": "12"} and "retry after 12 s" in limited.message
    refused = upstream_failure(KEYED, 400, body("bad", "tools"))
    assert refused.param == "tools"
