"""Deployments made at run time, end to end on one real `lamina up` (fake-engine replicas, real HTTP).

`lamina deploy` adds a deployment to the running stack, clients call it at once, load scales it up and
back down, `lamina undeploy` drains it (an in-flight request finishes), and a restart restores what was
deployed. The CLI runs in this process against the stack's admin API over HTTP.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
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
    replicas: 1
    autoscale: {min_replicas: 1, max_replicas: 2, target_concurrency: 4}
orchestration:
  health_interval_s: 0.2
  ready_timeout_s: 60
"""

#: a word per token at 0.05 s: a 30-word prompt keeps a request in flight for 1.5 s
SLOW = {"fake": {"seconds_per_token": 0.05}}


@pytest.fixture(scope="module")
def stacks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RunningStack]]:
    """The one stack (a list: the restart test replaces it with the same state directory)."""
    tmp = tmp_path_factory.mktemp("runtime-deployments")
    running = [start_stack(tmp, CONFIG)]
    try:
        yield running
    finally:
        stop_stack(running[-1])


def cli(stack: RunningStack, *args: str) -> Any:
    result = CliRunner().invoke(app, [*args, "--url", stack.base_url, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def listed(stack: RunningStack) -> dict[str, dict[str, Any]]:
    data = httpx.get(f"{stack.base_url}/admin/v1/deployments", timeout=10).json()["data"]
    return {d["name"]: d for d in data}


def wait_for(cond: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def workers_of(stack: RunningStack, deployment: str) -> list[int]:
    """The pids of the replica processes of ``deployment`` that are running (not exited, not zombies)."""
    pids = []
    for child in psutil.Process(stack.proc.pid).children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and f"{deployment}.json" in " ".join(child.cmdline()):
                pids.append(child.pid)
        except psutil.Error:
            continue
    return pids


def chat(stack: RunningStack, model: str, words: int = 3) -> httpx.Response:
    text = " ".join(f"w{i}" for i in range(words))
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    return httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=60)


def test_deploy_at_run_time_then_call_it(stacks: list[RunningStack]) -> None:
    stack = stacks[-1]
    described = cli(
        stack, "deploy", "echo", "--engine", "fake", "--replicas", "1..2", "--target-concurrency", "1",
        "--options", json.dumps(SLOW), "--window", "1", "--upscale-delay", "0.3", "--downscale-delay", "1.5",
    )  # fmt: skip
    assert described["name"] == "echo" and described["source"] == "runtime"
    assert (described["min_replicas"], described["max_replicas"]) == (1, 2)
    wait_for(lambda: listed(stack)["echo"]["state"] == "ready", "the new deployment's replica")
    reply = chat(stack, "echo")
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == "w0 w1 w2"
    names = {d["name"]: d["source"] for d in cli(stack, "deployments")}
    assert names == {"base": "config", "echo": "runtime"}
    table = CliRunner().invoke(app, ["deployments", "--url", stack.base_url])
    assert table.exit_code == 0 and "echo" in table.output and "runtime" in table.output, table.output
    base = listed(stack)["base"]  # the config's own deployment, autoscaled by its `autoscale` block
    assert (base["min_replicas"], base["max_replicas"], base["target_concurrency"]) == (1, 2, 4)
    assert base["autoscaler"]["desired"] == 1 and base["autoscaler"]["reason"].startswith("steady")
    models = httpx.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"]
    assert "echo" in {m["id"] for m in models}


def test_refusals_say_what_to_change(stacks: list[RunningStack]) -> None:
    url = f"{stacks[-1].base_url}/admin/v1/deployments"
    taken = httpx.post(url, json={"model": "x", "name": "base", "engine": "fake"}, timeout=30)
    assert taken.status_code == 409 and "config file" in taken.json()["error"]["message"]
    again = httpx.post(url, json={"model": "echo", "engine": "fake"}, timeout=30)
    assert again.status_code == 409 and "undeploy" in again.json()["error"]["message"]
    bad_range = httpx.post(url, json={"model": "x", "engine": "fake", "replicas": "3..1"}, timeout=30)
    assert bad_range.status_code == 400 and "MAX must be at least" in bad_range.json()["error"]["message"]
    no_engine = httpx.post(url, json={"model": "x", "engine": "nope"}, timeout=30)
    assert no_engine.status_code == 400 and "nope" in no_engine.json()["error"]["message"]
    no_model = httpx.post(url, json={"model": "no-such-model@7"}, timeout=30)
    assert no_model.status_code == 404, no_model.text
    loose = httpx.post(url, json={"model": "x", "engine": "fake", "options": {"n_ctx": 512}}, timeout=30)
    assert loose.status_code == 400 and '{"gguf": {"n_ctx": 512}}' in loose.json()["error"]["message"]
    huge = httpx.post(url, json={"model": "x", "engine": "fake", "replicas": "1..100000"}, timeout=30)
    assert huge.status_code == 400 and "does not fit" in huge.json()["error"]["message"], huge.text
    assert set(listed(stacks[-1])) == {"base", "echo"}  # nothing of the refused ones was kept


def test_load_scales_it_up_and_back_down(stacks: list[RunningStack]) -> None:
    stack = stacks[-1]
    results: list[int] = []

    def one() -> None:
        results.append(chat(stack, "echo", words=30).status_code)

    threads = [threading.Thread(target=one) for _ in range(5)]
    for t in threads:
        t.start()
    wait_for(lambda: listed(stack)["echo"]["desired"] == 2, "the autoscaler to ask for 2 replicas", 20)
    up = listed(stack)["echo"]["autoscaler"]
    assert up["desired"] == 2 and up["load"] > 1 and up["reason"], up
    for t in threads:
        t.join()
    assert results == [200] * 5
    wait_for(lambda: listed(stack)["echo"]["ready"] == 2, "a second ready replica", 30)
    wait_for(lambda: listed(stack)["echo"]["desired"] == 1, "the autoscaler to scale back down", 30)
    down = listed(stack)["echo"]
    assert "scale down" in down["autoscaler"]["reason"] or "steady" in down["autoscaler"]["reason"]
    wait_for(lambda: len(workers_of(stack, "echo")) == 1, "the extra replica process to stop", 30)


def test_a_restart_restores_the_stored_deployment(
    stacks: list[RunningStack], tmp_path_factory: pytest.TempPathFactory
) -> None:
    old = stacks[-1]
    stop_stack(old)
    stacks.append(start_stack(old.state_dir.parent, CONFIG))
    stack = stacks[-1]
    restored = listed(stack)["echo"]
    assert restored["source"] == "runtime" and restored["max_replicas"] == 2
    wait_for(lambda: listed(stack)["echo"]["state"] == "ready", "the restored deployment's replica")
    assert chat(stack, "echo").status_code == 200


def test_scaled_to_zero_a_request_cold_starts_a_replica(stacks: list[RunningStack]) -> None:
    stack = stacks[-1]
    cli(
        stack,
        "deploy",
        "lazy",
        "--engine",
        "fake",
        "--replicas",
        "0..1",
        "--idle-delay",
        "1",
        "--window",
        "0",
    )
    wait_for(
        lambda: listed(stack)["lazy"]["state"] == "scaled_to_zero", "the idle deployment to scale to zero"
    )
    assert "scale" in listed(stack)["lazy"]["autoscaler"]["reason"]
    ready = httpx.get(f"{stack.base_url}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["deployments"]["lazy"] is True  # it serves: cold start
    reply = chat(stack, "lazy")  # waits for the replica it starts
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == "w0 w1 w2"
    cli(stack, "undeploy", "lazy")


def test_undeploy_drains_in_flight_requests(stacks: list[RunningStack]) -> None:
    stack = stacks[-1]
    answers: list[httpx.Response] = []
    slow = threading.Thread(target=lambda: answers.append(chat(stack, "echo", words=40)))
    slow.start()
    time.sleep(0.5)  # the request is on the replica now (2 s of tokens)
    done = cli(stack, "undeploy", "echo")
    slow.join()
    assert answers[0].status_code == 200, answers[0].text  # it finished although the deployment went away
    assert done["deleted"] is True and done["drained_s"] >= 0.5
    assert "echo" not in listed(stack)
    assert chat(stack, "echo").status_code == 404
    assert workers_of(stack, "echo") == []
    result = CliRunner().invoke(app, ["undeploy", "base", "--url", stack.base_url])
    assert result.exit_code == 2 and "config file" in result.output


def test_cli_without_a_stack_says_how_to_start_one(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["deployments", "--url", "http://127.0.0.1:9"])
    assert result.exit_code == 1 and "lamina up" in result.output
