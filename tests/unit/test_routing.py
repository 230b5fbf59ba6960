"""Model groups: each strategy as pure logic (fake stats, fake clock), the config's rules, and the gateway's
retries, fallbacks and stream continuation over ASGI with a dispatcher that answers like replicas."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import yaml
from pydantic import ValidationError
from starlette.requests import Request

from lamina.application import GatewayDeps, ModelRouter, Principal, create_app
from lamina.config import LaminaConfig, ModelGroupConfig
from lamina.errors import NoReadyReplicaError
from lamina.models import (
    Features,
    KeywordClassifier,
    LatencyTracker,
    MemberStats,
    plan_tries,
    rank_members,
    retry_backoff_s,
)
from lamina.observability import Telemetry
from tests.support import (
    Dispatched,
    FakeClock,
    FixedRoute,
    ReplayDispatcher,
    StaticCatalog,
    chat_events,
    replica,
    trickle,
)

RNG = random.Random(7)


def group(strategy: str = "least_busy", **extra: Any) -> ModelGroupConfig:
    members = extra.pop("members", [{"deployment": "a"}, {"deployment": "b"}, {"deployment": "c"}])
    return ModelGroupConfig.model_validate({"name": "g", "members": members, "strategy": strategy, **extra})


# --- strategies ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("in_flight", "expected"),
    [({"a": 3, "b": 0, "c": 1}, ["b", "c", "a"]), ({"a": 0, "b": 0, "c": 0}, ["a", "b", "c"])],
)
def test_least_busy_orders_by_requests_in_flight(in_flight: dict[str, int], expected: list[str]) -> None:
    stats = {m: MemberStats(in_flight=n) for m, n in in_flight.items()}
    assert rank_members(group(), stats, Features(), RNG) == expected


def test_members_without_a_ready_replica_go_last() -> None:
    stats = {"a": MemberStats(in_flight=0, ready=False), "b": MemberStats(in_flight=5), "c": MemberStats(2)}
    assert rank_members(group(), stats, Features(), RNG) == ["c", "b", "a"]


def test_lowest_latency_follows_the_ewma_and_remeasures_stale_members() -> None:
    clock = FakeClock()
    tracker = LatencyTracker(clock.monotonic, alpha=0.5, explore_after_s=60)
    for member, seconds in [("a", 1.0), ("b", 0.2), ("c", 0.5), ("b", 1.8)]:
        tracker.record(member, seconds)
    assert tracker.latency("b") == pytest.approx(1.0)  # 0.5 * 1.8 + 0.5 * 0.2

    def stats() -> dict[str, MemberStats]:
        return {m: MemberStats(latency_s=tracker.latency(m)) for m in "abc"}

    assert rank_members(group("lowest_latency"), stats(), Features(), RNG) == ["c", "a", "b"]
    clock.advance(30)
    tracker.record("a", 1.0)
    tracker.record("b", 1.0)
    clock.advance(45)  # c's only sample is 75 s old: unmeasured again, so it goes first
    assert tracker.latency("c") is None
    assert rank_members(group("lowest_latency"), stats(), Features(), RNG)[0] == "c"


def test_lowest_cost_puts_unknown_prices_last() -> None:
    stats = {"a": MemberStats(cost=2.5), "b": MemberStats(cost=None), "c": MemberStats(cost=0.1)}
    assert rank_members(group("lowest_cost"), stats, Features(), RNG) == ["c", "a", "b"]


def test_weighted_picks_in_proportion_to_the_weights() -> None:
    g = group("weighted", members=[{"deployment": "a", "weight": 3}, {"deployment": "b", "weight": 1}])
    rng = random.Random(42)
    firsts = Counter(rank_members(g, {}, Features(), rng)[0] for _ in range(4000))
    assert firsts["a"] / 4000 == pytest.approx(0.75, abs=0.03)
    assert sorted(rank_members(g, {}, Features(), random.Random(1))) == ["a", "b"]


def test_rules_pick_the_first_matching_rule() -> None:
    rules = [
        {"member": "c", "has_tools": True},
        {"member": "b", "min_prompt_chars": 20},
        {"member": "a", "metadata": {"tier": "free"}},
        {"member": "c", "response_format": "json_object"},
    ]
    g = group("rules", rules=rules)

    def first(body: dict[str, Any], headers: Mapping[str, str] = {}) -> str:
        return rank_members(g, {}, Features.of(body, headers), RNG)[0]

    msgs = [{"role": "user", "content": "short"}]
    assert first({"messages": msgs, "tools": [{"type": "function"}]}) == "c"
    assert first({"messages": [{"role": "user", "content": "x" * 25}]}) == "b"
    assert first({"messages": msgs, "metadata": {"tier": "free"}}) == "a"
    assert first({"messages": msgs}, {"x-lamina-meta-tier": "free"}) == "a"
    assert first({"messages": msgs, "response_format": {"type": "json_object"}}) == "c"
    assert first({"prompt": "short"}) == "a"  # no rule matches: declared order


def test_the_classifier_is_pluggable_and_keywords_are_the_default() -> None:
    g = group("classifier", keywords={"b": ["invoice", "refund"], "c": ["python", "code"]})

    def ask(text: str) -> Features:
        return Features.of({"messages": [{"role": "user", "content": text}]})

    assert rank_members(g, {}, ask("Write Python code to sort"), RNG)[0] == "c"
    assert rank_members(g, {}, ask("Where is my REFUND for the invoice?"), RNG)[0] == "b"
    assert rank_members(g, {}, ask("hello there"), RNG)[0] == "a"
    assert KeywordClassifier({"b": ["refund"]})(ask("refunded")) is None  # whole words only

    def plugged(features: Features) -> str | None:
        return "b" if len(features.text) > 10 else None

    assert rank_members(g, {}, ask("Write Python code to sort"), RNG, plugged)[0] == "b"


def test_plan_tries_retries_then_fallbacks_without_repeats() -> None:
    groups = {
        "g": group(retries=1, fallbacks=["h", "c", "a"]),
        "h": ModelGroupConfig.model_validate(
            {"name": "h", "members": [{"deployment": "d"}, {"deployment": "a"}], "retries": 0}
        ),
    }

    def ranked(g: ModelGroupConfig) -> list[str]:
        return [m.deployment for m in g.members]

    assert plan_tries("g", groups, ranked) == ["a", "b", "d", "c"]
    assert plan_tries("x", groups, ranked) == ["x"]


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [retry_backoff_s(n) for n in (1, 2, 3, 10)] == [0.05, 0.1, 0.2, 1.0]


# --- config ----------------------------------------------------------------------------------------------


def config(groups: list[dict[str, Any]], **extra: Any) -> LaminaConfig:
    deployments = [{"name": n, "engine": "fake"} for n in ("a", "b", "c")]
    data = {"register_bundled": False, "deployments": deployments, "groups": groups, **extra}
    return LaminaConfig.model_validate(data)


def members(*names: str) -> list[dict[str, str]]:
    return [{"deployment": n} for n in names]


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ([{"name": "g", "members": members("a", "zz")}], "members must be deployments; not deployed: ['zz']"),
        ([{"name": "a", "members": members("b")}], "differ from deployments"),
        ([{"name": "g", "members": members("a"), "fallbacks": ["nope"]}], "unknown models ['nope']"),
        (
            [
                {"name": "g", "members": members("a"), "fallbacks": ["h"]},
                {"name": "h", "members": members("b"), "fallbacks": ["k"]},
                {"name": "k", "members": members("c"), "fallbacks": ["g"]},
            ],
            "cycle: g -> h -> k -> g",
        ),
        ([{"name": "g", "members": members("a", "a")}], "lists a member twice"),
        ([{"name": "g", "members": members("a"), "strategy": "rules"}], "no rules"),
        ([{"name": "g", "members": members("a"), "rules": [{"member": "b"}]}], "not its members"),
        ([{"name": "g", "members": []}], "at least 1 item"),
    ],
)
def test_bad_groups_are_refused_naming_the_problem(groups: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config(groups)


def test_a_good_group_config_loads() -> None:
    cfg = config(
        [
            {"name": "g", "members": members("a", "b"), "fallbacks": ["h", "c"], "strategy": "weighted"},
            {"name": "h", "members": members("c"), "fallbacks": ["a"]},
        ]
    )
    assert [g.name for g in cfg.groups] == ["g", "h"] and cfg.groups[0].retries == 1


# --- the gateway: retries, fallbacks, continuation --------------------------------------------------------

CAPS = frozenset({"chat", "completion", "streaming"})
WORDS = ["The", " quick", " brown", " fox", " jumps"]


def stream_of(model: str, words: list[str], fail_after: int | None = None) -> httpx.Response:
    events = chat_events(model, words)
    fail = None
    if fail_after is not None:
        events, fail = events[: 1 + fail_after], httpx.ReadError("the replica died")
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=trickle(events, fail))


def error(status: int, code: str) -> httpx.Response:
    body = {"error": {"message": f"{code} here", "type": "server_error", "param": None, "code": code}}
    return httpx.Response(status, json=body)


class Replicas:
    """What each member answers: a function of the request body, per deployment."""

    def __init__(self) -> None:
        self.answers: dict[str, Any] = {}

    def __call__(self, path: str, body: Mapping[str, Any]) -> httpx.Response:
        answer = self.answers.get(str(body["model"]))
        if isinstance(answer, Exception):
            raise answer
        return answer(body) if answer is not None else replica(path, body)


@dataclass
class SlowDispatcher(ReplayDispatcher):
    """Replicas that may take their time (``slow``: seconds by deployment) before they answer."""

    slow: dict[str, float] = field(default_factory=dict)

    async def request(
        self,
        deployment: str,
        path: str,
        json_body: Mapping[str, Any],
        headers: Mapping[str, str] | None = None,
    ) -> Dispatched:
        await anyio.sleep(self.slow.get(deployment, 0))
        return await super().request(deployment, path, json_body, headers)


async def by_header(request: Request) -> Principal:
    """The caller may use the models named in its ``x-models`` header (all without one)."""
    names = request.headers.get("x-models")
    return Principal("k", "key", "user", models=None if names is None else frozenset(names.split(",")))


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Replicas, ReplayDispatcher]]:
    catalog = StaticCatalog()
    for name in ("a", "b", "c"):
        catalog.routes[name] = FixedRoute(name, name, None, CAPS)
    telemetry = Telemetry(service_name="routing-test", store=None, otlp_endpoint=None)
    replicas = Replicas()
    dispatcher = SlowDispatcher(reply=replicas)
    groups = [
        group(
            "rules",
            timeout_s=1.0,
            rules=[{"member": "a", "min_prompt_chars": 0}],
            retries=1,
            fallbacks=["c"],
            deadline_s=10,
        )
    ]
    router = ModelRouter(groups, catalog, telemetry, lambda: {"a": True, "b": True, "c": True})
    deps = GatewayDeps(
        router.catalog, dispatcher, lambda: {}, telemetry, router=router, authenticator=by_header
    )
    transport = httpx.ASGITransport(app=create_app(deps))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        yield client, replicas, dispatcher
    telemetry.shutdown()


def ask(stream: bool = False) -> dict[str, Any]:
    return {"model": "g", "messages": [{"role": "user", "content": "go"}], "stream": stream}


def text_of(sse: str) -> tuple[str, list[dict[str, Any]]]:
    events = [json.loads(e[6:]) for e in sse.strip().split("\n\n") if e != "data: [DONE]"]
    text = "".join(
        c["delta"].get("content") or ""
        for e in events
        if "choices" in e
        for c in e["choices"]
        if "delta" in c
    )
    return text, [e for e in events if "error" in e]


@pytest.mark.anyio
async def test_a_plain_call_falls_back_on_5xx_and_names_the_member(gw: Any) -> None:
    client, replicas, dispatcher = gw
    replicas.answers["a"] = lambda body: error(500, "engine_error")
    replicas.answers["b"] = NoReadyReplicaError("no replica of b", deployment="b", attempts=1)
    r = await client.post("/v1/chat/completions", json=ask())
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "c" and r.headers["x-lamina-model"] == "c"
    assert [s.deployment for s in dispatcher.sent] == ["a", "b", "c"]
    assert {s.body["model"] for s in dispatcher.sent} == {"a", "b", "c"}


@pytest.mark.anyio
async def test_a_member_slower_than_timeout_s_is_left_for_the_next(gw: Any) -> None:
    client, _, dispatcher = gw
    dispatcher.slow["a"] = 5.0
    started = time.monotonic()
    r = await client.post("/v1/chat/completions", json=ask())
    assert r.status_code == 200 and r.headers["x-lamina-model"] == "b"
    assert 1.0 <= time.monotonic() - started < 3.0


@pytest.mark.anyio
async def test_a_client_error_is_not_retried_and_the_last_failure_is_answered(gw: Any) -> None:
    client, replicas, dispatcher = gw
    replicas.answers["a"] = lambda body: error(400, "invalid_request")
    r = await client.post("/v1/chat/completions", json=ask())
    assert r.status_code == 400 and [s.deployment for s in dispatcher.sent] == ["a"]
    for m in "abc":
        replicas.answers[m] = lambda body: error(429, "rate_limited")
    r = await client.post("/v1/chat/completions", json=ask())
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"


@pytest.mark.anyio
async def test_a_stream_broken_midway_is_continued_by_the_fallback(gw: Any) -> None:
    client, replicas, dispatcher = gw
    replicas.answers["a"] = lambda body: stream_of("a", WORDS, fail_after=2)
    replicas.answers["b"] = lambda body: stream_of("b", WORDS)
    r = await client.post("/v1/chat/completions", json=ask(stream=True))
    text, errors = text_of(r.text)
    assert r.status_code == 200 and errors == []
    assert text == "".join(WORDS) and r.text.endswith("data: [DONE]\n\n")
    assert [s.deployment for s in dispatcher.sent] == ["a", "b"]


@pytest.mark.anyio
async def test_a_continuation_skips_a_member_without_replicas(gw: Any) -> None:
    client, replicas, dispatcher = gw
    replicas.answers["a"] = lambda body: stream_of("a", WORDS, fail_after=1)
    replicas.answers["b"] = NoReadyReplicaError("no replica of b", deployment="b", attempts=1)
    replicas.answers["c"] = lambda body: stream_of("c", WORDS)
    r = await client.post("/v1/chat/completions", json=ask(stream=True))
    assert text_of(r.text) == ("".join(WORDS), [])
    assert [s.deployment for s in dispatcher.sent] == ["a", "b", "c"]


@pytest.mark.anyio
async def test_a_fallback_that_answers_differently_ends_with_a_clean_error(gw: Any) -> None:
    client, replicas, _ = gw
    replicas.answers["a"] = lambda body: stream_of("a", WORDS, fail_after=3)
    replicas.answers["b"] = lambda body: stream_of("b", ["The", " slow", " cat"])
    replicas.answers["c"] = lambda body: stream_of("c", WORDS)
    r = await client.post("/v1/chat/completions", json=ask(stream=True))
    text, errors = text_of(r.text)
    assert text == "".join(WORDS[:3])  # what a sent before it broke; nothing of b's other answer
    assert [e["error"]["code"] for e in errors] == ["engine_crashed"]
    assert "answered differently" in errors[0]["error"]["message"]
    assert r.text.endswith("data: [DONE]\n\n")


@pytest.mark.anyio
async def test_a_stream_refused_before_it_starts_goes_to_the_next_member(gw: Any) -> None:
    client, replicas, _ = gw
    replicas.answers["a"] = lambda body: error(503, "unavailable")
    replicas.answers["b"] = lambda body: stream_of("b", WORDS)
    r = await client.post("/v1/chat/completions", json=ask(stream=True))
    assert r.status_code == 200 and r.headers["x-lamina-model"] == "b"
    assert text_of(r.text) == ("".join(WORDS), [])
    for m in "abc":
        replicas.answers[m] = lambda body: error(503, "unavailable")
    r = await client.post("/v1/chat/completions", json=ask(stream=True))
    assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"


@pytest.mark.anyio
async def test_a_key_needs_the_groups_name_not_one_members(gw: Any) -> None:
    client, _, dispatcher = gw
    refused = await client.post("/v1/chat/completions", json=ask(), headers={"x-models": "a"})
    assert refused.status_code == 403 and dispatcher.sent == []
    allowed = await client.post("/v1/chat/completions", json=ask(), headers={"x-models": "g"})
    assert allowed.status_code == 200


@pytest.mark.anyio
async def test_groups_are_listed_as_models(gw: Any) -> None:
    client, _, _ = gw
    cards = {c["id"]: c for c in (await client.get("/v1/models")).json()["data"]}
    assert cards["g"]["capabilities"] == ["chat", "completion", "streaming"]
    assert {"a", "b", "c", "g"} <= set(cards)


def test_the_readme_example_is_a_valid_config() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Model groups and fallbacks", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    cfg = LaminaConfig.model_validate({"register_bundled": False, **yaml.safe_load(block)})
    assert [g.strategy for g in cfg.groups] == ["least_busy", "rules"]
