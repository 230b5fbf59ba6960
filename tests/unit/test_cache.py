"""The response cache: its key, when it is used, its bounds on each backend (in process, the metadata store,
a real Redis), and the gateway answering hits without dispatching, plain and streamed."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from lamina.application import (
    Call,
    GatewayDeps,
    Principal,
    RateLimitPolicy,
    ResponseCache,
    SemanticIndex,
    Usage,
    create_app,
    response_cache,
)
from lamina.application._cache import decide, request_key
from lamina.application._cache_store import Bounds, CacheBackend, MemoryBackend, RedisBackend, StoreBackend
from lamina.application.guards import build_guards
from lamina.config import CacheConfig, GuardConfig, GuardsConfig, LaminaConfig, RateLimitsConfig
from lamina.data import LanceDBStore
from lamina.errors import InvalidRequestError
from lamina.observability import Telemetry
from lamina.store import Store
from tests.support import CHAT, EMBED, ReplayDispatcher, StaticCatalog, events_of, replica, trickle
from tests.support.redis_server import RedisServer, running_redis

pytestmark = pytest.mark.anyio

USER = Principal(key_id="k1", name="k1", scope="user")


def call(body: Mapping[str, Any], **fields: Any) -> Call:
    defaults: dict[str, Any] = {
        "principal": USER,
        "operation": "chat",
        "model": CHAT,
        "deployment": CHAT,
        "model_version": f"{CHAT}@1",
        "body": dict(body),
        "stream": False,
        "prompt_tokens": 10,
        "completion_tokens": 20,
    }
    return Call(**{**defaults, **fields})


MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
BASE = {"model": CHAT, "messages": MESSAGES, "temperature": 0, "max_tokens": 16}


# -- the key -------------------------------------------------------------------------------------------------


def test_the_key_ignores_what_cannot_change_the_answer() -> None:
    key = request_key(call(BASE), None)
    same = [
        {**BASE, "stream": True, "stream_options": {"include_usage": True}},
        {**BASE, "user": "alice", "metadata": {"team": "x"}},
        {**BASE, "model": f"{CHAT}@1"},
        {**BASE, "temperature": 0.0},
        dict(reversed(list(BASE.items()))),
    ]
    assert all(request_key(call(body), None) == key for body in same)


def test_the_key_changes_with_the_request_the_model_version_template_dataset_and_guards() -> None:
    key = request_key(call(BASE), None)
    other = [
        request_key(call({**BASE, "max_tokens": 17}), None),
        request_key(
            call({**BASE, "messages": [{"role": "user", "content": "What is the capital of Peru?"}]}), None
        ),
        request_key(call(BASE, model_version=f"{CHAT}@2"), None),
        request_key(call(BASE, deployment="other"), None),
        request_key(call(BASE, operation="text_completion"), None),
        request_key(call(BASE, template="greet@2"), None),
        request_key(call(BASE), "dataset-version-1"),
        request_key(call(BASE), None, salt="guards-changed"),
    ]
    assert len({key, *other}) == len(other) + 1


@pytest.mark.parametrize(
    ("header", "body", "lookup", "store"),
    [
        (None, {"temperature": 0}, True, True),
        (None, {"temperature": 0.7, "seed": 3}, True, True),
        (None, {"temperature": 0.7}, False, False),
        (None, {}, False, False),  # the default temperature is 1
        (None, {"temperature": 0, "logprobs": True}, False, False),
        ("use", {"temperature": 0.7}, True, True),
        ("USE ", {}, True, True),
        ("no-cache", {"temperature": 0}, False, True),
        ("no-store", {"temperature": 0}, False, False),
    ],
)
def test_which_requests_use_the_cache(
    header: str | None, body: dict[str, Any], lookup: bool, store: bool
) -> None:
    decision = decide(header, call({"model": CHAT, "messages": MESSAGES, **body}))
    assert (decision.lookup, decision.store) == (lookup, store)


def test_embeddings_are_cached_only_when_asked() -> None:
    embedding = call({"model": EMBED, "input": "hi"}, operation="embeddings")
    assert not decide(None, embedding).lookup
    assert decide("use", embedding).lookup


def test_an_unknown_header_value_says_what_to_send() -> None:
    with pytest.raises(InvalidRequestError, match="use, no-cache, no-store"):
        decide("always", call(BASE))


# -- the backends --------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("cache-redis")) as server:
        yield server


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'lamina.db'}")
    s.migrate()
    yield s
    s.close()


@dataclass
class Backends:
    store: Store
    redis: RedisServer
    made: list[CacheBackend] = field(default_factory=list)
    prefixes: int = 0

    def make(self, kind: str, bounds: Bounds, clock: Clock) -> CacheBackend:
        backend: CacheBackend
        if kind == "memory":
            backend = MemoryBackend(bounds, clock)
        elif kind == "store":
            backend = StoreBackend(self.store, bounds, clock)
        else:
            self.prefixes += 1
            backend = RedisBackend(self.redis.url, bounds, clock, prefix=f"test:{self.prefixes}")
        self.made.append(backend)
        return backend


@pytest.fixture
async def backends(store: Store, redis_server: RedisServer) -> AsyncIterator[Backends]:
    made = Backends(store, redis_server)
    yield made
    for backend in made.made:
        await backend.aclose()


KINDS = ["memory", "store", "redis"]


@pytest.mark.parametrize("kind", KINDS)
async def test_an_entry_is_served_until_its_ttl(kind: str, backends: Backends) -> None:
    clock = Clock()
    backend = backends.make(kind, Bounds(ttl_s=60, max_entries=10, max_bytes=10_000), clock)
    await backend.put("a", b"answer a")
    assert await backend.get("a") == b"answer a"
    assert await backend.get("b") is None
    if kind == "redis":  # Redis expires keys by its own clock: the entry carries the TTL
        pttl = backends.redis.client().pttl("test:1:e:a")
        assert 59_000 < pttl <= 60_000
        return
    clock.now += 59.9
    assert await backend.get("a") == b"answer a"
    clock.now += 0.2
    assert await backend.get("a") is None


@pytest.mark.parametrize("kind", KINDS)
async def test_the_least_recently_used_entry_goes_first(kind: str, backends: Backends) -> None:
    clock = Clock()
    backend = backends.make(kind, Bounds(ttl_s=600, max_entries=3, max_bytes=10_000), clock)
    for key in "abc":
        clock.now += 1
        await backend.put(key, key.encode() * 10)
    clock.now += 1
    assert await backend.get("a") is not None  # a is now the most recently used
    clock.now += 1
    await backend.put("d", b"d" * 10)
    assert [await backend.get(k) is not None for k in "abcd"] == [True, False, True, True]


@pytest.mark.parametrize("kind", KINDS)
async def test_the_byte_bound_holds_and_an_oversized_entry_is_not_kept(kind: str, backends: Backends) -> None:
    clock = Clock()
    backend = backends.make(kind, Bounds(ttl_s=600, max_entries=100, max_bytes=1000), clock)
    for key in "abcd":
        clock.now += 1
        await backend.put(key, key.encode() * 400)  # three make 1200 bytes: the oldest goes
    assert [await backend.get(k) is not None for k in "abcd"] == [False, False, True, True]
    await backend.put("huge", b"x" * 1001)
    assert await backend.get("huge") is None
    assert await backend.get("d") is not None
    clock.now += 1
    await backend.put("c", b"c" * 10)  # replacing an entry counts its new size only
    await backend.put("e", b"e" * 400)
    assert [await backend.get(k) is not None for k in "cde"] == [True, True, True]


async def test_redis_keeps_its_byte_total_exact(backends: Backends) -> None:
    backend = backends.make("redis", Bounds(ttl_s=600, max_entries=2, max_bytes=10_000), Clock())
    for key in "abcde":
        await backend.put(key, key.encode() * 100)
    client = backends.redis.client()
    assert client.get("test:1:bytes") == "200"
    assert client.zcard("test:1:lru") == 2


# -- through the gateway -------------------------------------------------------------------------------------


@dataclass
class CostRecorder:
    """Stands for the cost policy: records what it admits (a hit must not reach it)."""

    admitted: list[Call] = field(default_factory=list)

    async def admit(self, c: Call) -> CostRecorder.Ticket:
        self.admitted.append(c)
        return CostRecorder.Ticket()

    class Ticket:
        async def settle(self, c: Call, usage: Usage | None) -> None:
            if usage is not None:
                c.usage_extra["cost"] = 0.25
                c.headers["x-lamina-cost-usd"] = "0.25"


@dataclass
class Gw:
    client: httpx.AsyncClient
    dispatcher: ReplayDispatcher
    costs: CostRecorder
    cache: ResponseCache


async def gateway(cache: ResponseCache, rpm: int | None = None) -> AsyncIterator[Gw]:
    costs = CostRecorder()
    limits = RateLimitPolicy(RateLimitsConfig(rpm=rpm))
    telemetry = Telemetry(service_name="cache-test", store=None, otlp_endpoint=None)
    dispatcher = ReplayDispatcher()
    deps = GatewayDeps(
        StaticCatalog(), dispatcher, lambda: {}, telemetry, policies=[limits, costs], cache=cache
    )
    transport = httpx.ASGITransport(app=create_app(deps))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        yield Gw(client, dispatcher, costs, cache)
    await cache.aclose()
    await limits.aclose()
    telemetry.shutdown()


@pytest.fixture
async def gw(store: Store) -> AsyncIterator[Gw]:
    async for g in gateway(ResponseCache(MemoryBackend(Bounds(60, 100, 1_000_000)))):
        yield g


def chat(**extra: Any) -> dict[str, Any]:
    return {
        "model": CHAT,
        "messages": [{"role": "user", "content": "hello there"}],
        "temperature": 0,
        **extra,
    }


async def test_a_plain_answer_is_served_from_the_cache_without_dispatch_or_cost(gw: Gw) -> None:
    first = await gw.client.post("/v1/chat/completions", json=chat())
    second = await gw.client.post("/v1/chat/completions", json=chat(user="someone else"))
    assert first.status_code == second.status_code == 200, second.text
    assert (first.headers["x-lamina-cache"], second.headers["x-lamina-cache"]) == ("miss", "hit")
    assert len(gw.dispatcher.sent) == 1 and len(gw.costs.admitted) == 1
    a, b = first.json(), second.json()
    assert a["usage"]["cost"] == 0.25 and "x-lamina-cost-usd" not in second.headers
    assert b["usage"] == {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    assert b["choices"] == a["choices"] and b["model"] == a["model"] and b["object"] == "chat.completion"
    assert b["id"] != a["id"] and b["id"].startswith("chatcmpl-") and b["created"] > 1


async def test_sampled_requests_bypass_it_unless_asked(gw: Gw) -> None:
    for _ in range(2):
        r = await gw.client.post("/v1/chat/completions", json=chat(temperature=0.8))
        assert r.headers["x-lamina-cache"] == "bypass"
    assert len(gw.dispatcher.sent) == 2
    asked = {"x-lamina-cache": "use"}
    r1 = await gw.client.post("/v1/chat/completions", json=chat(temperature=0.8), headers=asked)
    r2 = await gw.client.post("/v1/chat/completions", json=chat(temperature=0.8), headers=asked)
    assert (r1.headers["x-lamina-cache"], r2.headers["x-lamina-cache"]) == ("miss", "hit")
    assert len(gw.dispatcher.sent) == 3


async def test_embeddings_are_cached_when_asked(gw: Gw) -> None:
    body, asked = {"model": EMBED, "input": "hello"}, {"x-lamina-cache": "use"}
    plain = await gw.client.post("/v1/embeddings", json=body)
    first = await gw.client.post("/v1/embeddings", json=body, headers=asked)
    second = await gw.client.post("/v1/embeddings", json=body, headers=asked)
    assert [r.headers["x-lamina-cache"] for r in (plain, first, second)] == ["bypass", "miss", "hit"]
    assert second.json()["data"] == first.json()["data"] and second.json()["object"] == "list"
    assert len(gw.dispatcher.sent) == 2


async def test_the_bypass_headers(gw: Gw) -> None:
    await gw.client.post("/v1/chat/completions", json=chat())
    for value in ("no-cache", "no-store"):
        r = await gw.client.post("/v1/chat/completions", json=chat(), headers={"x-lamina-cache": value})
        assert r.status_code == 200 and r.headers["x-lamina-cache"] == "bypass"
    assert len(gw.dispatcher.sent) == 3
    r = await gw.client.post("/v1/chat/completions", json=chat(), headers={"x-lamina-cache": "sometimes"})
    assert r.status_code == 400 and "no-cache" in r.json()["error"]["message"]
    # no-store never stored: a request it alone answered is still a miss
    await gw.client.post(
        "/v1/completions",
        json={"model": CHAT, "prompt": "x", "temperature": 0},
        headers={"x-lamina-cache": "no-store"},
    )
    r = await gw.client.post("/v1/completions", json={"model": CHAT, "prompt": "x", "temperature": 0})
    assert r.headers["x-lamina-cache"] == "miss"


async def test_a_stream_is_cached_and_replayed_with_equal_content(gw: Gw) -> None:
    body = chat(stream=True, stream_options={"include_usage": True})
    first = await gw.client.post("/v1/chat/completions", json=body)
    second = await gw.client.post("/v1/chat/completions", json=body)
    assert (first.headers["x-lamina-cache"], second.headers["x-lamina-cache"]) == ("miss", "hit")
    assert second.headers["content-type"].startswith("text/event-stream")
    assert len(gw.dispatcher.sent) == 1
    a, b = events_of(first.text), events_of(second.text)
    assert a[-1] == b[-1] == "[DONE]"
    chunks_a, chunks_b = [json.loads(e) for e in a[:-1]], [json.loads(e) for e in b[:-1]]

    def shape(chunks: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return [(c["index"], c["delta"], c["finish_reason"]) for chunk in chunks for c in chunk["choices"]]

    assert shape(chunks_a[:-1]) == shape(chunks_b[:-1])  # role, "Hello", " world", finish
    assert chunks_b[-1]["choices"] == [] and chunks_b[-1]["usage"]["total_tokens"] == 11
    assert "cost" not in chunks_b[-1]["usage"] and chunks_a[-1]["usage"]["cost"] == 0.25
    assert len({c["id"] for c in chunks_b}) == 1 and chunks_b[0]["id"] != chunks_a[0]["id"]
    # without include_usage, no usage chunk; a plain request gets the same answer assembled
    no_usage = events_of((await gw.client.post("/v1/chat/completions", json=chat(stream=True))).text)
    assert all(json.loads(e)["choices"] for e in no_usage[:-1])
    plain = (await gw.client.post("/v1/chat/completions", json=chat())).json()
    assert plain["choices"][0]["message"] == {"role": "assistant", "content": "Hello world"}
    assert plain["choices"][0]["finish_reason"] == "stop" and len(gw.dispatcher.sent) == 1


async def test_a_plain_answer_is_replayed_as_a_stream(gw: Gw) -> None:
    await gw.client.post("/v1/completions", json={"model": CHAT, "prompt": "The sky is", "seed": 1})
    r = await gw.client.post(
        "/v1/completions", json={"model": CHAT, "prompt": "The sky is", "seed": 1, "stream": True}
    )
    assert r.headers["x-lamina-cache"] == "hit"
    chunks = [json.loads(e) for e in events_of(r.text)[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == " blue"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[0]["object"] == "text_completion"


async def test_failed_answers_are_not_stored(gw: Gw) -> None:
    def failing(path: str, body: Mapping[str, Any]) -> httpx.Response:
        return httpx.Response(
            500, json={"error": {"message": "boom", "type": "server_error", "code": "engine_error"}}
        )

    gw.dispatcher.reply = failing
    assert (await gw.client.post("/v1/chat/completions", json=chat())).status_code == 500
    gw.dispatcher.reply = replica
    r = await gw.client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200 and r.headers["x-lamina-cache"] == "miss"


async def test_a_stream_that_fails_midway_is_not_stored(gw: Gw) -> None:
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": CHAT}
    error = {"error": {"message": "the engine died", "type": "server_error", "code": "engine_crashed"}}

    def broken(path: str, body: Mapping[str, Any]) -> httpx.Response:
        events = [
            {
                **base,
                "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": "Hel"}, "finish_reason": None}
                ],
            },
            error,
        ]
        data = [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=trickle(data))

    def cut(path: str, body: Mapping[str, Any]) -> httpx.Response:  # no [DONE]: broke off
        event = {**base, "choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]}
        data = [b"data: " + json.dumps(event).encode() + b"\n\n"]
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=trickle(data))

    for reply in (broken, cut):
        gw.dispatcher.reply = reply
        r = await gw.client.post("/v1/chat/completions", json=chat(stream=True))
        assert r.status_code == 200 and '"error"' in r.text
    gw.dispatcher.reply = replica
    r = await gw.client.post("/v1/chat/completions", json=chat(stream=True))
    assert r.headers["x-lamina-cache"] == "miss" and '"error"' not in r.text


async def test_a_hit_counts_as_a_request_against_rate_limits_but_reserves_no_tokens(store: Store) -> None:
    async for g in gateway(ResponseCache(MemoryBackend(Bounds(60, 100, 1_000_000))), rpm=3):
        answers = [await g.client.post("/v1/chat/completions", json=chat()) for _ in range(4)]
        assert [r.status_code for r in answers] == [200, 200, 200, 429]
        assert [r.headers.get("x-lamina-cache") for r in answers[:3]] == ["miss", "hit", "hit"]
        assert answers[2].headers["x-ratelimit-remaining-requests"] == "0"
        assert len(g.dispatcher.sent) == 1 and len(g.costs.admitted) == 1


@pytest.mark.parametrize("backend", ["store", "redis"])
async def test_the_gateway_on_the_store_and_redis_backends(
    backend: str, store: Store, redis_server: RedisServer
) -> None:
    url = redis_server.url if backend == "redis" else None
    config = CacheConfig(enabled=True, backend=backend, url=url)  # type: ignore[arg-type]
    cache = response_cache(config, store)
    assert cache is not None
    async for g in gateway(cache):
        first = await g.client.post("/v1/chat/completions", json=chat(seed=backend == "redis"))
        second = await g.client.post("/v1/chat/completions", json=chat(seed=backend == "redis"))
        assert (first.headers["x-lamina-cache"], second.headers["x-lamina-cache"]) == ("miss", "hit")
        assert second.json()["choices"] == first.json()["choices"] and len(g.dispatcher.sent) == 1
    if backend == "store":
        with store.begin() as conn:
            from sqlalchemy import text

            assert conn.execute(text("SELECT count(*) FROM cache_entries")).scalar_one() == 1


async def test_a_cache_that_is_down_is_a_miss_not_a_failure(store: Store) -> None:
    from tests.support.processes import free_port

    dead = RedisBackend(f"redis://127.0.0.1:{free_port()}/0", Bounds(60, 10, 10_000))
    async for g in gateway(ResponseCache(dead)):
        for _ in range(2):
            r = await g.client.post("/v1/chat/completions", json=chat())
            assert r.status_code == 200 and r.headers["x-lamina-cache"] == "miss"
        assert len(g.dispatcher.sent) == 2


def test_the_config_needs_a_url_for_redis() -> None:
    with pytest.raises(ValueError, match=r"cache\.url"):
        CacheConfig(backend="redis")
    assert response_cache(CacheConfig(enabled=False), Store("sqlite://")) is None


def test_entries_keep_the_replica_usage_only() -> None:
    from lamina.application._cache_answers import plain_answer, plain_entry

    body = {
        "id": "x",
        "created": 1,
        "object": "chat.completion",
        "model": CHAT,
        "choices": [],
        "usage": {"prompt_tokens": 1, "cost": 3},
    }
    entry = plain_entry(body, ["cost"])
    assert entry is not None
    assert plain_answer(entry)["usage"] == {"prompt_tokens": 1}


# -- the semantic cache --------------------------------------------------------------------------------------


class BagOfWords:
    """The AsyncEmbedder port: a unit vector of hashed lowercase words, so rewordings that keep the words
    (case, punctuation, order) embed identically and other questions do not."""

    async def embed_queries(self, texts: Sequence[str]) -> list[list[float]]:
        out = []
        for text in texts:
            v = np.zeros(64)
            for word in re.findall(r"[a-z]+", text.lower()):
                v[int(hashlib.sha256(word.encode()).hexdigest(), 16) % 64] += 1
            out.append((v / np.linalg.norm(v)).tolist())
        return out


async def test_the_semantic_cache_answers_a_reworded_question_within_the_same_scope(tmp_path: Path) -> None:
    vectors = LanceDBStore(tmp_path / "vectors")
    semantic = SemanticIndex(vectors, BagOfWords(), min_similarity=0.99, max_entries=100)
    cache = ResponseCache(MemoryBackend(Bounds(60, 100, 1_000_000)), semantic=semantic)

    def ask(question: str, system: str = "Be brief.", **extra: Any) -> dict[str, Any]:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        return {"model": CHAT, "messages": messages, "temperature": 0, **extra}

    async for g in gateway(cache):
        first = await g.client.post("/v1/chat/completions", json=ask("What is the capital of France?"))
        reworded = await g.client.post("/v1/chat/completions", json=ask("the capital of france: what is?"))
        assert (first.headers["x-lamina-cache"], reworded.headers["x-lamina-cache"]) == ("miss", "hit")
        assert float(reworded.headers["x-lamina-cache-similarity"]) >= 0.99
        assert reworded.json()["choices"] == first.json()["choices"] and len(g.dispatcher.sent) == 1
        others = [
            ask("What is the capital of Peru?"),  # another question
            ask("What is the capital of France?", system="Answer in French."),  # another system prompt
            ask("What is the capital of France?", max_tokens=5),  # other settings
        ]
        for body in others:
            r = await g.client.post("/v1/chat/completions", json=body)
            assert r.headers["x-lamina-cache"] == "miss", body
        assert len(g.dispatcher.sent) == 4
    vectors.close()


async def test_an_answer_an_output_guard_blocks_is_not_stored() -> None:
    blocks = GuardsConfig(output=[GuardConfig(kind="topics", words=["world"], action="block")])
    guards = build_guards(blocks, metrics=None, embedder=None)[1]
    telemetry = Telemetry(service_name="cache-test", store=None, otlp_endpoint=None)
    dispatcher = ReplayDispatcher()
    memory = MemoryBackend(Bounds(60, 100, 1_000_000))
    deps = GatewayDeps(
        StaticCatalog(), dispatcher, lambda: {}, telemetry, output_guards=guards, cache=ResponseCache(memory)
    )
    transport = httpx.ASGITransport(app=create_app(deps))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        for body in (chat(), chat(stream=True)):
            for _ in range(2):
                r = await client.post("/v1/chat/completions", json=body)
                assert "content_blocked" in r.text and r.headers.get("x-lamina-cache") != "hit"
    assert len(dispatcher.sent) == 4 and len(memory) == 0
    telemetry.shutdown()


async def test_cpu_of_a_miss_and_a_hit() -> None:
    """2,000 misses then 2,000 hits at two prompt sizes, and the cache's own CPU per request for each
    (printed with -s; the README quotes it): key and lookup on a miss, lookup and answer on a hit. What is
    asserted is the behaviour; the figures are the machine's, so they are printed, not bounded."""
    import time

    from lamina.application._cache_answers import plain_answer, plain_entry

    cache = ResponseCache(MemoryBackend(Bounds(3600, 100_000, 1 << 30)))
    message = {"role": "assistant", "content": "word " * 60}
    usage = {"prompt_tokens": 30, "completion_tokens": 60, "total_tokens": 90}
    answer = {
        "object": "chat.completion",
        "model": CHAT,
        "choices": [{"index": 0, "message": message}],
        "usage": usage,
    }
    entry = plain_entry(answer)
    assert entry is not None
    for size in (100, 4000):
        calls = [
            call({**BASE, "messages": [{"role": "user", "content": f"{i} " + "x" * size}]})
            for i in range(2000)
        ]
        started = time.process_time()
        missed = [await cache.lookup(c, None, None) for c in calls]
        miss_us = (time.process_time() - started) / len(calls) * 1e6
        assert all(m.entry is None for m in missed)
        for c in calls:
            await cache.backend.put(request_key(c, None, cache.salt), entry)
        started = time.process_time()
        answers = []
        for c in calls:
            found = await cache.lookup(c, None, None)
            assert found.entry is not None
            answers.append(plain_answer(found.entry))
        hit_us = (time.process_time() - started) / len(calls) * 1e6
        assert all(a["choices"][0]["message"] == message and a["usage"] == usage for a in answers)
        print(
            f"\nprompt of {size} bytes: miss {miss_us:.1f} us CPU (key + lookup), "
            f"hit {hit_us:.1f} us (lookup + answer)"
        )


def test_the_readme_example_is_a_valid_config() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("### Response cache", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    config = LaminaConfig.model_validate({"register_bundled": False, **yaml.safe_load(block)})
    assert config.cache == CacheConfig(enabled=True)  # the example turns it on, with the defaults
