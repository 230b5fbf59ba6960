"""Traces, replay and the doctor on one real stack in this process (uvicorn on 127.0.0.1).

The stack: a fake-engine chat deployment (echo, a real replica worker process, one engine thread so
concurrent calls queue), a dataset ingested with the bundled MiniLM and a RAG alias over it, every trace
kept and every request kept for replay. Two knobs put a layer under strain without restarting it: the
retriever is wrapped with an injected delay (data) and a test policy sleeps at admission like a heavy
input guard (application); more concurrent clients than the one engine thread takes saturate the replica
(models/orchestration). The commands run through Typer's runner against the same state directory.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import update
from typer.testing import CliRunner

from lamina.application import Call, read_replay
from lamina.cli._app import app as cli
from lamina.config import load_config
from lamina.data import Retrieval, Scalar, SearchMode
from lamina.errors import NotFoundError
from lamina.stack._doctor import _deployments, _weights
from lamina.stack.gateway import Stack, build_stack, create_gateway
from lamina.store import replay_requests

CONFIG = """
register_bundled: true
demo: {enabled: false}
deployments:
  - {name: chat, engine: fake, fake: {mode: echo, seconds_per_token: 0.02}}
rag:
  - {name: kb, model: chat, dataset: docs, k: 2}
orchestration: {ready_timeout_s: 60, health_interval_s: 0.2}
observability: {keep_requests: true, sampled_per_s: 10000, slow_ms: 600000}
"""
DOCS = {
    "bread.md": "Sourdough bread rises slowly because wild yeast ferments the dough overnight.",
    "tea.md": "Green tea should steep for two minutes in water just below boiling.",
    "drums.md": "A drum kit has a snare, a bass drum, toms and cymbals played with sticks.",
}
QUESTION = "How long should green tea steep in hot water before drinking it"


class SlowRetriever:
    """The stack's retriever behind an injected delay (seconds, changed by the tests)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.delay_s = 0.0

    async def retrieve(
        self,
        ref: str,
        query: str,
        *,
        k: int = 10,
        mode: SearchMode = "hybrid",
        filters: Mapping[str, Scalar] | None = None,
    ) -> Retrieval:
        await asyncio.sleep(self.delay_s)
        result: Retrieval = await self.inner.retrieve(ref, query, k=k, mode=mode, filters=filters)
        return result

    def warm(self, refs: list[str]) -> None:
        self.inner.warm(refs)


class SlowGuard:
    """A policy that takes ``delay_s`` to admit a call, like a heavy input guard."""

    def __init__(self) -> None:
        self.delay_s = 0.0

    async def admit(self, call: Call) -> None:
        await asyncio.sleep(self.delay_s)


