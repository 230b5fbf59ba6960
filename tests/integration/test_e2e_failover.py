"""A crashing replica never loses a non-streaming request, and never takes the gateway down."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import RunningStack, start_stack, stop_stack

pytestmark = pytest.mark.slow

CONFIG = """
register_bundled: false
orchestration:
  health_interval_s: 0.2
  restart_backoff_s: 0.1
  retry_deadline_s: 60
deployments:
  - name: echo
    engine: fake
    replicas: {replicas}
    fake:
      mode: echo
      seconds_per_token: 0.01
"""


@pytest.fixture(params=[2, 1], ids=["two-replicas", "one-replica"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningStack]:
    running = start_stack(tmp_path, CONFIG.format(replicas=request.param), timeout_s=90)
    yield running
    assert stop_stack(running) == []


def _ask(base: str, i: int) -> str:
    r = httpx.post(
        f"{base}/v1/chat/completions",
        json={"model": "echo", "messages": [{"role": "user", "content": f"request number {i}"}]},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def test_sigkill_during_a_stream_of_requests_loses_none(stack: RunningStack) -> None:
    victims = stack.workers_of("echo")
    assert victims, stack.log()
    total, done = 60, threading.Semaphore(0)

    def ask(i: int) -> str:
        try:
            return _ask(stack.base_url, i)
        finally:
            done.release()

    with cf.ThreadPoolExecutor(max_workers=6) as pool:
        futures = [pool.submit(ask, i) for i in range(total)]
        for _ in range(15):
            done.acquire()
        victims[0].kill()  # SIGKILL, mid-stream of requests
        answers = [f.result() for f in futures]

    assert answers == [f"request number {i}" for i in range(total)]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and victims[0].pid in [w.pid for w in stack.workers_of("echo")]:
        time.sleep(0.2)
    assert victims[0].pid not in [w.pid for w in stack.workers_of("echo")]
    assert httpx.get(f"{stack.base_url}/healthz").status_code == 200
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and httpx.get(f"{stack.base_url}/readyz").status_code != 200:
        time.sleep(0.2)
    assert httpx.get(f"{stack.base_url}/readyz").status_code == 200, "the killed replica was not restarted"
