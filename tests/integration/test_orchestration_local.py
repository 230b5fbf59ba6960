"""Local replica processes and the reconcile loop, with real processes of a tiny HTTP workload.

Policy timing (backoff, ready timeouts) runs on a fake clock stepped by hand; the only real waiting is for
real processes to start, crash or answer.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import psutil
import pytest

from lamina.errors import ModelNotFoundError
from lamina.orchestration import (
    SECRET_HEADER,
    Controller,
    LocalProcessBackend,
    ReplicaState,
    WorkloadSpec,
)
from tests.support import (
    ECHO_SERVER,
    PROCESS_WAIT_S,
    FakeClock,
    echo_spec,
    local_controller,
    process_gone,
    replica_status,
    step_until,
)


def _wait_until(cond: Callable[[], bool], what: str) -> None:
    """Wait for a real process to do something (start, exit), failing after PROCESS_WAIT_S."""
    deadline = time.monotonic() + PROCESS_WAIT_S
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _healthy(url: str, headers: dict[str, str]) -> bool:
    try:
        return httpx.get(f"{url}/health", headers=headers, timeout=1.0).status_code == 200
    except httpx.TransportError:
        return False


# ---- the local process backend ------------------------------------------------------------------------


def test_backend_starts_a_replica_on_the_port_it_reports_and_stops_it(tmp_path: Path) -> None:
    backend = LocalProcessBackend(tmp_path / "logs")
    handle = backend.start(echo_spec(env={"ECHO_MARK": "from-spec"}), "echo-0")
    try:
        _wait_until(lambda: handle.url is not None, "the replica to report its port")
        assert handle.url == f"http://127.0.0.1:{handle.port}"
        secret = {SECRET_HEADER: handle.secret}
        _wait_until(lambda: _healthy(f"{handle.url}", secret), "the replica to answer /health")
        answer = httpx.post(f"{handle.url}/echo", json={"hello": "world"}, headers=secret).json()
        assert answer == {"body": {"hello": "world"}, "pid": handle.pid}
        assert backend.poll(handle) is None
        assert psutil.Process(handle.pid).environ()["ECHO_MARK"] == "from-spec"
    finally:
        code = backend.stop(handle, grace_s=5.0)
    assert code == -signal.SIGTERM
    assert backend.poll(handle) == -signal.SIGTERM
    assert backend.stop(handle) == -signal.SIGTERM  # already dead: no error
    log = (tmp_path / "logs" / "echo-0.log").read_text()
    assert "starting echo-0" in log
    assert f"serving on 127.0.0.1:{handle.port}" in log


def test_a_crash_leaves_its_exit_code_and_log_tail(tmp_path: Path) -> None:
    backend = LocalProcessBackend(tmp_path)
    handle = backend.start(echo_spec(env={"ECHO_CRASH_EXIT": "7"}), "crash-0")
    handle.process.wait(timeout=PROCESS_WAIT_S)
    assert backend.poll(handle) == 7
    assert backend.tail_log(handle, lines=1) == "echo_server: crashing on purpose with exit code 7"
    backend.start(echo_spec(env={"ECHO_CRASH_EXIT": "8"}), "crash-0").process.wait(timeout=PROCESS_WAIT_S)
    assert "exit code 7" in backend.tail_log(handle), "the log of a replica is appended to, not replaced"


def test_stop_kills_a_process_that_ignores_sigterm(tmp_path: Path) -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('armed', flush=True); time.sleep(60)"
    )
    backend = LocalProcessBackend(tmp_path)
    handle = backend.start(WorkloadSpec(name="stubborn", argv=(sys.executable, "-c", code)), "stubborn-0")
    _wait_until(lambda: backend.tail_log(handle, lines=1) == "armed", "the process to ignore SIGTERM")
    assert backend.stop(handle, grace_s=0.2) == -signal.SIGKILL


def test_a_missing_executable_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        LocalProcessBackend(tmp_path).start(WorkloadSpec(name="x", argv=("/nonexistent/bin",)), "x-0")


def test_replicas_die_with_the_process_that_started_them(tmp_path: Path) -> None:
    parent_code = f"""
