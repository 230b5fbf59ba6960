"""The dispatcher against real replica processes: SIGKILL a replica mid-traffic and lose no request."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from lamina.errors import ModelNotFoundError, NoReadyReplicaError
from lamina.orchestration import (
    Controller,
    Dispatcher,
    DispatchResult,
    LocalProcessBackend,
    ReplicaState,
    WorkloadSpec,
)
from tests.support import FakeClock, echo_spec

PROCESS_WAIT_S = 30.0


@asynccontextmanager
async def _serving(
    tmp_path: Path, spec: WorkloadSpec, wait_ready: bool = True, **dispatcher_kw: Any
) -> AsyncIterator[tuple[Controller, Dispatcher]]:
    """A controller running its loop over ``spec``, and a dispatcher over it."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=5.0)) as http:
        backend = LocalProcessBackend(tmp_path / "logs")
        controller = Controller(backend, http=http, health_interval_s=0.1, restart_backoff_s=0.05)
        controller.apply([spec])
        stop = asyncio.Event()
        loop = asyncio.create_task(controller.run(stop))
        try:
            if wait_ready:
                assert await controller.wait_ready(PROCESS_WAIT_S), controller.status()
            yield controller, Dispatcher(controller, http, backend, **dispatcher_kw)
        finally:
            stop.set()
            await loop
            await controller.shutdown(grace_s=2.0)
    assert psutil.Process().children(recursive=True) == []