@dataclass
class Env:
    url: str
    stack: Stack
    retriever: SlowRetriever
    guard: SlowGuard
    args: list[str]

    def flush(self) -> None:
        assert self.stack.telemetry.force_flush()

    def cli(self, *argv: str) -> Any:
        result = CliRunner().invoke(cli, [*argv, *self.args])
        assert result.exit_code == 0, result.output
        return result


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("observe")
    (tmp / "docs").mkdir()
    for name, text in DOCS.items():
        (tmp / "docs" / name).write_text(text + "\n")
    (tmp / "lamina.yaml").write_text(CONFIG)
    stack = build_stack(load_config(tmp / "lamina.yaml"), tmp / "state")
    stack.data.pipeline().ingest([str(tmp / "docs")], "docs")
    retriever, guard = SlowRetriever(stack.retriever), SlowGuard()
    stack.retriever = retriever  # type: ignore[assignment]  # the same port, with a delay
    stack.extra_policies.append(guard)
    app = create_gateway(stack)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 90
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    while httpx.get(f"{url}/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the chat replica never became ready"
        time.sleep(0.1)
    yield Env(
        url,
        stack,
        retriever,
        guard,
        ["--state-dir", str(tmp / "state"), "--config", str(tmp / "lamina.yaml")],
    )
    server.should_exit = True
    thread.join(30)


def chat(env: Env, model: str = "chat", content: str = QUESTION, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "seed": 11, **extra}
    response = httpx.post(f"{env.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response


def kept(env: Env, trace_id: str) -> Any:
    deadline = time.monotonic() + 10
    while True:  # the recorder's writer thread inserts within milliseconds
        try:
            return read_replay(env.stack.store, trace_id)
        except NotFoundError:
            assert time.monotonic() < deadline, f"trace {trace_id} was never kept for replay"
            time.sleep(0.05)


def test_traces_and_one_trace_from_the_cli_and_the_admin_api(env: Env) -> None:
    ids = [chat(env, max_tokens=3).headers["x-lamina-trace-id"] for _ in range(2)]
    env.flush()
    listed = json.loads(env.cli("traces", "--since", "10m", "--json").output)
    assert set(ids) <= {t["trace_id"] for t in listed["traces"]}
    over_http = httpx.get(f"{env.url}/admin/v1/traces", params={"since": "10m"}).json()
    assert [t["trace_id"] for t in over_http["traces"]][:2] == [t["trace_id"] for t in listed["traces"]][:2]
    line = next(t for t in listed["traces"] if t["trace_id"] == ids[-1])
    assert (line["route"], line["model"], line["status"]) == ("/v1/chat/completions", "chat", 200)
    assert line["bottleneck"] in line["layers_ms"]

    one = json.loads(env.cli("trace", ids[-1], "--json").output)
    names = [(s["name"], s["depth"]) for s in one["spans"]]
    assert names[0] == ("POST /v1/chat/completions", 0)
    assert ("dispatch", 1) in names and any(n == "engine" and d >= 2 for n, d in names)
    assert one == httpx.get(f"{env.url}/admin/v1/traces/{ids[-1]}").json()
    waterfall = env.cli("trace", ids[-1]).output
    assert "dispatch" in waterfall and "█" in waterfall and "bottleneck:" in waterfall

    # the same through a gateway (--url), for a stack whose store this machine cannot open
    asked = json.loads(env.cli("traces", "--since", "10m", "--url", env.url, "--json").output)
    assert [t for t in asked["traces"] if t["trace_id"] in ids] == [
        t for t in listed["traces"] if t["trace_id"] in ids
    ]
    assert ids[-1] in env.cli("traces", "--since", "10m", "--url", env.url).output
    assert json.loads(env.cli("trace", ids[-1], "--url", env.url, "--json").output) == one
    assert env.cli("trace", ids[-1], "--url", env.url).output == waterfall
    gone = CliRunner().invoke(cli, ["trace", "0" * 32, "--url", env.url, *env.args])
    assert gone.exit_code != 0 and "no stored trace" in gone.output

    missing = httpx.get(f"{env.url}/admin/v1/traces/{'0' * 32}")
    assert missing.status_code == 404 and "lamina traces" not in missing.json()["error"]["message"]
    assert httpx.get(f"{env.url}/admin/v1/traces/nope").status_code == 400
    assert httpx.get(f"{env.url}/admin/v1/traces", params={"since": "soon"}).status_code == 400


def test_a_rag_alias_is_listed_with_the_models(env: Env) -> None:
    """Clients that pick a model from GET /v1/models (Open WebUI, an SDK's models.list()) find the alias;
    its card is its model's, less what an alias cannot do (it answers chat completions only)."""
    cards = {c["id"]: c for c in httpx.get(f"{env.url}/v1/models").json()["data"]}
    assert set(cards) == {"chat", "kb"}
    assert cards["kb"]["version"] == cards["chat"]["version"] and cards["kb"]["ready"] is True
    assert "completion" in cards["chat"]["capabilities"]
    assert "chat" in cards["kb"]["capabilities"] and "completion" not in cards["kb"]["capabilities"]
    assert httpx.get(f"{env.url}/v1/models/kb").json() == cards["kb"]  # `created` stays what it was
    unknown = httpx.post(
        f"{env.url}/v1/chat/completions", json={"model": "kd", "messages": [{"role": "user", "content": "x"}]}
    )
    assert unknown.status_code == 404 and "available models: chat, kb" in unknown.json()["error"]["message"]


def test_a_rag_request_replays_pinned_to_its_dataset_version_and_shows_a_changed_answer(env: Env) -> None:
    original = chat(env, model="kb", max_tokens=6)
    trace_id = original.headers["x-lamina-trace-id"]
    citations = original.json()["citations"]
    record = kept(env, trace_id)
    assert record.body["rag"]["dataset"] == f"docs@{citations[0]['dataset_version']}"
    assert record.body["messages"] == [{"role": "user", "content": QUESTION}]  # the passages taken out
    env.flush()

    report = json.loads(env.cli("replay", trace_id, "--url", env.url, "--json").output)
    assert report["pinned"]["model"] == "chat" and report["pinned"]["seed"] == 11
    assert report["pinned"]["dataset_version"] == citations[0]["dataset_version"]
    assert report["answer"]["same"] is True and report["answer"]["diff"] == ""
    assert report["citations"]["same"] is True
    assert report["citations"]["replay"] == [c["chunk_id"] for c in citations]
    assert report["replay_trace_id"] not in (None, trace_id)
    assert report["layers_ms"]["original"]["data"] > 0

    with env.stack.store.begin() as conn:  # as if the model had answered otherwise back then
        changed = {**record.answer, "text": "Steep it for ten minutes."}
        conn.execute(
            update(replay_requests).where(replay_requests.c.trace_id == trace_id).values(answer=changed)
        )
    shown = env.cli("replay", trace_id, "--url", env.url).output
    assert "differs" in shown and "-Steep it for ten minutes." in shown and "citations: the same" in shown

    with env.stack.store.begin() as conn:  # a model version the catalog no longer routes: its deployment
        versions = {**record.versions, "model_version": "chat-model@9"}
        conn.execute(
            update(replay_requests).where(replay_requests.c.trace_id == trace_id).values(versions=versions)
        )
    again = json.loads(env.cli("replay", trace_id, "--url", env.url, "--json").output)
    assert again["pinned"]["model"] == "chat" and again["pinned"]["model_version"] == "chat-model@9"
    assert again["version_pinned"] is False and report["version_pinned"] is True
    assert again["citations"]["same"] is True


def _begin() -> str:
    """The start of a state as an ISO moment (the doctor's window reaches back to it, and no further:
    every earlier state's requests started before it)."""
    return datetime.now(UTC).isoformat()


def _doctor_since(env: Env, started: str) -> dict[str, Any]:
    env.flush()
    response = httpx.get(f"{env.url}/admin/v1/doctor", params={"window": started}, timeout=30)
    assert response.status_code == 200, response.text
    verdict: dict[str, Any] = response.json()
    return verdict


async def _concurrently(env: Env, clients: int) -> None:
    async with httpx.AsyncClient(base_url=env.url, timeout=60) as client:
        body = {"model": "chat", "messages": [{"role": "user", "content": QUESTION}]}
        answers = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=body) for _ in range(clients))
        )
    assert all(a.status_code == 200 for a in answers)


