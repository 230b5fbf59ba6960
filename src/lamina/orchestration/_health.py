"""The controller's health checks of each deployment's replicas: exits noticed, health endpoints probed,
and each replica's record marked ready, unhealthy (a failed check) or dead (with the end of its log)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import httpx

from lamina.orchestration._handshake import probe_health
from lamina.orchestration._local import ReplicaBackend
from lamina.orchestration._replicas import DeploymentRecord, ReplicaRecord
from lamina.orchestration._workload import ReplicaState, WorkloadSpec

log = logging.getLogger("lamina.orchestration._controller")

_LIVE = (ReplicaState.STARTING, ReplicaState.READY, ReplicaState.UNHEALTHY)


class ReplicaHealth:
    """Checks replicas through their backend (exits) and their health endpoint (over ``http``)."""

    def __init__(
        self,
        backend: ReplicaBackend,
        http: httpx.AsyncClient,
        clock: Callable[[], float],
        timeout_s: float,
        unhealthy_checks: int,
    ) -> None:
        self._backend = backend
        self._http = http
        self._clock = clock
        self._timeout_s = timeout_s
        self._unhealthy_checks = unhealthy_checks

    async def check(self, dep: DeploymentRecord) -> None:
        """Notice exited replicas, then probe the live ones and mark each by the answer."""
        for replica in dep.replicas.values():
            if replica.handle is not None and replica.state in _LIVE:
                code = self._backend.poll(replica.handle)
                if code is not None:
                    self.mark_dead(replica, code, f"exited with code {code}")
        checked = [r for r in dep.replicas.values() if r.handle is not None and r.state in _LIVE]
        problems = await asyncio.gather(*(self._probe(r.spec or dep.spec, r) for r in checked))
        for replica, problem in zip(checked, problems, strict=True):
            if problem is None:
                replica.mark_ready(self._clock())
            else:
                self._mark_unwell(replica, problem)

    async def _probe(self, spec: WorkloadSpec, replica: ReplicaRecord) -> str | None:
        """None when the replica's health endpoint answers 200, else what went wrong."""
        assert replica.handle is not None
        url, path = replica.handle.url, spec.health_path
        return await probe_health(self._http, self._backend, url, path, self._timeout_s)

    def _mark_unwell(self, replica: ReplicaRecord, problem: str) -> None:
        assert replica.handle is not None
        code = self._backend.poll(replica.handle)
        if code is not None:
            self.mark_dead(replica, code, f"exited with code {code}")
        elif replica.state is not ReplicaState.STARTING:  # a loading replica has its ready timeout
            replica.failed_checks += 1
            if replica.state is ReplicaState.READY:
                replica.state, replica.since = ReplicaState.UNHEALTHY, self._clock()
            replica.last_reason, replica.last_log_tail = problem, ""
            args = (replica.replica_id, replica.failed_checks, self._unhealthy_checks, problem)
            log.warning("replica %s unhealthy (failed check %d of %d): %s", *args)

    def mark_dead(self, replica: ReplicaRecord, code: int | None, reason: str) -> None:
        """Record a failed replica: its exit code and the end of its log, for ``lamina status``."""
        tail = self._backend.tail_log(replica.handle) if replica.handle is not None else ""
        replica.mark_dead(self._clock(), code, reason, tail)
