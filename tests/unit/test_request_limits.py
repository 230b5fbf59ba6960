"""Request limits: each one at its value passes, one over is refused (413 or 400) naming the limit.

Over real HTTP (uvicorn on 127.0.0.1, so Content-Length and chunked bodies arrive as a client sends them):
the shipped defaults on a gateway built without limits, and configured values on one built with small ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from lamina.application import GatewayDeps, IngestSettings, create_app
from lamina.config import LaminaConfig, RequestLimitsConfig
from lamina.data import Scalar, SearchMode
from lamina.errors import NotFoundError
from lamina.observability import Telemetry
from lamina.stack.gateway import build_stack, create_gateway
from tests.support import CHAT, EMBED, ReplayDispatcher, StaticCatalog

DEFAULTS = RequestLimitsConfig()
JSON = {"content-type": "application/json"}
MIB = 1024 * 1024


class EmptyRetriever:
    """A retriever with no datasets: every query it gets is a 404."""

    async def retrieve(
        self,
        ref: str,
        query: str,
        *,
        k: int = 10,
        mode: SearchMode = "hybrid",
        filters: Mapping[str, Scalar] | None = None,
    ) -> Any:
        raise NotFoundError(f"no dataset {ref!r}")


class RecordingIngest:
    """An ingest service that records the runs it is asked to start."""

    def __init__(self) -> None:
        self.started: list[tuple[str, list[str]]] = []

    def start(self, dataset: str, patterns: Sequence[str], options: IngestSettings) -> str:
        self.started.append((dataset, list(patterns)))
        return f"run-{len(self.started)}"

    def status(self, run_id: str) -> dict[str, Any]:
        return {"run_id": run_id, "state": "done"}

    def datasets(self) -> list[dict[str, Any]]:
        return []


def gateway(limits: RequestLimitsConfig | None = None) -> tuple[FastAPI, ReplayDispatcher, Telemetry]:
    """A gateway on the fakes; with ``limits``, else with GatewayDeps' own default."""
    telemetry = Telemetry(service_name="limits-test")
    dispatcher = ReplayDispatcher()
    deps = GatewayDeps(
        StaticCatalog(),
        dispatcher,
        lambda: {CHAT: True},
        telemetry,
        retriever=EmptyRetriever(),
        ingest=RecordingIngest(),
    )
    if limits is not None:
        deps = dataclasses.replace(deps, limits=limits)
    return create_app(deps), dispatcher, telemetry


