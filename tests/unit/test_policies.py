"""The gateway's policy pipeline: every model call is admitted by each policy in order before it is
dispatched, and each ticket is settled exactly once: with the replica's usage, or with None when the call
failed, was refused by a later policy, or its client left. A settling ticket's headers and usage fields
reach the client, on plain answers and on streams."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from lamina.application import Call, GatewayDeps, Principal, Usage, close_policies, create_app
from lamina.errors import EngineCrashedError, RateLimitError
from lamina.observability import SamplingPolicy, Telemetry, read_trace
from lamina.store import Store
from tests.support import CHAT, EMBED, ReplayDispatcher, StaticCatalog, events_of

pytestmark = pytest.mark.anyio


@dataclass
class Recorder:
    """A policy that records what it admits and how each ticket settles; ``refuse`` makes it say no."""

    name: str
    log: list[tuple[str, str, Any]]
    refuse: bool = False
    seen: list[Call] = field(default_factory=list)

    async def admit(self, call: Call) -> Recorder.Ticket:
        self.seen.append(call)
        if self.refuse:
            raise RateLimitError(f"{self.name} says no", headers={"retry-after": "7"})
        self.log.append((self.name, "admit", call.reserved_tokens))
        call.headers[f"x-{self.name}"] = "admitted"
        return Recorder.Ticket(self)

    @dataclass
    class Ticket:
        policy: Recorder

        async def settle(self, call: Call, usage: Usage | None) -> None:
            self.policy.log.append((self.policy.name, "settle", usage))
            if usage is not None:
                call.usage_extra[self.policy.name] = usage.total_tokens


@dataclass
class Gw:
    client: httpx.AsyncClient
    dispatcher: ReplayDispatcher
    log: list[tuple[str, str, Any]]
    policies: list[Recorder]


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gw]:
    log: list[tuple[str, str, Any]] = []
    policies = [Recorder("a", log), Recorder("b", log)]
    telemetry = Telemetry(service_name="policy-test", store=None, otlp_endpoint=None)
    dispatcher = ReplayDispatcher()
    deps = GatewayDeps(StaticCatalog(), dispatcher, lambda: {}, telemetry, policies=policies)
    transport = httpx.ASGITransport(app=create_app(deps))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        yield Gw(client, dispatcher, log, policies)
    telemetry.shutdown()


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": CHAT, "messages": [{"role": "user", "content": "hello there"}], **extra}


async def test_a_plain_call_is_admitted_in_order_and_settled_with_its_usage(gw: Gw) -> None:
    r = await gw.client.post("/v1/chat/completions", json=chat(max_tokens=20))
    assert r.status_code == 200, r.text
    assert [(name, step) for name, step, _ in gw.log] == [
        ("a", "admit"),
        ("b", "admit"),
        ("b", "settle"),
        ("a", "settle"),
    ]
    reserved = gw.log[0][2]
    assert reserved > 20  # the prompt's estimate plus max_tokens
    usage = gw.log[-1][2]
    assert isinstance(usage, Usage) and (usage.prompt_tokens, usage.completion_tokens) == (9, 2)
    assert usage.engine_s == pytest.approx(0.04)  # the replica's engine_ms (no compute_ms)
    call = gw.policies[0].seen[0]
    assert (call.principal.scope, call.deployment, call.operation) == ("admin", CHAT, "chat")
    assert r.headers["x-a"] == r.headers["x-b"] == "admitted"
    assert r.json()["usage"]["a"] == 11 and r.json()["usage"]["b"] == 11


async def test_a_stream_is_settled_when_its_usage_arrives(gw: Gw) -> None:
    body = chat(stream=True, stream_options={"include_usage": True})
    r = await gw.client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.headers["x-a"] == "admitted"
    usage = [e for e in events_of(r.text) if e.startswith("{") and '"choices":[]' in e]
    assert usage and '"a":' in usage[0] and '"start_ns"' not in usage[0]  # the replica's extension
    settled = [u for name, step, u in gw.log if step == "settle"]
    assert len(settled) == 2 and all(isinstance(u, Usage) and u.completion_tokens > 0 for u in settled)


async def test_a_refusal_releases_the_tickets_taken_before_it_and_dispatches_nothing(gw: Gw) -> None:
    gw.policies[1].refuse = True
    r = await gw.client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 429 and r.headers["retry-after"] == "7"
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert gw.log == [("a", "admit", gw.log[0][2]), ("a", "settle", None)]
    assert gw.dispatcher.sent == []


@pytest.mark.parametrize("stream", [False, True])
async def test_a_failed_call_settles_with_nothing(gw: Gw, stream: bool) -> None:
    gw.dispatcher.error = EngineCrashedError("the replica died")
    r = await gw.client.post("/v1/chat/completions", json=chat(stream=stream))
    assert r.status_code == 502
    assert [(n, s, u) for n, s, u in gw.log if s == "settle"] == [
        ("b", "settle", None),
        ("a", "settle", None),
    ]


async def test_an_embedding_call_reserves_no_completion_tokens(gw: Gw) -> None:
    r = await gw.client.post("/v1/embeddings", json={"model": EMBED, "input": ["a b c"]})
    assert r.status_code == 200
    call = gw.policies[0].seen[0]
    assert call.completion_tokens == 0 and call.prompt_tokens > 0 and call.operation == "embeddings"


def test_principals_default_to_no_limits() -> None:
    user = Principal(key_id="k", name="n", scope="user")
    assert not user.is_admin and user.models is None and user.rpm is None


async def test_closing_releases_each_policy_that_holds_something_even_when_one_fails() -> None:
    closed: list[str] = []

    class Holding:
        def __init__(self, name: str, fail: bool = False) -> None:
            self.name, self.fail = name, fail

        async def admit(self, call: Call) -> None:
            return None

        async def aclose(self) -> None:
            if self.fail:
                raise OSError("the pool is gone")
            closed.append(self.name)

    log: list[tuple[str, str, Any]] = []
    await close_policies([Holding("a", fail=True), Recorder("plain", log), Holding("b")])
    assert closed == ["b"]


async def test_each_policys_admission_is_an_application_span_under_the_admission(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'lamina.db'}")
    store.migrate()
    log: list[tuple[str, str, Any]] = []
    limits, guards = Recorder("a", log), Recorder("b", log)
    limits.step, guards.step = "limits", "guards"  # type: ignore[attr-defined]
    telemetry = Telemetry(service_name="policy-test", store=store, sampling=SamplingPolicy(per_s=1e6))
    deps = GatewayDeps(StaticCatalog(), ReplayDispatcher(), lambda: {}, telemetry, policies=[limits, guards])
    transport = httpx.ASGITransport(app=create_app(deps))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        r = await client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200, r.text
    assert telemetry.force_flush()
    spans = {s["name"]: s for s in read_trace(store, r.headers["x-lamina-trace-id"])}
    admission = spans["admission"]
    for step in ("limits", "guards"):
        assert spans[step]["parent_span_id"] == admission["span_id"] and spans[step]["layer"] == "application"
        assert (
            admission["start_ns"] <= spans[step]["start_ns"] <= spans[step]["end_ns"] <= admission["end_ns"]
        )
    assert spans["limits"]["end_ns"] <= spans["guards"]["start_ns"]  # in the policies' order
    telemetry.shutdown()
    store.close()