def test_the_doctor_names_the_layer_under_strain(env: Env) -> None:
    # 1. one replica, one engine thread, eight clients at once: calls queue for the replica
    started = _begin()
    asyncio.run(_concurrently(env, 8))
    verdict = _doctor_since(env, started)
    assert verdict["bottleneck"] in ("models", "orchestration"), verdict
    assert any("queue wait p95" in e for e in verdict["evidence"]), verdict["evidence"]
    assert any("add a replica to chat" in a or "CPU is saturated" in a for a in verdict["actions"])

    # 2. a slow vector store
    env.retriever.delay_s = 0.4
    started = _begin()
    for _ in range(3):
        chat(env, model="kb", max_tokens=1)
    env.retriever.delay_s = 0.0
    verdict = _doctor_since(env, started)
    assert verdict["bottleneck"] == "data", verdict
    assert verdict["requests"] == 3 and any("retrieval p95" in e for e in verdict["evidence"])

    # 3. heavy guardrails
    env.guard.delay_s = 0.4
    started = _begin()
    for _ in range(3):
        chat(env, max_tokens=1)
    env.guard.delay_s = 0.0
    verdict = _doctor_since(env, started)
    assert verdict["bottleneck"] == "application", verdict
    shown = json.loads(env.cli("doctor", "--window", started, "--url", env.url, "--json").output)
    assert shown["bottleneck"] == "application" and shown["source"].startswith("the gateway at")
    offline = json.loads(env.cli("doctor", "--window", started, "--offline", "--json").output)
    assert offline["bottleneck"] == "application" and offline["source"].startswith("the store alone"), offline
    printed = env.cli("doctor", "--window", started, "--url", env.url).output
    assert printed.count("bottleneck: application") == 1, printed
    assert f"since {started}" in printed.replace("\n", ""), printed


def test_the_doctor_knows_what_each_deployment_serves(env: Env) -> None:
    (chat_state,) = [d for d in _deployments(env.stack) if d.name == "chat"]
    assert chat_state.model is None and chat_state.weights is None  # the fake engine takes no file
    assert chat_state.slots == 1  # and runs one request at a time
    # a GGUF version's weight type, as the registry read it from the file (the bundled SmolLM2's: Q4_1)
    assert _weights(env.stack, "smollm2-135m-instruct") == "MOSTLY_Q4_1"
