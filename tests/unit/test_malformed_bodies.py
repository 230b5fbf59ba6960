"""A generated corpus of malformed request bodies: whatever a client sends, the answer is never a 5xx.

Hypothesis draws bodies for the chat, completion and embedding endpoints: random JSON values and bytes,
each field (and the fields of messages, content parts, tools and response formats) set to values of the
wrong type, huge, negative, NaN and infinite numbers, deep nesting, lone surrogates, invalid UTF-8,
truncated and spliced bodies, and wrong content types. They go to a gateway built on the fakes (over
ASGI) and to a real replica worker process running the fake engine (over HTTP). Every answer is either a
success (the mutation happened to be valid) or a 4xx with an OpenAI error body.
"""

from __future__ import annotations

import asyncio
import copy
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamina.application import GatewayDeps, create_app
from lamina.observability import Telemetry
from tests.support import CHAT, EMBED, ReplayDispatcher, StaticCatalog, free_port

pytestmark = pytest.mark.anyio

#: about this many bodies per endpoint (the endpoint is drawn too)
EXAMPLES = 200
CORPUS = settings(
    max_examples=EXAMPLES * 3,
    deadline=None,
    database=None,  # nothing written into the working tree; a failure prints its example and seed
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- the corpus -------------------------------------------------------------------------------------------

#: stands for a number of 5000 digits, more than Python turns into an int by default (4300), which neither
#: hypothesis nor ``json.dumps`` can print: replaced in the raw body
BIG = "<a 5000-digit number>"
BIG_RAW = b"9" * 5000
#: numbers and strings that broke, or could break, something downstream of the parser
SPECIAL: st.SearchStrategy[Any] = st.sampled_from(
    [
        10**400,
        -(10**400),
        BIG,
        2**63,
        2**64 + 1,
        -1,
        0,
        1e308,
        -1e308,
        5e-324,
        float("nan"),
        float("inf"),
        float("-inf"),
        "",
        "\ud800",
        "a\udfffb",
        "\x00",
        "\u2028",
        " " * 5,
        True,
        False,
        None,
        [],
        {},
        [[]],
        {"": None},
    ]
)
SCALAR = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(st.characters(), max_size=12)  # surrogates included
    | SPECIAL
)
VALUE = st.recursive(
    SCALAR,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=6,
)


def chat_bases(model: str = CHAT) -> list[dict[str, Any]]:
    user = {"role": "user", "content": "hello there"}
    function = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {}}}}
    return [
        {"model": model, "messages": [user]},
        {"model": model, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
        {"model": model, "messages": [user], "tools": [{"type": "function", "function": function}]},
        {
            "model": model,
            "messages": [
                user,
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            ],
        },
        {
            "model": model,
            "messages": [user],
            "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": {}}},
        },
    ]


CHAT_PATHS: list[tuple[str | int, ...]] = [
    (name,)
    for name in [
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "n",
        "stream",
        "stream_options",
        "logprobs",
        "top_logprobs",
        "response_format",
        "tools",
        "functions",
        "tool_choice",
        "function_call",
        "parallel_tool_calls",
        "modalities",
        "audio",
        "user",
        "rag",
    ]
] + [
    ("messages", 0),
    ("messages", 0, "role"),
    ("messages", 0, "content"),
    ("messages", 0, "name"),
    ("messages", 0, "content", 0),
    ("messages", 0, "content", 0, "type"),
    ("messages", 0, "content", 0, "text"),
    ("messages", 1, "tool_calls"),
    ("messages", 1, "tool_calls", 0, "id"),
    ("messages", 1, "tool_calls", 0, "function", "arguments"),
    ("messages", 2, "tool_call_id"),
    ("tools", 0),
    ("tools", 0, "type"),
    ("tools", 0, "function", "name"),
    ("tools", 0, "function", "parameters"),
    ("tools", 0, "function", "parameters", "properties", "city"),
    ("tool_choice", "function", "name"),
    ("response_format", "type"),
    ("response_format", "json_schema"),
    ("response_format", "json_schema", "name"),
    ("response_format", "json_schema", "schema"),
    ("response_format", "json_schema", "strict"),
    ("stream_options", "include_usage"),
    ("logit_bias", "50256"),
    ("stop", 0),
]
COMPLETION_PATHS: list[tuple[str | int, ...]] = [
    (name,)
    for name in [
        "model",
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "stop",
        "seed",
        "echo",
        "logprobs",
        "best_of",
        "suffix",
        "stream",
        "stream_options",
        "logit_bias",
        "n",
        "presence_penalty",
        "frequency_penalty",
        "user",
    ]
] + [("prompt", 0), ("stop", 0), ("logit_bias", "1")]
EMBEDDING_PATHS: list[tuple[str | int, ...]] = [
    (name,) for name in ["model", "input", "encoding_format", "dimensions", "user"]
] + [("input", 0), ("input", 1)]


def set_path(body: Any, path: tuple[str | int, ...], value: Any) -> Any:
    """``body`` with ``value`` at ``path``, making the containers on the way where they are missing."""
    if not path:
        return value
    key, rest = path[0], path[1:]
    if isinstance(key, int):
        items = body if isinstance(body, list) else []
        items = items + [None] * (key + 1 - len(items))
        items[key] = set_path(items[key], rest, value)
        return items
    mapping = body if isinstance(body, dict) else {}
    return {**mapping, key: set_path(mapping.get(key), rest, value)}


CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-8",
        "application/json; charset=latin-1",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "",
    ]
)


