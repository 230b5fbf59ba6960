"""Rollouts on one real `lamina up` (fake-engine replicas, real HTTP): a rolling rollout under traffic
loses no request and ends with every replica on the new version; a 50 % canary splits the traffic and
is rolled back by command; after a restart the finished rollouts serve and a canary in progress runs
again. The versions differ in what they answer (replay of "v1", "v2", "v3")."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psutil
import pytest
from typer.testing import CliRunner

from lamina.cli import app
from tests.support.processes import RunningStack, start_stack, stop_stack

CONFIG = """
register_bundled: false
deployments:
  - name: base
    engine: fake
    fake: {mode: replay, tokens: [c1]}
orchestration:
  health_interval_s: 0.2
  ready_timeout_s: 60
"""


def replay(word: str) -> str:
    return json.dumps({"fake": {"mode": "replay", "tokens": [word]}})


@pytest.fixture(scope="module")
def stacks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RunningStack]]:
    """The one stack (a list: the restart test replaces it, with the same state directory)."""
    running = [start_stack(tmp_path_factory.mktemp("rollouts"), CONFIG)]
    try:
        yield running
    finally:
        stop_stack(running[-1])


@pytest.fixture
def stack(stacks: list[RunningStack]) -> RunningStack:
    return stacks[-1]


def cli(stack: RunningStack, *args: str) -> Any:
    result = CliRunner().invoke(app, [*args, "--url", stack.base_url, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def described(stack: RunningStack, name: str = "echo") -> dict[str, Any]:
    data = httpx.get(f"{stack.base_url}/admin/v1/deployments", timeout=10).json()["data"]
    return next(d for d in data if d["name"] == name)


def wait_for(cond: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def answer(stack: RunningStack, model: str = "echo") -> tuple[int, str]:
    body = {"model": model, "messages": [{"role": "user", "content": "which version?"}]}
    reply = httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=60)
    text = reply.json()["choices"][0]["message"]["content"] if reply.status_code == 200 else reply.text
    return reply.status_code, text


def workers(stack: RunningStack) -> int:
    count = 0
    for child in psutil.Process(stack.proc.pid).children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "echo" in " ".join(child.cmdline()):
                count += 1
        except psutil.Error:
            continue
    return count


def test_rolling_rollout_under_traffic_loses_no_request(stack: RunningStack) -> None:
    cli(stack, "deploy", "echo@1", "--engine", "fake", "--replicas", "2", "--options", replay("v1"))
    wait_for(lambda: described(stack)["state"] == "ready", "two ready replicas of echo@1")
    answers: list[tuple[float, int, str]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            status, text = answer(stack)
            answers.append((time.monotonic(), status, text))

    thread = threading.Thread(target=client)
    thread.start()
    try:
        started = cli(stack, "rollout", "echo", "echo@2", "--options", replay("v2"))
        assert started["rollout"]["target"] == "echo@2" and started["rollout"]["phase"] == "rolling"
        wait_for(lambda: (described(stack)["rollout"] or {})["phase"] == "done", "the rollout to finish", 40)
        done_at = time.monotonic()
        wait_for(lambda: len([a for a in answers if a[0] > done_at]) >= 5, "answers after the rollout")
    finally:
        stop.set()
        thread.join()
    final = described(stack)
    assert final["versions"] == ["echo@2"] and final["model"] == "echo@2", final
    assert (final["ready"], final["desired"]) == (2, 2)
    assert [a for a in answers if a[1] != 200] == []  # no request failed during the rollout
    assert {a[2] for a in answers} <= {"v1", "v2"}
    assert {a[2] for a in answers if a[0] > done_at} == {"v2"}  # every replica serves the new version
    wait_for(lambda: workers(stack) == 2, "the old replicas to stop")


def test_canary_at_half_weight_is_rolled_back_by_command(stack: RunningStack) -> None:
    rollout = ("rollout", "echo", "echo@3", "--strategy", "canary", "--weight", "50", "--no-auto-rollback")
    started = cli(stack, *rollout, "--options", replay("v3"))
    assert started["rollout"]["phase"] == "canary" and started["rollout"]["weight"] == 50
    wait_for(lambda: described(stack)["ready"] == 3, "the canary replica beside the two stable ones")
    assert described(stack)["versions"] == ["echo@2", "echo@3"]
    texts = [answer(stack) for _ in range(40)]
    assert all(status == 200 for status, _ in texts)
    counts = {word: sum(1 for _, t in texts if t == word) for word in ("v2", "v3")}
    assert counts["v2"] + counts["v3"] == 40 and 15 <= counts["v3"] <= 25, counts
    back = cli(stack, "rollout", "echo", "--rollback")
    assert back["rollout"]["reason"] == "rolled back by command"
    wait_for(lambda: described(stack)["rollout"]["phase"] == "rolled_back", "the canary to be stopped")
    wait_for(lambda: described(stack)["versions"] == ["echo@2"], "only the stable version left")
    assert {answer(stack)[1] for _ in range(10)} == {"v2"}
    assert described(stack)["model"] == "echo@2"
    wait_for(lambda: workers(stack) == 2, "the canary's process to stop")
    refused = CliRunner().invoke(app, ["rollout", "echo", "--promote", "--url", stack.base_url])
    assert refused.exit_code == 2 and "only a running canary" in refused.output, refused.output
    same = CliRunner().invoke(app, ["rollout", "echo", "echo@2", "--url", stack.base_url])
    assert same.exit_code == 2 and "already runs echo@2" in same.output, same.output
    unknown = CliRunner().invoke(app, ["rollout", "nope", "x@2", "--url", stack.base_url])
    assert unknown.exit_code == 2 and "no deployment named 'nope'" in unknown.output


def test_a_slow_canary_is_rolled_back_automatically(stack: RunningStack) -> None:
    slow = {"fake": {"mode": "replay", "tokens": ["v4"], "seconds_per_token": 0.3}}
    body = {"model": "echo@4", "strategy": "canary", "weight": 50, "options": slow, "min_requests": 5}
    url = f"{stack.base_url}/admin/v1/deployments/echo/rollout"
    started = httpx.post(url, json={**body, "max_latency_ratio": 2.0, "window_s": 30}, timeout=30)
    assert started.status_code == 202, started.text
    wait_for(lambda: described(stack)["ready"] == 3, "the slow canary's replica")
    texts = []
    for _ in range(30):
        texts.append(answer(stack)[1])
        if (described(stack)["rollout"] or {})["phase"] != "canary":
            break
    assert "v4" in texts  # the canary did answer before it was judged
    wait_for(lambda: described(stack)["rollout"]["phase"] == "rolled_back", "the automatic rollback")
    reason = described(stack)["rollout"]["reason"]
    assert reason.startswith("automatic: canary p95 latency"), reason
    wait_for(lambda: described(stack)["versions"] == ["echo@2"], "the canary's replica to go")


def test_a_deployment_of_the_config_rolls_out_too(stack: RunningStack) -> None:
    assert answer(stack, "base") == (200, "c1")
    started = cli(stack, "rollout", "base", "base@2", "--options", replay("c2"))
    assert started["source"] == "config" and started["rollout"]["target"] == "base@2"
    wait_for(lambda: (described(stack, "base")["rollout"] or {})["phase"] == "done", "the rollout", 40)
    final = described(stack, "base")
    assert final["model"] == "base@2" and final["versions"] == ["base@2"], final
    assert {answer(stack, "base")[1] for _ in range(4)} == {"c2"}


def test_a_restart_serves_the_rolled_out_versions_and_runs_a_canary_again(
    stacks: list[RunningStack],
) -> None:
    old = stacks[-1]
    canary = ("rollout", "echo", "echo@5", "--strategy", "canary", "--weight", "50", "--no-auto-rollback")
    cli(old, *canary, "--options", replay("v5"))
    wait_for(lambda: described(old)["ready"] == 3, "the canary's replica")
    stop_stack(old)
    stacks.append(start_stack(old.state_dir.parent, CONFIG))
    stack = stacks[-1]
    # the finished rollout was stored, the rolled-back canaries were not, and the one in progress begins again
    assert described(stack)["model"] == "echo@2"
    wait_for(lambda: described(stack)["ready"] == 3, "the restored deployment, then its canary")
    rollout = described(stack)["rollout"]
    assert (rollout["target"], rollout["phase"], rollout["weight"]) == ("echo@5", "canary", 50), rollout
    assert described(stack)["versions"] == ["echo@2", "echo@5"]
    assert {answer(stack)[1] for _ in range(20)} == {"v2", "v5"}
    # the config's deployment too, while the config names the model it named at the rollout
    assert described(stack, "base")["model"] == "base@2"
    assert {answer(stack, "base")[1] for _ in range(4)} == {"c2"}