@contextlib.contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """``app`` served by uvicorn on a free loopback port, for the ``with`` block; its base URL."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, ReplayDispatcher]]:
    """The gateway with the default limits (GatewayDeps' own), over real HTTP."""
    app, dispatcher, telemetry = gateway()
    with serving(app) as url:
        yield url, dispatcher
    telemetry.shutdown()


@pytest.fixture(scope="module")
def client(served: tuple[str, ReplayDispatcher]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served[0], headers=JSON, timeout=30) as c:
        yield c


def chat(content: Any = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": CHAT, "messages": [{"role": "user", "content": content}], **extra}


def post(client: httpx.Client, path: str, body: Any) -> httpx.Response:
    return client.post(path, content=json.dumps(body).encode())


def refused(r: httpx.Response, status: int, *says: str) -> dict[str, Any]:
    """The OpenAI error of ``r``, checked to have ``status`` and to say each of ``says``."""
    assert r.status_code == status, r.text
    error: dict[str, Any] = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == "invalid_request_error"
    for text in says:
        assert text in error["message"], (text, error["message"])
    return error


# --- body bytes: Content-Length, and chunked bodies -----------------------------------------------------


def padded(size: int) -> bytes:
    """A valid chat body of exactly ``size`` bytes (JSON allows the trailing spaces)."""
    raw = json.dumps(chat()).encode()
    return raw + b" " * (size - len(raw))


def test_body_at_the_byte_limit_passes_one_byte_over_is_a_413(client: httpx.Client) -> None:
    assert client.post("/v1/chat/completions", content=padded(8 * MIB)).status_code == 200
    error = refused(
        client.post("/v1/chat/completions", content=padded(8 * MIB + 1)),
        413,
        f"{8 * MIB + 1} bytes",
        f"at most {8 * MIB} bytes",
        "limits.max_body_bytes",
    )
    assert error["code"] == "request_too_large"


def _raw_exchange(base_url: str, head: bytes, body_parts: list[bytes]) -> tuple[int, dict[str, Any]]:
    """Send ``head`` and ``body_parts`` on a socket and read the answer, without ever finishing the body:
    an answer arrives only if the server decides before it has the whole body."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head)
        for part in body_parts:
            sock.sendall(part)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
        headers, _, rest = answer.partition(b"\r\n\r\n")
        lines = headers.decode().split("\r\n")
        length = next(int(h.split(":")[1]) for h in lines if h.lower().startswith("content-length:"))
        while len(rest) < length:
            rest += sock.recv(65536)
    return int(lines[0].split()[1]), json.loads(rest)


def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_sent(
    served: tuple[str, ReplayDispatcher],
) -> None:
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000000000\r\n\r\n"
    )
    started = time.monotonic()
    status, body = _raw_exchange(served[0], head, [b'{"model": '])
    assert status == 413
    assert "1000000000 bytes (its Content-Length)" in body["error"]["message"]
    assert "limits.max_body_bytes" in body["error"]["message"]
    assert time.monotonic() - started < 5


def test_a_chunked_body_is_stopped_at_the_limit(served: tuple[str, ReplayDispatcher]) -> None:
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    piece = b" " * 65536
    chunk = b"%x\r\n" % len(piece) + piece + b"\r\n"
    # the limit and two pieces more, and never the last (empty) chunk: the server cannot wait for the end
    status, body = _raw_exchange(served[0], head, [chunk] * (8 * MIB // len(piece) + 2))
    assert status == 413
    assert f"over {8 * MIB} bytes" in body["error"]["message"]


def test_a_chunked_body_at_the_limit_passes(client: httpx.Client) -> None:
    raw = padded(8 * MIB)

    def pieces() -> Iterator[bytes]:
        for i in range(0, len(raw), 100_000):
            yield raw[i : i + 100_000]

    r = client.post("/v1/chat/completions", content=pieces())
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert r.status_code == 200, r.text
    over = padded(8 * MIB + 1)
    r = client.post("/v1/chat/completions", content=iter([over[: 4 * MIB], over[4 * MIB :]]))
    refused(r, 413, "limits.max_body_bytes")


def test_the_admin_ingest_body_is_bounded_too(client: httpx.Client) -> None:
    ok = client.post("/admin/v1/datasets/docs/ingest", content=b'{"paths": ["*.md"]}')
    assert ok.status_code == 202, ok.text
    over = b'{"paths": ["*.md"]}' + b" " * (8 * MIB)
    refused(client.post("/admin/v1/datasets/docs/ingest", content=over), 413, "limits.max_body_bytes")


# --- counts, tokens and text lengths, at their defaults ---------------------------------------------------


def test_messages(client: httpx.Client) -> None:
    messages = [{"role": "user", "content": "hi"}] * DEFAULTS.max_messages
    assert post(client, "/v1/chat/completions", {"model": CHAT, "messages": messages}).status_code == 200
    r = post(client, "/v1/chat/completions", {"model": CHAT, "messages": [*messages, messages[0]]})
    error = refused(r, 400, "holds 1001 messages", "at most 1000", "limits.max_messages")
    assert error["param"] == "messages"


def test_embedding_inputs(client: httpx.Client) -> None:
    texts = ["a"] * DEFAULTS.max_embedding_inputs
    assert post(client, "/v1/embeddings", {"model": EMBED, "input": texts}).status_code == 200
    r = post(client, "/v1/embeddings", {"model": EMBED, "input": [*texts, "b"]})
    error = refused(r, 400, "holds 2049 texts", "at most 2048", "limits.max_embedding_inputs")
    assert error["param"] == "input"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_stop_sequences(client: httpx.Client, path: str) -> None:
    body = chat() if path == "/v1/chat/completions" else {"model": CHAT, "prompt": "x"}
    assert post(client, path, {**body, "stop": ["a", "b", "c", "d"]}).status_code == 200
    r = post(client, path, {**body, "stop": ["a", "b", "c", "d", "e"]})
    assert refused(r, 400, "holds 5 stop sequences", "at most 4", "limits.max_stop")["param"] == "stop"


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens(client: httpx.Client, field: str) -> None:
    assert post(client, "/v1/chat/completions", chat(**{field: 32768})).status_code == 200
    r = post(client, "/v1/chat/completions", chat(**{field: 32769}))
    assert refused(r, 400, "is 32769", "at most 32768", "limits.max_tokens")["param"] == field
    refused(post(client, "/v1/chat/completions", chat(**{field: 10**400})), 400, "limits.max_tokens")


def nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_json_depth(client: httpx.Client) -> None:
    # the body object is one level: an extra field holding 99 nested arrays makes 100
    assert post(client, "/v1/chat/completions", chat(x=nested(99))).status_code == 200
    r = post(client, "/v1/chat/completions", chat(x=nested(100)))
    refused(r, 400, "more than 100 deep", "limits.max_json_depth")


TEXT_AT = "x" * DEFAULTS.max_input_chars


@pytest.mark.parametrize(
    ("path", "make", "param"),
    [
        ("/v1/chat/completions", lambda t: chat(t), "messages[0].content"),
        (
            "/v1/chat/completions",
            lambda t: chat([{"type": "text", "text": "a"}, {"type": "text", "text": t}]),
            "messages[0].content[1].text",
        ),
        ("/v1/completions", lambda t: {"model": CHAT, "prompt": t}, "prompt"),
        ("/v1/completions", lambda t: {"model": CHAT, "prompt": [t]}, "prompt[0]"),
        ("/v1/embeddings", lambda t: {"model": EMBED, "input": t}, "input"),
        ("/v1/embeddings", lambda t: {"model": EMBED, "input": ["a", t]}, "input[1]"),
    ],
)
def test_input_chars(client: httpx.Client, path: str, make: Any, param: str) -> None:
    assert post(client, path, make(TEXT_AT)).status_code == 200
    r = post(client, path, make(TEXT_AT + "y"))
    error = refused(r, 400, "is 1000001 characters long", "at most 1000000", "limits.max_input_chars")
    assert error["param"] == param


def test_retrieval_query_chars(client: httpx.Client) -> None:
    at = post(client, "/v1/retrieve", {"dataset": "docs", "query": TEXT_AT})
    assert at.status_code == 404  # it passed the limits and reached the retriever, which has no datasets
    r = post(client, "/v1/retrieve", {"dataset": "docs", "query": TEXT_AT + "y"})
    assert refused(r, 400, "limits.max_input_chars")["param"] == "query"


def test_nothing_over_a_limit_reaches_a_replica(served: tuple[str, ReplayDispatcher]) -> None:
    dispatcher = served[1]
    before = len(dispatcher.sent)
    with httpx.Client(base_url=served[0], headers=JSON) as c:
        post(c, "/v1/chat/completions", chat(stop=["a"] * 5))
        post(c, "/v1/embeddings", {"model": EMBED, "input": ["a"] * 3000})
    assert len(dispatcher.sent) == before


# --- the three old 500s stay 400s ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b'{"model": "chat-model", "messages": [], "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "deep"),
        (
            b'{"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
            "NaN",
        ),
        (
            b'{"model": "chat-model", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
            "surrogate",
        ),
        (b'{"model": "chat-model", "messages": [], "seed": ' + b"9" * 5000 + b"}", "4300 digits"),
        # found by the corpus (tests/unit/test_malformed_bodies.py): json.loads reads bytes with
        # surrogatepass, so a surrogate's three UTF-8 bytes, or one in a UTF-16 body, got through
        (b'{"model": "chat-model", "messages": [], "x": "a\xed\xa0\x80b"}', "surrogate"),
        (
            '{"model": "chat-model", "messages": [], "x": "\udfff"}'.encode("utf-16", "surrogatepass"),
            "surrogate",
        ),
    ],
    ids=[
        "nested-100000-deep",
        "nan",
        "lone-surrogate",
        "5000-digit-integer",
        "surrogate-bytes",
        "utf16-surrogate",
    ],
)
def test_the_old_500s_are_400s(client: httpx.Client, raw: bytes, says: str) -> None:
    refused(client.post("/v1/chat/completions", content=raw), 400, says)


# --- configured values ------------------------------------------------------------------------------------

SMALL = RequestLimitsConfig(
    max_body_bytes=2000,
    max_messages=3,
    max_embedding_inputs=2,
    max_stop=1,
    max_tokens=10,
    max_json_depth=8,
    max_input_chars=50,
)
M = {"role": "user", "content": "hi"}


@pytest.fixture(scope="module")
def small() -> Iterator[httpx.Client]:
    """A gateway with small limits, over real HTTP."""
    app, _, telemetry = gateway(SMALL)
    with serving(app) as url, httpx.Client(base_url=url, headers=JSON, timeout=30) as c:
        yield c
    telemetry.shutdown()


@pytest.mark.parametrize(
    ("path", "at", "over", "says"),
    [
        ("/v1/chat/completions", padded(2000), padded(2001), "at most 2000 bytes (limits.max_body_bytes)"),
        (
            "/v1/chat/completions",
            {"model": CHAT, "messages": [M] * 3},
            {"model": CHAT, "messages": [M] * 4},
            "at most 3 (limits.max_messages)",
        ),
        (
            "/v1/embeddings",
            {"model": EMBED, "input": ["a", "b"]},
            {"model": EMBED, "input": ["a"] * 3},
            "at most 2 (limits.max_embedding_inputs)",
        ),
        ("/v1/chat/completions", chat(stop=["a"]), chat(stop=["a", "b"]), "at most 1 (limits.max_stop)"),
        ("/v1/chat/completions", chat(max_tokens=10), chat(max_tokens=11), "at most 10 (limits.max_tokens)"),
        ("/v1/chat/completions", chat(x=nested(7)), chat(x=nested(8)), "more than 8 deep"),
        ("/v1/chat/completions", chat("x" * 50), chat("x" * 51), "at most 50 (limits.max_input_chars)"),
    ],
    ids=["body", "messages", "inputs", "stop", "tokens", "depth", "chars"],
)
def test_each_limit_follows_the_config(small: httpx.Client, path: str, at: Any, over: Any, says: str) -> None:
    def send(body: Any) -> httpx.Response:
        return small.post(path, content=body if isinstance(body, bytes) else json.dumps(body).encode())

    assert send(at).status_code == 200
    refused(send(over), 413 if "max_body_bytes" in says else 400, says)


def test_the_config_section() -> None:
    assert LaminaConfig().limits == DEFAULTS
    assert DEFAULTS.model_dump() == {
        "max_body_bytes": 8 * MIB,
        "max_messages": 1000,
        "max_embedding_inputs": 2048,
        "max_stop": 4,
        "max_tokens": 32768,
        "max_json_depth": 100,
        "max_input_chars": 1_000_000,
    }
    assert LaminaConfig.model_validate({"limits": {"max_messages": 50}}).limits.max_messages == 50
    for bad in ({"max_json_depth": 1000}, {"max_stop": 0}, {"max_body_byte": 10}):
        with pytest.raises(ValidationError):
            LaminaConfig.model_validate({"limits": bad})


@pytest.mark.anyio
async def test_the_stack_hands_the_configs_limits_to_the_gateway(tmp_path: Path) -> None:
    config = LaminaConfig.model_validate(
        {"deployments": [], "register_bundled": False, "limits": {"max_stop": 1}}
    )
    stack = build_stack(config, tmp_path / "state")
    try:
        transport = httpx.ASGITransport(app=create_gateway(stack))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", headers=JSON) as c:
            r = await c.post("/v1/chat/completions", json=chat(stop=["a", "b"]))
        refused(r, 400, "at most 1 (limits.max_stop)")
    finally:
        await stack.aclose()
