"""The fault test: SIGKILL one of two replicas under steady load; no request fails, and the replica count
is restored (the time it took is printed: `pytest -s` shows it). And a prompt that crashes the engine is
failed with a clear error after it took down two replicas, instead of being replayed on every one.

One stack serves both tests: it runs in this process (gateway app, control loop, dispatcher), its two
replicas as real worker processes over real HTTP, and the clients reach the gateway app in process. Its
engine is the fake engine (10 ms per token) behind a test plugin that kills the process when a prompt
holds a marker, as a native crash in an engine would.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import psutil
import pytest

from lamina.config import DeploymentConfig, LaminaConfig, OrchestrationConfig
from lamina.stack.gateway import Stack, build_stack, create_gateway

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

CLIENTS = 6
#: bound on a replica start on a busy machine
READY_WAIT_S = 90.0

#: what makes the crashy engine's process die
MARKER = "please crash now"
#: an engine plugin (installed as a distribution would be) that is the fake engine, except that a prompt
#: holding MARKER kills its process at once, as a native crash in an engine would
CRASHY_PLUGIN = f"""
import dataclasses
import os

from lamina.models import engine_descriptor

MARKER = {MARKER!r}
FAKE = engine_descriptor("fake")


class CrashOnMarker:
    def __init__(self, spec):
        self._fake = FAKE.factory(spec)

    def __getattr__(self, name):
        return getattr(self._fake, name)

    def chat(self, messages, params):
        if any(MARKER in m.content for m in messages):
            os._exit(13)
        return self._fake.chat(messages, params)

    def complete(self, prompt, params):
        if MARKER in prompt:
            os._exit(13)
        return self._fake.complete(prompt, params)


DESCRIPTOR = dataclasses.replace(
    FAKE, name="crashy", description="the fake engine, dying on a marker", factory=CrashOnMarker
)
"""


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def crashy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The crashy engine on the path of this process and of the replica workers."""
    site = tmp_path_factory.mktemp("site")
    (site / "lamina_crashy_engine").mkdir(parents=True)
    (site / "lamina_crashy_engine" / "__init__.py").write_text(CRASHY_PLUGIN)
    info = site / "lamina_crashy_engine-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lamina-crashy-engine\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[lamina.engines]\ncrashy = lamina_crashy_engine:DESCRIPTOR\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(site))
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
        yield


def _config(engine: str) -> LaminaConfig:
    deployment = {"name": "chat", "engine": engine, "replicas": 2, engine: {"seconds_per_token": 0.01}}
    return LaminaConfig(
        register_bundled=False,
        deployments=[DeploymentConfig.model_validate(deployment)],
        orchestration=OrchestrationConfig(
            ready_timeout_s=READY_WAIT_S, health_interval_s=0.2, restart_backoff_s=0.1, retry_deadline_s=60
        ),
    )


@pytest.fixture(scope="module")
async def serving(
    crashy: None, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Stack, httpx.AsyncClient]]:
    """The stack, started, and a client of its gateway; every replica stopped afterwards."""
    stack = build_stack(_config("crashy"), tmp_path_factory.mktemp("state"))
    app = create_gateway(stack)
    async with app.router.lifespan_context(app):
        assert await stack.controller.wait_ready(READY_WAIT_S), stack.controller.status()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=90) as client:
            yield stack, client
    assert psutil.Process().children(recursive=True) == [], "the stack left replica processes behind"


def _chat(text: str) -> dict[str, Any]:
    return {"model": "chat", "messages": [{"role": "user", "content": text}]}


async def test_sigkill_of_one_of_two_replicas_under_load_fails_no_request(
    serving: tuple[Stack, httpx.AsyncClient],
) -> None:
    stack, client = serving
    assert await stack.controller.wait_ready(READY_WAIT_S), stack.controller.status()
    answers: list[tuple[str, int, str]] = []
    stop = asyncio.Event()

    async def steady_client(c: int) -> None:
        i = 0
        while not stop.is_set():
            text = f"client {c} asks question number {i} of the fault test"
            r = await client.post("/v1/chat/completions", json=_chat(text))
            content = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text
            answers.append((text, r.status_code, content))
            i += 1

    clients = [asyncio.create_task(steady_client(c)) for c in range(CLIENTS)]
    await asyncio.sleep(1.5)  # steady load on both replicas
    victim = stack.controller.ready_replicas("chat")[0]
    assert victim.pid is not None
    in_flight = stack.dispatcher.in_flight().get(victim.replica_id, 0)
    answered_before = len(answers)
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    while True:
        ready = stack.controller.ready_replicas("chat")
        if len(ready) == 2 and victim.pid not in {r.pid for r in ready}:
            break
        assert time.monotonic() - killed_at < READY_WAIT_S, stack.controller.status()
        await stack.controller.wait_for_change(0.1)
    restore_s = time.monotonic() - killed_at
    await asyncio.sleep(1.0)  # and on the restored pair
    stop.set()
    await asyncio.gather(*clients)

    failed = [(text, status, body) for text, status, body in answers if status != 200 or body != text]
    summary = (
        f"replica {victim.replica_id} (pid {victim.pid}) SIGKILLed with {in_flight} request(s) in flight; "
        f"replica count back to 2 after {restore_s:.2f} s; {len(answers)} requests from {CLIENTS} clients, "
        f"{len(failed)} failed"
    )
    print(f"\nfault test: {summary}")
    assert failed == [], summary
    assert in_flight >= 1, f"the kill must hit requests in flight: {summary}"
    assert answered_before >= CLIENTS and len(answers) > answered_before + CLIENTS, summary
    assert restore_s < 30, summary


async def test_a_prompt_that_crashes_the_engine_fails_after_two_replicas(
    serving: tuple[Stack, httpx.AsyncClient],
) -> None:
    stack, client = serving
    assert await stack.controller.wait_ready(READY_WAIT_S), stack.controller.status()
    pids = {r.replica_id: r.pid for r in stack.controller.ready_replicas("chat")}
    r = await client.post("/v1/chat/completions", json=_chat(f"hello, {MARKER}"))
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "poison_request" and error["type"] == "invalid_request_error"
    assert sorted(error["details"]["replicas"]) == ["chat-0", "chat-1"]
    assert "crashed 2 replicas of 'chat'" in error["message"]
    assert "not retried further" in error["message"]
    restarted = {r.replica_id: r.pid for d in stack.controller.status() for r in d.replicas}
    assert all(restarted[rid] != pid for rid, pid in pids.items())
    # the gateway lives on; other prompts are served once the replicas are back
    r = await client.post("/v1/chat/completions", json=_chat("an ordinary question"))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "an ordinary question"
