"""Model groups on a real `lamina up`: fake-engine replicas and a remote (openai engine) deployment as real
processes. A replica killed mid-stream is continued by the fallback; a 5xx falls back; weighted routing
spreads by weight; least_busy avoids the member that is busy."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support import RunningStack, free_port, start_stack, stop_stack
from tests.support.openai_upstream import RunningUpstream, start_upstream, stop

pytestmark = pytest.mark.slow

KEY_VAR = "LAMINA_TEST_FALLBACK_UPSTREAM_KEY"
KEY = "sk-fallback-upstream"

CONFIG = """
register_bundled: false
orchestration:
  health_interval_s: 0.2
  restart_backoff_s: 0.1
deployments:
  - {{name: a, engine: fake, fake: {{mode: echo, seconds_per_token: 0.01}}}}
  - {{name: b, engine: fake, fake: {{mode: echo, seconds_per_token: 0.01}}}}
  - {{name: victim, engine: fake, fake: {{mode: echo, seconds_per_token: 0.05}}}}
  - {{name: c, engine: fake, fake: {{mode: echo}}}}
  - name: remote
    engine: openai
    openai: {{base_url: "{base_url}", model: up-model, api_key_env: {key_var}}}
groups:
  - name: busy
    members: [{{deployment: a}}, {{deployment: b}}]
    strategy: least_busy
    retries: 0
  - name: spread
    members: [{{deployment: a, weight: 3}}, {{deployment: b, weight: 1}}]
    strategy: weighted
  - name: resilient
    members: [{{deployment: victim}}]
    retries: 0
    fallbacks: [c]
  - name: guarded
    members: [{{deployment: remote}}]
    retries: 0
    fallbacks: [c]
"""


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningUpstream]:
    running = start_upstream(free_port(), KEY, tmp_path_factory.mktemp("upstream") / "upstream.log")
    yield running
    stop([running.proc])


@pytest.fixture(scope="module")
def stack(upstream: RunningUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    os.environ[KEY_VAR] = KEY  # `lamina up` passes its environment on to the replicas
    try:
        config = CONFIG.format(base_url=upstream.base_url, key_var=KEY_VAR)
        running = start_stack(tmp_path_factory.mktemp("stack"), config, timeout_s=120)
    finally:
        del os.environ[KEY_VAR]
    yield running
    assert stop_stack(running) == []


def chat(model: str, content: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def post(stack: RunningStack, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=60)


class Streamed:
    """A streamed answer read event by event: its text, its error events, the models of its chunks."""

    def __init__(self) -> None:
        self.text = ""
        self.errors: list[dict[str, Any]] = []
        self.models: list[str] = []
        self.done = False
        self.started = threading.Event()

    def read(self, response: httpx.Response) -> None:
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                self.done = True
                continue
            event = json.loads(line[6:])
            if "error" in event:
                self.errors.append(event["error"])
                continue
            self.models.append(event.get("model", ""))
            for choice in event.get("choices", []):
                self.text += choice.get("delta", {}).get("content") or ""
            if len(self.text.split()) >= 3:
                self.started.set()


def stream(stack: RunningStack, body: dict[str, Any], out: Streamed) -> httpx.Response:
    with httpx.stream(
        "POST", f"{stack.base_url}/v1/chat/completions", json={**body, "stream": True}, timeout=60
    ) as response:
        out.read(response)
        return response


def test_groups_are_listed_with_the_deployments(stack: RunningStack) -> None:
    models = {m["id"]: m for m in httpx.get(f"{stack.base_url}/v1/models").json()["data"]}
    assert {"busy", "spread", "resilient", "guarded", "a", "c"} <= set(models)
    assert models["busy"]["ready"] and "streaming" in models["busy"]["capabilities"]


def test_a_plain_call_falls_back_on_a_5xx(stack: RunningStack, upstream: RunningUpstream) -> None:
    upstream.reset()
    r = post(stack, chat("guarded", "!status 500 and then some"))
    assert r.status_code == 200, r.text
    assert r.headers["x-lamina-model"] == "c" and r.json()["model"] == "c"
    assert r.json()["choices"][0]["message"]["content"] == "!status 500 and then some"
    assert len(upstream.stats()["seen"]) == 1  # the remote member was tried first, and failed


def test_an_engine_killed_mid_stream_is_continued_by_the_fallback(stack: RunningStack) -> None:
    words = " ".join(f"word{i}" for i in range(40))  # 2 s at 0.05 s per token
    out = Streamed()
    with cf.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(stream, stack, chat("resilient", words), out)
        assert out.started.wait(30), "the stream did not start"
        victims = stack.workers_of("victim")
        assert victims, stack.log()
        for v in victims:
            v.kill()  # SIGKILL, mid-stream
        response = answer.result(timeout=60)
    assert response.status_code == 200
    assert out.errors == [] and out.done
    assert out.text == words  # complete: what the victim sent, then the rest from c
    assert out.models[0] == "victim" and out.models[-1] == "c"


def test_a_replica_error_event_mid_stream_is_continued_or_ends_cleanly(stack: RunningStack) -> None:
    # the upstream streams "echo", ":" and then an error event; c echoes the user's message
    same, other = Streamed(), Streamed()
    stream(stack, chat("guarded", "echo: !midfail"), same)
    assert (same.text, same.errors, same.done) == ("echo: !midfail", [], True)
    stream(stack, chat("guarded", "!midfail"), other)
    assert other.text == "echo:" and other.done  # what the upstream sent before failing, nothing more
    assert [e["code"] for e in other.errors] == ["engine_crashed"]
    assert "answered differently" in other.errors[0]["message"]


def test_weighted_routing_spreads_by_weight(stack: RunningStack) -> None:
    with cf.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: post(stack, chat("spread", f"hi {i}")), range(80)))
    assert all(r.status_code == 200 for r in answers)
    served = Counter(r.headers["x-lamina-model"] for r in answers)
    # 3:1 over 80 calls: a serves 60 on average, 45..75 holds with probability above 0.9999
    assert 45 <= served["a"] <= 75 and served["a"] + served["b"] == 80, served


def test_least_busy_avoids_the_busy_member(stack: RunningStack) -> None:
    long = " ".join(f"w{i}" for i in range(200))  # 2 s on a at 0.01 s per token
    out = Streamed()
    with cf.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(stream, stack, chat("busy", long), out)
        assert out.started.wait(30)
        served = [post(stack, chat("busy", "quick one")).headers["x-lamina-model"] for _ in range(5)]
        still_streaming = not answer.done()
        answer.result(timeout=60)
    assert out.models[0] == "a" and still_streaming
    assert served == ["b"] * 5
    time.sleep(0.1)
    assert post(stack, chat("busy", "idle now")).headers["x-lamina-model"] == "a"  # ties: declared order