@st.composite
def bodies(
    draw: st.DrawFn, bases: list[dict[str, Any]], paths: list[tuple[str | int, ...]]
) -> tuple[bytes, str]:
    """One malformed request: its raw body and its content type."""
    body: Any = copy.deepcopy(draw(st.sampled_from(bases)))
    for path in draw(st.lists(st.sampled_from(paths), min_size=1, max_size=3)):
        body = set_path(body, path, draw(VALUE))
    text = json.dumps(body, ensure_ascii=draw(st.booleans()))
    raw = text.encode("utf-8", "surrogatepass")  # a lone surrogate unescaped is invalid UTF-8
    raw = raw.replace(json.dumps(BIG).encode(), BIG_RAW)
    kind = draw(
        st.sampled_from(["fields", "fields", "fields", "top", "bytes", "cut", "splice", "deep", "utf16"])
    )
    if kind == "top":
        raw = json.dumps(draw(VALUE)).encode("utf-8", "surrogatepass")
    elif kind == "bytes":
        raw = draw(st.binary(max_size=300))
    elif kind == "cut":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif kind == "splice":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=8)) + raw[at:]
    elif kind == "deep":
        depth = draw(st.sampled_from([98, 99, 100, 101, 1000, 100_000]))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        raw = raw[:-1] + b', "x": ' + opener * depth + b"1" + closer * depth + b"}"
    elif kind == "utf16":
        raw = text.encode("utf-16", "surrogatepass")
    content_type = draw(CONTENT_TYPES) if draw(st.integers(0, 9)) == 0 else "application/json"
    return raw, content_type


ENDPOINTS = {
    "chat": ("/v1/chat/completions", CHAT_PATHS),
    "completion": ("/v1/completions", COMPLETION_PATHS),
    "embedding": ("/v1/embeddings", EMBEDDING_PATHS),
}


def bases_for(endpoint: str) -> list[dict[str, Any]]:
    """Valid requests of ``endpoint`` (the worker serves any model name; the gateway's catalog these)."""
    if endpoint == "chat":
        return chat_bases()
    if endpoint == "completion":
        return [{"model": CHAT, "prompt": "the sky is"}, {"model": CHAT, "prompt": ["a b"]}]
    return [{"model": EMBED, "input": "alpha"}, {"model": EMBED, "input": ["alpha", "beta"]}]


def corpus() -> st.SearchStrategy[tuple[str, bytes, str]]:
    """``(path, raw body, content type)`` for any of the three endpoints."""

    def of(endpoint: str) -> st.SearchStrategy[tuple[str, bytes, str]]:
        path, paths = ENDPOINTS[endpoint]
        return bodies(bases_for(endpoint), paths).map(lambda b: (path, *b))

    return st.one_of(*(of(endpoint) for endpoint in ENDPOINTS))


def check_answer(r: httpx.Response, raw: bytes) -> None:
    """A success, or a 4xx with OpenAI's error body; never a 5xx, not even inside a stream."""
    assert r.status_code < 500, (r.status_code, r.text[:500], raw[:300])
    # no keys, and a host it answers to: a 401 or 403 would mean the body was never looked at
    assert r.status_code not in (401, 403), r.text
    if r.status_code >= 400:
        error = r.json()["error"]
        assert {"message", "type", "param", "code"} <= set(error), error
        assert isinstance(error["message"], str) and error["message"], error
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        assert '"server_error"' not in r.text, (r.text[-500:], raw[:300])


# --- the gateway on the fakes, and a real replica worker process on the fake engine -------------------------


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def gateway() -> AsyncIterator[httpx.AsyncClient]:
    telemetry = Telemetry(service_name="malformed-test")
    deps = GatewayDeps(StaticCatalog(), ReplayDispatcher(), lambda: {CHAT: True, EMBED: True}, telemetry)
    transport = httpx.ASGITransport(app=create_app(deps))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        yield client
    telemetry.shutdown()


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the worker exited with {proc.returncode}:\n{log_path.read_text()}"
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"the worker did not become healthy:\n{log_path.read_text()}")


@pytest.fixture(scope="module")
async def worker(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[httpx.AsyncClient]:
    """``python -m lamina.models._worker`` with the fake engine (echo, no delay) on a free port."""
    directory = tmp_path_factory.mktemp("worker")
    spec = directory / "spec.json"
    spec.write_text(json.dumps({"served_name": "echo", "engine": "fake", "options": {"embedding_dim": 8}}))
    port = free_port()
    log_path = directory / "worker.log"
    cmd = [sys.executable, "-m", "lamina.models._worker", "--port", str(port), "--spec", str(spec)]
    cmd.append("--no-secret")  # the test talks to the worker directly
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url, log_path)
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            yield client
    finally:
        proc.kill()
        proc.wait(timeout=30)


async def test_the_unmutated_bodies_succeed(gateway: httpx.AsyncClient, worker: httpx.AsyncClient) -> None:
    """The corpus starts from valid requests: each base body gets a 200 from the gateway, and from the
    worker unless the fake engine lacks the feature (structured output)."""
    for endpoint, (path, _) in ENDPOINTS.items():
        for body in bases_for(endpoint):
            r = await gateway.post(path, json=body)
            assert r.status_code == 200, (endpoint, body, r.text)
            r = await worker.post(path, json=body)
            if "response_format" in body:
                assert r.json()["error"]["code"] == "unsupported_capability"
            else:
                assert r.status_code == 200, (endpoint, body, r.text)


@CORPUS
@given(request=corpus())
async def test_no_malformed_body_gets_a_5xx_from_the_gateway_or_a_worker(
    gateway: httpx.AsyncClient, worker: httpx.AsyncClient, request: tuple[str, bytes, str]
) -> None:
    path, raw, content_type = request
    headers = {"content-type": content_type}
    answers = await asyncio.gather(
        gateway.post(path, content=raw, headers=headers), worker.post(path, content=raw, headers=headers)
    )
    for answer in answers:
        check_answer(answer, raw)