async def _until(controller: Controller, cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PROCESS_WAIT_S
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {controller.status()}"
        await controller.wait_for_change(0.5)


async def _fire(dispatcher: Dispatcher, total: int, kill_after: int, victim: int) -> list[DispatchResult]:
    """``total`` requests, 6 at a time; SIGKILL ``victim`` once ``kill_after`` have been answered."""
    gate = asyncio.Semaphore(6)
    answered = 0

    async def one(i: int) -> DispatchResult:
        nonlocal answered
        async with gate:
            result = await dispatcher.request("echo", "/echo", {"i": i})
        answered += 1
        if answered == kill_after:
            os.kill(victim, signal.SIGKILL)
        return result

    return await asyncio.gather(*(one(i) for i in range(total)))


def _pid(result: DispatchResult) -> int:
    return int(result.response.json()["pid"])


@pytest.mark.anyio
async def test_sigkill_of_one_of_two_replicas_loses_no_request(tmp_path: Path) -> None:
    spec = echo_spec(replicas=2, env={"ECHO_DELAY_S": "0.2"})
    async with _serving(tmp_path, spec) as (controller, dispatcher):
        pids = {r.replica_id: r.pid for r in controller.ready_replicas("echo")}
        victim = pids["echo-0"]
        assert victim is not None
        results = await _fire(dispatcher, total=60, kill_after=15, victim=victim)

        assert [r.response.status_code for r in results] == [200] * 60
        assert [r.response.json()["body"] for r in results] == [{"i": i} for i in range(60)]
        assert {_pid(r) for r in results[:12]} == set(pids.values()), "load is spread over both replicas"
        retried = [r for r in results if r.attempts > 1]
        assert retried, "requests in flight on the killed replica were failed over"
        assert all(_pid(r) != victim for r in retried)
        assert all(
            r.url.startswith("http://127.0.0.1:") and r.replica_id.startswith("echo-") for r in results
        )
        assert dispatcher.in_flight() == {}
        await _until(controller, lambda: len(controller.ready_replicas("echo")) == 2, "the restart")


@pytest.mark.anyio
async def test_with_one_replica_requests_wait_for_its_restart(tmp_path: Path) -> None:
    spec = echo_spec(replicas=1, env={"ECHO_DELAY_S": "0.1"})
    async with _serving(tmp_path, spec) as (controller, dispatcher):
        victim = controller.ready_replicas("echo")[0].pid
        assert victim is not None
        results = await _fire(dispatcher, total=30, kill_after=10, victim=victim)

        assert [r.response.json()["body"] for r in results] == [{"i": i} for i in range(30)]
        assert any(r.attempts > 1 for r in results)
        later = {_pid(r) for r in results[16:]}
        assert victim not in later and len(later) == 1, "the rest were answered by the restarted replica"
        (replica,) = controller.status()[0].replicas
        assert (replica.restarts, replica.last_exit_code) == (1, -signal.SIGKILL)


@pytest.mark.anyio
async def test_no_ready_replica_raises_after_the_deadline(tmp_path: Path) -> None:
    clock = FakeClock(tick=1.0)
    spec = echo_spec(replicas=0)
    async with _serving(tmp_path, spec, retry_deadline_s=3, clock=clock.monotonic) as (_, dispatcher):
        with pytest.raises(NoReadyReplicaError) as caught:
            await dispatcher.request("echo", "/echo", {})
    assert "no ready replica of 'echo' within 3 s" in caught.value.message
    assert "0 replicas desired" in caught.value.message
    assert caught.value.code == "no_ready_replica" and caught.value.status == 503


@pytest.mark.anyio
async def test_the_error_for_a_crashing_deployment_says_why(tmp_path: Path) -> None:
    clock = FakeClock(tick=1.0)
    spec = echo_spec(replicas=1, env={"ECHO_CRASH_EXIT": "3"})
    async with _serving(tmp_path, spec, wait_ready=False, retry_deadline_s=3, clock=clock.monotonic) as (
        c,
        dispatcher,
    ):

        def crashed() -> bool:
            return any(r.last_exit_code == 3 for r in c.status()[0].replicas)

        await _until(c, crashed, "the first crash")
        with pytest.raises(NoReadyReplicaError) as caught:
            await dispatcher.request("echo", "/echo", {})
    message = caught.value.message
    assert "last exit 3" in message
    assert "exited with code 3" in message
    assert str(tmp_path / "logs" / "echo-0.log") in message
    assert "lamina status" in message


@pytest.mark.anyio
async def test_errors_the_replica_sends_are_returned_not_retried(tmp_path: Path) -> None:
    async with _serving(tmp_path, echo_spec(replicas=2)) as (controller, dispatcher):
        for status in (400, 500, 503):
            result = await dispatcher.request("echo", f"/status/{status}", {})
            assert (result.response.status_code, result.attempts) == (status, 1)
        assert all(r.state is ReplicaState.READY for r in controller.status()[0].replicas)
        with pytest.raises(ModelNotFoundError, match="no deployment named 'other'"):
            await dispatcher.request("other", "/echo", {})


@pytest.mark.anyio
async def test_stream_fails_over_before_the_headers(tmp_path: Path) -> None:
    async with _serving(tmp_path, echo_spec(replicas=1)) as (controller, dispatcher):
        async with dispatcher.stream("echo", "/stream", {"chunks": ["a", "b"]}) as result:
            lines = [line async for line in result.response.aiter_lines()]
        assert lines == ["a", "b", f"pid {controller.ready_replicas('echo')[0].pid}"]

        victim = controller.ready_replicas("echo")[0].pid
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        async with dispatcher.stream("echo", "/stream", {"chunks": ["c"]}) as result:
            lines = [line async for line in result.response.aiter_lines()]
        assert lines[0] == "c"
        assert lines[1] != f"pid {victim}", "answered by the restarted replica"
        assert dispatcher.in_flight() == {}


@pytest.mark.anyio
async def test_a_failure_after_the_headers_is_the_callers(tmp_path: Path) -> None:
    spec = echo_spec(replicas=1, env={"ECHO_CHUNK_DELAY_S": "0.2"})
    async with _serving(tmp_path, spec) as (controller, dispatcher):
        victim = controller.ready_replicas("echo")[0].pid
        assert victim is not None
        with pytest.raises(httpx.TransportError):
            async with dispatcher.stream("echo", "/stream", {"chunks": ["x", "y", "z"]}) as result:
                assert result.attempts == 1
                async for line in result.response.aiter_lines():
                    assert line == "x"
                    os.kill(victim, signal.SIGKILL)
        assert dispatcher.in_flight() == {}