import sys, time
from pathlib import Path
from lamina.orchestration import LocalProcessBackend, WorkloadSpec
handle = LocalProcessBackend(Path({str(tmp_path)!r})).start(
    WorkloadSpec(name="orphan", argv=({sys.executable!r}, {str(ECHO_SERVER)!r})),
    "orphan-0",
)
print(handle.pid, flush=True)
time.sleep(60)
"""
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE)
    assert parent.stdout is not None
    with parent.stdout:
        child_pid = int(parent.stdout.readline())
    try:
        assert not process_gone(child_pid)
        parent.kill()
        parent.wait()
        _wait_until(lambda: process_gone(child_pid), "the orphaned replica to get SIGTERM")
    finally:
        if not process_gone(child_pid):  # the test failed: do not leave the orphan running
            os.kill(child_pid, signal.SIGKILL)


# ---- the controller -------------------------------------------------------------------------------------


@asynccontextmanager
async def _running(controller: Controller) -> AsyncIterator[None]:
    stop = asyncio.Event()
    loop = asyncio.create_task(controller.run(stop))
    try:
        yield
    finally:
        stop.set()
        await loop


async def _until(controller: Controller, cond: Callable[[], bool], what: str) -> None:
    """Wait while ``run()`` reconciles, until ``cond`` holds."""
    deadline = time.monotonic() + PROCESS_WAIT_S
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {controller.status()}"
        await controller.wait_for_change(0.5)


@pytest.mark.anyio
async def test_replicas_become_ready_and_a_killed_one_is_restarted(tmp_path: Path) -> None:
    async with local_controller(tmp_path, health_interval_s=0.1, restart_backoff_s=0.05) as controller:
        controller.apply([echo_spec(replicas=2)])
        async with _running(controller):
            assert await controller.wait_ready(PROCESS_WAIT_S)
            before = {r.replica_id: r.pid for r in controller.ready_replicas("echo")}
            assert sorted(before) == ["echo-0", "echo-1"]
            victim = before["echo-0"]
            assert victim is not None
            os.kill(victim, signal.SIGKILL)

            def restarted() -> bool:
                r = replica_status(controller, "echo-0")
                return r.state is ReplicaState.READY and r.pid != victim

            await _until(controller, restarted, "echo-0 to come back")
        echo0 = replica_status(controller, "echo-0")
        assert (echo0.restarts, echo0.last_exit_code) == (1, -signal.SIGKILL)
        assert replica_status(controller, "echo-1").pid == before["echo-1"], (
            "the other replica was left alone"
        )
        assert process_gone(victim)


@pytest.mark.anyio
async def test_scaling_down_stops_the_extras_and_removal_forgets_the_deployment(tmp_path: Path) -> None:
    async with local_controller(tmp_path, health_interval_s=0.1) as controller:
        controller.apply([echo_spec(replicas=3)])
        async with _running(controller):
            assert await controller.wait_ready(PROCESS_WAIT_S, ["echo"])
            pids = {r.replica_id: r.pid for r in controller.ready_replicas("echo")}
            controller.apply([echo_spec(replicas=1)])
            await _until(controller, lambda: len(controller.status()[0].replicas) == 1, "the scale-down")
            assert [r.replica_id for r in controller.ready_replicas("echo")] == ["echo-0"]
            assert all(process_gone(pids[rid] or 0) for rid in ("echo-1", "echo-2"))
            controller.apply([])
            await _until(controller, lambda: controller.status() == [], "the deployment to go")
            assert process_gone(pids["echo-0"] or 0)
            with pytest.raises(ModelNotFoundError, match="no deployment named 'echo'"):
                controller.ready_replicas("echo")


@pytest.mark.anyio
async def test_a_crashing_workload_backs_off_and_the_other_keeps_serving(tmp_path: Path) -> None:
    clock = FakeClock()
    async with local_controller(
        tmp_path, clock=clock.monotonic, restart_backoff_s=1.0, restart_backoff_max_s=8.0
    ) as c:
        c.apply([echo_spec("good"), echo_spec("crash", env={"ECHO_CRASH_EXIT": "3"})])

        def crash_dead(restarts: int) -> Callable[[], bool]:
            def cond() -> bool:
                r = replica_status(c, "crash-0")
                return r.state is ReplicaState.DEAD and r.restarts == restarts

            return cond

        await step_until(c, lambda: crash_dead(0)() and len(c.ready_replicas("good")) == 1, "first crash")
        crash = replica_status(c, "crash-0")
        assert crash.last_exit_code == 3
        assert crash.last_error is not None
        assert "crashing on purpose with exit code 3" in crash.last_error
        assert str(tmp_path / "logs" / "crash-0.log") in crash.last_error
        assert "crash-0 restarted 0 time(s), last exit 3" in c.explain("crash")

        for delay in (1.0, 2.0, 4.0, 8.0, 8.0):  # doubling, capped at 8 s
            restarts = replica_status(c, "crash-0").restarts
            clock.advance(delay - 0.25)
            await c.step()
            assert replica_status(c, "crash-0").restarts == restarts, f"restarted before {delay} s passed"
            clock.advance(0.25)
            await c.step()
            assert replica_status(c, "crash-0").restarts == restarts + 1
            await step_until(c, crash_dead(restarts + 1), "the restarted replica to crash again")

        await c.step()  # one more health check (it carries the replica's secret) of the good replica
        good = c.ready_replicas("good")
        assert len(good) == 1 and good[0].restarts == 0 and not process_gone(good[0].pid)


@pytest.mark.anyio
async def test_a_replica_that_never_gets_ready_is_restarted_after_its_timeout(tmp_path: Path) -> None:
    clock = FakeClock()
    spec = echo_spec(env={"ECHO_READY_DELAY_S": "1000"}, ready_timeout_s=5.0)
    async with local_controller(tmp_path, clock=clock.monotonic, restart_backoff_s=1.0) as c:
        c.apply([spec])
        await c.step()
        first = replica_status(c, "echo-0")
        assert first.state is ReplicaState.STARTING and first.pid is not None
        clock.advance(5.0)
        await c.step()
        assert replica_status(c, "echo-0").state is ReplicaState.STARTING, "5 s is not more than 5 s"
        clock.advance(0.5)
        await c.step()
        timed_out = replica_status(c, "echo-0")
        assert timed_out.state is ReplicaState.DEAD
        assert timed_out.last_error is not None and "not ready within 5 s" in timed_out.last_error
        assert process_gone(first.pid)
        clock.advance(1.0)
        await c.step()
        again = replica_status(c, "echo-0")
        assert (again.state, again.restarts) == (ReplicaState.STARTING, 1)
        assert again.pid not in (None, first.pid)


@pytest.mark.anyio
async def test_report_failure_takes_a_replica_out_of_rotation_until_it_checks_healthy(tmp_path: Path) -> None:
    async with local_controller(tmp_path) as c:
        c.apply([echo_spec()])
        await step_until(c, lambda: len(c.ready_replicas("echo")) == 1, "the replica to be ready")
        c.report_failure("echo-0", "ConnectError from the dispatcher")
        assert c.ready_replicas("echo") == []
        assert replica_status(c, "echo-0").state is ReplicaState.UNHEALTHY
        c.report_failure("gone-7", "a replica that no longer exists is ignored")
        await c.step()
        assert [r.replica_id for r in c.ready_replicas("echo")] == ["echo-0"]


@pytest.mark.anyio
async def test_unknown_deployments_are_not_found(tmp_path: Path) -> None:
    async with local_controller(tmp_path) as c:
        c.apply([echo_spec("real", replicas=0)])
        for call in (lambda: c.ready_replicas("nope"), lambda: c.explain("nope")):
            with pytest.raises(ModelNotFoundError, match=r"no deployment named 'nope' \(deployments: real\)"):
                call()
        with pytest.raises(ModelNotFoundError):
            await c.wait_ready(1.0, ["nope"])
        assert await c.wait_ready(1.0, ["real"]), "zero desired replicas are all ready"
        assert "0 replicas desired" in c.explain("real")
