"""A reconcile loop over real local processes, for orchestration tests: the controller, stepped by hand."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil

from lamina.orchestration import Controller, LocalProcessBackend, ReplicaStatus

#: bound on waiting for real processes; generous because the machine is shared
PROCESS_WAIT_S = 30.0


@asynccontextmanager
async def local_controller(tmp_path: Path, **kw: Any) -> AsyncIterator[Controller]:
    """A controller of local processes (logs under ``tmp_path/logs``), shut down afterwards; fails the
    test if a replica process outlives it. ``kw`` goes to the Controller (clock, backoff, thresholds)."""
    async with httpx.AsyncClient() as http:
        controller = Controller(LocalProcessBackend(tmp_path / "logs"), http=http, **kw)
        try:
            yield controller
        finally:
            await controller.shutdown(grace_s=2.0)
    assert psutil.Process().children(recursive=True) == [], "shutdown left replica processes behind"


async def step_until(controller: Controller, cond: Callable[[], bool], what: str) -> None:
    """Step by hand (a fake clock stands still) until real processes have done what ``cond`` says."""
    deadline = time.monotonic() + PROCESS_WAIT_S
    while True:
        await controller.step()
        if cond():
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {controller.status()}"
        await asyncio.sleep(0.05)


def replica_status(controller: Controller, replica_id: str) -> ReplicaStatus:
    """The controller's status of one replica, by id."""
    return next(r for d in controller.status() for r in d.replicas if r.replica_id == replica_id)


def process_gone(pid: int | None) -> bool:
    """Whether the process has exited (a zombie counts: it has stopped running)."""
    if pid is None:
        return True
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
