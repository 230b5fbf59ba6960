"""When the reconcile policy gives up on a replica that was ready: health checks failed in a row."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from lamina.config import OrchestrationConfig
from lamina.errors import ConfigError
from lamina.orchestration import (
    Controller,
    LocalProcessBackend,
    Plan,
    ReconcileTimings,
    ReplicaState,
    ReplicaView,
    reconcile_plan,
)

S = ReplicaState
LIMITS = ReconcileTimings(ready_timeout_s=10.0, backoff_s=0.5, backoff_max_s=4.0, unhealthy_checks=3)


@pytest.mark.parametrize(
    ("state", "since", "failed_checks", "now", "limits", "expected"),
    [
        pytest.param(S.UNHEALTHY, 5.0, 1, 5.0, LIMITS, Plan(), id="first-failed-check-keeps-it"),
        pytest.param(S.UNHEALTHY, 5.0, 2, 6.0, LIMITS, Plan(), id="two-of-three"),
        pytest.param(S.UNHEALTHY, 5.0, 3, 7.0, LIMITS, Plan(fail=("r0",)), id="three-in-a-row-replace"),
        pytest.param(S.UNHEALTHY, 5.0, 9, 5.0, LIMITS, Plan(fail=("r0",)), id="more-than-enough"),
        pytest.param(
            S.UNHEALTHY, 5.0, 0, 5.0, LIMITS, Plan(), id="taken-out-by-the-dispatcher-waits-for-a-check"
        ),
        pytest.param(
            S.UNHEALTHY, 5.0, 0, 15.5, LIMITS, Plan(fail=("r0",)), id="unhealthy-past-the-ready-timeout"
        ),
        pytest.param(S.READY, 5.0, 3, 7.0, LIMITS, Plan(), id="a-ready-replica-is-never-given-up"),
        pytest.param(S.STARTING, 5.0, 3, 7.0, LIMITS, Plan(), id="loading-is-the-ready-timeouts-business"),
        pytest.param(
            S.UNHEALTHY,
            5.0,
            1,
            5.0,
            ReconcileTimings(10.0, 0.5, 4.0, unhealthy_checks=1),
            Plan(fail=("r0",)),
            id="threshold-one-replaces-at-once",
        ),
    ],
)
def test_a_replica_is_given_up_after_its_failed_checks(
    state: ReplicaState,
    since: float,
    failed_checks: int,
    now: float,
    limits: ReconcileTimings,
    expected: Plan,
) -> None:
    view = ReplicaView("r0", state, since, failures=0, failed_checks=failed_checks)
    assert reconcile_plan(1, [view], now, limits) == expected


def test_the_default_threshold_is_the_configs() -> None:
    assert ReconcileTimings(1.0, 0.5, 4.0).unhealthy_checks == OrchestrationConfig().unhealthy_checks == 3


@pytest.mark.anyio
async def test_the_controller_refuses_a_threshold_below_one(tmp_path: Path) -> None:
    async with httpx.AsyncClient() as http:
        with pytest.raises(ConfigError, match="unhealthy_checks must be 1 or more, not 0"):
            Controller(LocalProcessBackend(tmp_path), http=http, unhealthy_checks=0)


def test_a_replica_stopped_while_its_port_report_is_read_is_no_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The report pipe is read on the event loop (the controller's status) and closed by a stop in a
    worker thread (a scale to zero): the read must not meet a descriptor closed under it (CI saw a
    500 from /admin/v1/deployments: `OSError: [Errno 9] Bad file descriptor`)."""
    import os
    import subprocess
    import sys
    import threading
    from pathlib import Path

    from lamina.orchestration import _local

    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    handle = _local.ProcessHandle("lazy-0", process, Path(os.devnull), "secret", report_fd=read_end)
    real_read = os.read

    def read_while_stopped(fd: int, n: int) -> bytes:
        stopping = threading.Thread(target=handle.close_report)  # the stop's thread, right then
        stopping.start()
        stopping.join(0.2)
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", read_while_stopped)  # the module _local reads it from
    try:
        assert handle.port is None  # nothing reported yet, and no error
    finally:
        monkeypatch.undo()
        os.close(write_end)
    deadline = 50
    while handle.report_fd is not None and deadline:
        threading.Event().wait(0.01)
        deadline -= 1
    assert handle.report_fd is None  # the stop closed it once the read was done
