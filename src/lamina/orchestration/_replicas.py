"""The controller's mutable records of deployments and their replicas (the reconcile loop's own state)."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lamina.errors import NoReadyReplicaError
from lamina.orchestration._autoscale import LoadObservation, ReplicaAutoscaler
from lamina.orchestration._local import ReplicaHandle
from lamina.orchestration._policy import ReplicaView
from lamina.orchestration._workload import ReplicaState, ReplicaStatus, WorkloadSpec

if TYPE_CHECKING:
    from lamina.orchestration._rollout_control import RolloutControl

log = logging.getLogger("lamina.orchestration._controller")


@dataclass
class ReplicaRecord:
    """The controller's mutable record of one replica; ``since`` is the clock at its last state change."""

    replica_id: str
    deployment: str
    state: ReplicaState
    since: float
    handle: ReplicaHandle | None = None
    restarts: int = 0
    failures: int = 0
    #: health checks failed in a row since the replica was last ready (0 while starting)
    failed_checks: int = 0
    last_exit_code: int | None = None
    #: one line on the last failure, and the end of the replica's log when it died
    last_reason: str | None = None
    last_log_tail: str = ""
    log_path: Path | None = None
    #: the version it runs and the spec it was started from (None: its deployment's spec)
    version: str = ""
    spec: WorkloadSpec | None = None

    @property
    def last_error(self) -> str | None:
        if self.last_reason and self.last_log_tail:
            return f"{self.last_reason}; last lines of {self.log_path}:\n{self.last_log_tail}"
        return self.last_reason

    def view(self) -> ReplicaView:
        return ReplicaView(self.replica_id, self.state, self.since, self.failures, self.failed_checks)

    def status(self) -> ReplicaStatus:
        h = self.handle
        return ReplicaStatus(
            replica_id=self.replica_id,
            deployment=self.deployment,
            state=self.state,
            pid=h.pid if h else None,
            url=h.url if h else None,
            restarts=self.restarts,
            last_exit_code=self.last_exit_code,
            last_error=self.last_error,
            version=self.version,
        )

    def mark_ready(self, now: float) -> None:
        self.failed_checks = 0
        if self.state is not ReplicaState.READY:
            self.state, self.since, self.failures = ReplicaState.READY, now, 0
            assert self.handle is not None
            log.info("replica %s ready at %s", self.replica_id, self.handle.url)

    def mark_dead(self, now: float, code: int | None, reason: str, tail: str) -> None:
        """Record a failure: its exit code and the end of the replica's log, for ``lamina status``."""
        self.state, self.since, self.handle = ReplicaState.DEAD, now, None
        self.failures, self.failed_checks = self.failures + 1, 0
        self.last_exit_code, self.last_reason, self.last_log_tail = code, reason, tail
        log.warning("replica %s %s (failure %d in a row)", self.replica_id, reason, self.failures)


@dataclass
class DeploymentRecord:
    spec: WorkloadSpec
    desired: int
    replicas: dict[str, ReplicaRecord] = field(default_factory=dict)
    next_index: int = 0
    #: no longer wanted (left out of the applied specs, or removed): drained, stopped, then forgotten
    removed: bool = False
    #: added at run time (``Controller.add``): ``apply`` leaves it alone
    dynamic: bool = False
    #: sets ``desired`` from traffic; None: ``desired`` is the spec's replica count
    autoscaler: ReplicaAutoscaler | None = None
    #: requests found no ready replica since the last step (a cold start's demand)
    waiting: int = 0
    #: when the deployment last started scaling up from zero replicas (None: not now)
    cold_since: float | None = None
    #: the version its replicas run, and its rollout (see ``_rollout_control``), if one was started
    version: str = ""
    rollout: RolloutControl | None = None

    def ready(self) -> int:
        return sum(1 for r in self.replicas.values() if r.state is ReplicaState.READY)

    def demand(self, name: str, now: float) -> bool:
        """A request found no ready replica. At zero replicas of an autoscaled deployment, desire one now
        (a cold start: True); once a cold start has outlasted its budget, NoReadyReplicaError names it."""
        if self.autoscaler is None:
            return False
        self.waiting = 1
        budget = self.autoscaler.policy.cold_start_budget_s
        if self.desired == 0:
            self.desired, self.cold_since = 1, now
            log.info("deployment %s: a request arrived at zero replicas; starting one", name)
            return True
        if self.cold_since is not None and now - self.cold_since > budget:
            raise NoReadyReplicaError(
                f"deployment {name!r} was scaled to zero and no replica became ready within its cold-start "
                f"budget of {budget:g} s ({explain(name, self)}); try again shortly, or deploy it with a "
                "minimum of 1 replica so that it never scales to zero",
                deployment=name,
            )
        return False

    def autoscale(self, name: str, load: Mapping[str, int], now: float) -> None:
        """Feed the autoscaler the requests in flight on this deployment's replicas, and take its count."""
        assert self.autoscaler is not None
        obs = LoadObservation(now, sum(load.get(rid, 0) for rid in self.replicas), self.waiting)
        self.waiting = 0
        decision = self.autoscaler.observe(obs, self.desired)
        if decision.desired != self.desired:
            log.info(
                "deployment %s: %d -> %d replica(s): %s",
                name,
                self.desired,
                decision.desired,
                decision.reason,
            )
            self.desired = decision.desired


def explain(name: str, dep: DeploymentRecord) -> str:
    """One line on why deployment ``name`` has no ready replica, for error messages."""
    if dep.desired == 0 and dep.autoscaler is None:
        return f"deployment {name!r} has 0 replicas desired; set `replicas` to 1 or more"
    if dep.desired == 0:
        return f"deployment {name!r} is scaled to zero; a request starts a replica (cold start)"
    counts = Counter(r.state.value for r in dep.replicas.values())
    text = f"{dep.desired} replica(s) desired: " + (
        ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "none started yet"
    )
    failed = [r for r in dep.replicas.values() if r.last_reason]
    if failed:
        r = max(failed, key=lambda f: f.since)
        exit_info = f", last exit {r.last_exit_code}" if r.last_exit_code is not None else ""
        text += f"; {r.replica_id} restarted {r.restarts} time(s){exit_info}: {r.last_reason}"
        if r.last_log_tail:
            text += f"; its log ends with {r.last_log_tail.splitlines()[-1]!r}"
        if r.log_path is not None:
            text += f"; see {r.log_path}"
    return text


def given_up(spec: WorkloadSpec, replica: ReplicaRecord, unhealthy_checks: int) -> str:
    """Why the reconcile plan gave up on ``replica`` (before it is stopped), for its last error."""
    limit = f"{spec.ready_timeout_s:g} s"
    if replica.state is ReplicaState.STARTING:
        return f"not ready within {limit} (GET {spec.health_path} never answered 200)"
    if replica.failed_checks >= unhealthy_checks:
        checks, last = replica.failed_checks, replica.last_reason
        return f"replaced after failing {checks} health checks in a row (last: {last})"
    return f"unhealthy for more than {limit}"


async def drained(replica_id: str, load: Callable[[], Mapping[str, int]], grace_s: float) -> None:
    """Return once ``replica_id`` has no request in flight, or after ``grace_s`` (real seconds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    while (busy := load().get(replica_id, 0)) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if busy:
        log.warning(
            "replica %s still has %d request(s) in flight after the drain grace of %g s; stopping it",
            replica_id,
            busy,
            grace_s,
        )
