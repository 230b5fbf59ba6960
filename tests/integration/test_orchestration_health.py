"""A replica that was ready and then fails its health checks (a stuck engine answers 503) is replaced.

Real processes of the echo workload, whose /health answers 503 {"status": "stuck"} while a file exists;
the controller is stepped by hand on a fake clock that stands still, so it is the count of failed checks,
not the time, that decides (the ready timeout of 120 s never comes into it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lamina.orchestration import ReplicaState
from tests.support import FakeClock, echo_spec, local_controller, process_gone, replica_status, step_until


@pytest.mark.anyio
async def test_a_ready_replica_that_turns_unhealthy_is_replaced(tmp_path: Path) -> None:
    stuck = tmp_path / "stuck"
    clock = FakeClock()
    spec = echo_spec(env={"ECHO_STUCK_FILE": str(stuck)})
    async with local_controller(tmp_path, clock=clock.monotonic, unhealthy_checks=3) as c:
        c.apply([spec])
        await step_until(c, lambda: len(c.ready_replicas("echo")) == 1, "the replica to be ready")
        first = replica_status(c, "echo-0")
        stuck.touch()
        for failed in (1, 2):
            await c.step()
            now = replica_status(c, "echo-0")
            assert (now.state, now.pid) == (ReplicaState.UNHEALTHY, first.pid), f"after {failed} check(s)"
            assert c.ready_replicas("echo") == [], "out of rotation from the first failed check"
        await c.step()
        replaced = replica_status(c, "echo-0")
        assert replaced.state is ReplicaState.DEAD
        assert replaced.last_error is not None
        assert "failing 3 health checks in a row" in replaced.last_error
        assert "answered HTTP 503" in replaced.last_error
        assert process_gone(first.pid)
        assert "failing 3 health checks in a row" in c.explain("echo")

        stuck.unlink()
        clock.advance(0.5)  # the first restart waits restart_backoff_s
        await step_until(c, lambda: len(c.ready_replicas("echo")) == 1, "the replacement to be ready")
        again = replica_status(c, "echo-0")
        assert again.restarts == 1 and again.pid not in (None, first.pid)


@pytest.mark.anyio
async def test_a_replica_that_recovers_before_the_threshold_is_kept(tmp_path: Path) -> None:
    stuck = tmp_path / "stuck"
    spec = echo_spec(env={"ECHO_STUCK_FILE": str(stuck)})
    async with local_controller(tmp_path, clock=FakeClock().monotonic, unhealthy_checks=3) as c:
        c.apply([spec])
        await step_until(c, lambda: len(c.ready_replicas("echo")) == 1, "the replica to be ready")
        first = replica_status(c, "echo-0")
        for _ in range(2):  # two spells of two failed checks, with a good one between: never three in a row
            stuck.touch()
            await c.step()
            await c.step()
            assert replica_status(c, "echo-0").state is ReplicaState.UNHEALTHY
            stuck.unlink()
            await c.step()
            assert [r.pid for r in c.ready_replicas("echo")] == [first.pid]
        assert replica_status(c, "echo-0").restarts == 0
