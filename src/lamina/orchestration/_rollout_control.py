"""A deployment's rollout as the controller and dispatcher run it (the decisions are in ``_rollout``).

The controller asks ``step`` at each reconcile pass which target replicas to start and which replicas to
drain; the dispatcher asks ``route`` which ready replicas a request may go to (the canary's weight) and
tells ``observe`` each answer, which feeds the automatic rollback (a :class:`CanaryJudge`, if a policy
was given).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from lamina.orchestration._replicas import DeploymentRecord
from lamina.orchestration._rollout import (
    CanaryJudge,
    Rollout,
    RolloutPhase,
    RolloutStep,
    VersionedReplica,
    picks_canary,
    plan_rollout,
)
from lamina.orchestration._workload import ReplicaStatus, WorkloadSpec

log = logging.getLogger("lamina.orchestration._controller")


@dataclass
class RolloutControl:
    """The rollout of one deployment: its state, the target's spec, and the canary's judge."""

    rollout: Rollout
    target_spec: WorkloadSpec
    judge: CanaryJudge | None = None
    picks: int = 0

    def promote(self, reason: str = "promoted by command") -> Rollout:
        self.rollout = self.rollout.promote(reason)
        return self.rollout

    def rollback(self, reason: str = "rolled back by command") -> Rollout:
        self.rollout = self.rollout.rollback(reason)
        return self.rollout

    def step(self, dep: DeploymentRecord, now: float) -> RolloutStep | None:
        """What to start and drain now (None: the rollout is over; the deployment reconciles as usual).
        A canary's judge may roll it back or promote it first; once done, the target is the spec."""
        rollout = self.rollout
        if rollout.finished:
            return None
        if self.judge is not None and rollout.phase is RolloutPhase.CANARY:
            verdict = self.judge.judge(now)
            if verdict.action == "rollback":
                log.warning(
                    "deployment %s: rolling back %s: %s", dep.spec.name, rollout.target, verdict.reason
                )
                self.rollback(f"automatic: {verdict.reason}")
            elif verdict.action == "promote":
                log.info("deployment %s: promoting %s: %s", dep.spec.name, rollout.target, verdict.reason)
                self.promote(f"automatic: {verdict.reason}")
        replicas = [VersionedReplica(r.replica_id, r.version, r.state) for r in dep.replicas.values()]
        step = plan_rollout(self.rollout, replicas, dep.desired)
        if step.phase is not self.rollout.phase:
            log.info(
                "deployment %s: rollout of %s is %s", dep.spec.name, self.rollout.target, step.phase.value
            )
            self.rollout = replace(self.rollout, phase=step.phase)
        if step.phase is RolloutPhase.DONE:
            dep.spec, dep.version = self.target_spec, self.rollout.target
        return step

    def route(self, ready: list[ReplicaStatus], version: str | None = None) -> list[ReplicaStatus]:
        """The ready replicas this request may go to: during a canary, the target's or the stable ones,
        the target's for ``weight`` % of the requests (while both groups have a ready replica). A request
        pinned to a model ``version`` (a query embedding, whose vectors must come from the model that
        embedded the dataset) goes to that version's replicas, whatever the phase, while one is ready
        (at the very end of a rollout, before the catalog moves the version's queries elsewhere, none
        is: the request is not held up)."""
        target = self.rollout.target
        if version is not None:
            pinned = [r for r in ready if (r.version == target) == (version == target)]
            if pinned:
                return pinned
        if self.rollout.phase is not RolloutPhase.CANARY:
            return ready
        canary = [r for r in ready if r.version == target]
        stable = [r for r in ready if r.version != target]
        if not canary or not stable:
            return ready
        chosen = canary if picks_canary(self.picks, self.rollout.weight) else stable
        self.picks += 1
        return chosen

    def observe(self, version: str, status: int, latency_s: float, now: float) -> None:
        """One answer of a replica running ``version``, for the canary's judge."""
        if self.judge is not None and self.rollout.phase is RolloutPhase.CANARY:
            self.judge.record(now, canary=version == self.rollout.target, status=status, latency_s=latency_s)
