"""Rollouts of a new model version to a running deployment, as pure decisions with the clock passed in.

A rollout moves a deployment from its ``stable`` version to a ``target`` one. ``plan_rollout`` looks at
the deployment's replicas (each with the version it runs) and says what to do next:

* rolling (and promoting a canary): start one replica of the target, wait until it is ready, then drain
  one of the stable version, and repeat; an old replica is stopped only while more replicas are ready
  than desired, so capacity never drops;
* canary: run ``canary_replicas`` replicas of the target beside the stable ones; the dispatcher sends
  them about ``weight`` % of the requests (``picks_canary``) until the rollout is promoted (the rolling
  steps above) or rolled back (the canary replicas are drained and the stable version stays).

``CanaryJudge`` is the automatic rollback: it compares the canary's error rate (5xx answers) and p95
latency with the stable group's over a sliding window and says when to roll back (and why) or, after a
healthy period, to promote. The state is a frozen :class:`Rollout` that round-trips through JSON. A
restart begins an unfinished rollout again from the stable replicas (the stack keeps what it was asked).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from lamina.errors import ConfigError, ConflictError
from lamina.orchestration._workload import ReplicaState


class RolloutStrategy(StrEnum):
    ROLLING = "rolling"
    CANARY = "canary"


class RolloutPhase(StrEnum):
    #: replacing stable replicas with target ones, one at a time (also: promoting a canary)
    ROLLING = "rolling"
    #: target replicas run beside the stable ones and take ``weight`` % of the traffic
    CANARY = "canary"
    #: draining the target replicas; the stable version stays
    ROLLING_BACK = "rolling_back"
    #: every replica runs the target, which is now the stable version
    DONE = "done"
    #: every target replica is gone
    ROLLED_BACK = "rolled_back"


#: phases after which the rollout makes no more changes
FINISHED = (RolloutPhase.DONE, RolloutPhase.ROLLED_BACK)

#: replicas that still (or will soon) serve: a rollout step counts these
_LIVE = (ReplicaState.STARTING, ReplicaState.READY, ReplicaState.UNHEALTHY)
#: which stable replicas go first: those that serve nothing
_STOP_ORDER = {
    ReplicaState.DEAD: 0,
    ReplicaState.UNHEALTHY: 1,
    ReplicaState.STARTING: 2,
    ReplicaState.READY: 3,
}


@dataclass(frozen=True)
class Rollout:
    """One deployment's rollout: from ``stable`` to ``target`` (model versions, e.g. ``chat@2``)."""

    stable: str
    target: str
    strategy: RolloutStrategy
    phase: RolloutPhase
    started_at: float
    #: the share of requests (0..100) the target's replicas get while the phase is CANARY
    weight: int = 10
    #: why the rollout was rolled back or promoted (a command, or the judge's reason)
    reason: str | None = None

    @classmethod
    def begin(
        cls, stable: str, target: str, strategy: RolloutStrategy, now: float, weight: int = 10
    ) -> Rollout:
        """A new rollout, checked: a different version, a weight of 1..99 for a canary."""
        if stable == target:
            raise ConflictError(f"the deployment already runs {target}; name another version to roll out")
        if strategy is RolloutStrategy.CANARY and not 1 <= weight <= 99:
            raise ConfigError(f"a canary's --weight is a percentage from 1 to 99, not {weight}")
        phase = RolloutPhase.CANARY if strategy is RolloutStrategy.CANARY else RolloutPhase.ROLLING
        return cls(
            stable, target, strategy, phase, now, weight if strategy is RolloutStrategy.CANARY else 100
        )

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED

    def promote(self, reason: str = "promoted by command") -> Rollout:
        """Move every replica to the target (rolling); only a canary in progress can be promoted."""
        if self.phase is not RolloutPhase.CANARY:
            raise ConflictError(f"only a running canary can be promoted; this rollout is {self.phase.value}")
        return replace(self, phase=RolloutPhase.ROLLING, reason=reason)

    def rollback(self, reason: str = "rolled back by command") -> Rollout:
        """Drain the target's replicas and keep the stable version (from any unfinished phase)."""
        if self.finished:
            raise ConflictError(f"this rollout is {self.phase.value} already; start a new one instead")
        return replace(self, phase=RolloutPhase.ROLLING_BACK, reason=reason)

    def to_json(self) -> dict[str, Any]:
        return {
            "stable": self.stable,
            "target": self.target,
            "strategy": self.strategy.value,
            "phase": self.phase.value,
            "started_at": self.started_at,
            "weight": self.weight,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Rollout:
        return cls(
            stable=str(data["stable"]),
            target=str(data["target"]),
            strategy=RolloutStrategy(data["strategy"]),
            phase=RolloutPhase(data["phase"]),
            started_at=float(data["started_at"]),
            weight=int(data["weight"]),
            reason=None if data.get("reason") is None else str(data["reason"]),
        )


@dataclass(frozen=True)
class VersionedReplica:
    """A replica as a rollout sees it: which version it runs and its state."""

    replica_id: str
    version: str
    state: ReplicaState


@dataclass(frozen=True)
class RolloutStep:
    """What to do now: start ``start`` replicas of the target, drain ``stop``, enter ``phase``."""

    phase: RolloutPhase
    start: int = 0
    stop: tuple[str, ...] = ()
    #: the version that is stable once this step is taken (the target, once the rollout is done)
    stable: str = ""


def canary_replicas(desired: int, weight: int) -> int:
    """Replicas of the target during a canary: its share of ``desired``, at least one."""
    return max(1, math.ceil(desired * weight / 100))


def plan_rollout(rollout: Rollout, replicas: Sequence[VersionedReplica], desired: int) -> RolloutStep:
    """The next step of ``rollout`` over the deployment's ``replicas`` (``desired``: its replica count)."""
    live_new = [r for r in replicas if r.version == rollout.target and r.state in _LIVE]
    old = [r for r in replicas if r.version != rollout.target and r.state is not ReplicaState.STOPPING]
    ready_new = sum(1 for r in live_new if r.state is ReplicaState.READY)
    ready_old = sum(1 for r in old if r.state is ReplicaState.READY)
    stay = RolloutStep(rollout.phase, stable=rollout.stable)
    if rollout.finished:
        return stay
    if rollout.phase is RolloutPhase.ROLLING_BACK:
        targets = tuple(r.replica_id for r in replicas if r.version == rollout.target)
        going = tuple(r.replica_id for r in replicas if r.version == rollout.target and r.state in _LIVE)
        if not targets:
            return RolloutStep(RolloutPhase.ROLLED_BACK, stable=rollout.stable)
        return RolloutStep(RolloutPhase.ROLLING_BACK, stop=going, stable=rollout.stable)
    if rollout.phase is RolloutPhase.CANARY:
        wanted = canary_replicas(desired, rollout.weight)
        return RolloutStep(RolloutPhase.CANARY, start=max(0, wanted - len(live_new)), stable=rollout.stable)
    # rolling: surge one target replica at a time; drain an old one only when capacity allows
    if not old and ready_new >= desired:
        return RolloutStep(RolloutPhase.DONE, stable=rollout.target)
    broken_old = sorted((r for r in old if r.state is not ReplicaState.READY), key=_stop_key)
    if broken_old:  # serves nothing: stopping it costs no capacity
        return RolloutStep(RolloutPhase.ROLLING, stop=(broken_old[0].replica_id,), stable=rollout.stable)
    if old and ready_old + ready_new > desired:
        return RolloutStep(
            RolloutPhase.ROLLING, stop=(min(r.replica_id for r in old),), stable=rollout.stable
        )
    placed_new = [r for r in replicas if r.version == rollout.target and r.state is not ReplicaState.STOPPING]
    if any(r.state is not ReplicaState.READY for r in placed_new):
        return stay  # wait until the new replica is ready (a failed one is restarted by the controller)
    if len(placed_new) < desired:
        return RolloutStep(RolloutPhase.ROLLING, start=1, stable=rollout.stable)
    return stay


def _stop_key(replica: VersionedReplica) -> tuple[int, str]:
    return (_STOP_ORDER.get(replica.state, 0), replica.replica_id)


def picks_canary(pick: int, weight: int) -> bool:
    """Whether request number ``pick`` (0, 1, 2 ...) goes to the canary group at ``weight`` %.

    Spread evenly and exactly: of any 100 consecutive picks, ``weight`` go to the canary.
    """
    return (pick + 1) * weight // 100 > pick * weight // 100


# ---- automatic rollback ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CanaryPolicy:
    """When a canary is rolled back (or promoted) automatically."""

    #: seconds of answers compared
    window_s: float = 60.0
    #: answers each group needs in the window before it is judged
    min_requests: int = 20
    #: roll back when the canary's error rate exceeds the stable one's by more than this (0.05: 5 points)
    max_error_rate_increase: float = 0.05
    #: roll back when the canary's p95 latency is more than this times the stable one's
    max_latency_ratio: float = 2.0
    #: promote after this many seconds of a healthy canary (None: only by command)
    promote_after_s: float | None = None

    def __post_init__(self) -> None:
        if self.window_s <= 0 or self.min_requests < 1:
            raise ConfigError("a canary policy needs window_s > 0 and min_requests >= 1")
        if not 0 <= self.max_error_rate_increase <= 1 or self.max_latency_ratio <= 1:
            raise ConfigError("max_error_rate_increase is 0..1 and max_latency_ratio above 1")


@dataclass(frozen=True)
class GroupStats:
    """One group's answers in the window."""

    requests: int
    errors: int
    p95_s: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class Verdict:
    """``hold``, ``rollback`` or ``promote``, with why."""

    action: str
    reason: str
    stable: GroupStats
    canary: GroupStats


class CanaryJudge:
    """Collects the answers of both groups (``record``) and judges the canary (``judge``)."""

    def __init__(self, policy: CanaryPolicy) -> None:
        self.policy = policy
        #: (time, canary?, error?, latency_s)
        self._answers: deque[tuple[float, bool, bool, float]] = deque()
        self._healthy_since: float | None = None

    def record(self, now: float, *, canary: bool, status: int, latency_s: float) -> None:
        """One answer: its HTTP status (5xx counts as an error) and latency."""
        self._answers.append((now, canary, status >= 500, latency_s))
        self._prune(now)

    def _prune(self, now: float) -> None:
        while self._answers and self._answers[0][0] < now - self.policy.window_s:
            self._answers.popleft()

    def stats(self, now: float, *, canary: bool) -> GroupStats:
        self._prune(now)
        mine = [a for a in self._answers if a[1] is canary]
        errors = sum(1 for a in mine if a[2])
        latencies = sorted(a[3] for a in mine)
        p95 = latencies[max(0, math.ceil(0.95 * len(latencies)) - 1)] if latencies else None
        return GroupStats(len(mine), errors, p95)

    def judge(self, now: float) -> Verdict:
        """Whether to roll the canary back (worse than stable by the policy's margins), promote it
        (healthy for ``promote_after_s``), or hold."""
        policy = self.policy
        stable, canary = self.stats(now, canary=False), self.stats(now, canary=True)
        if stable.requests < policy.min_requests or canary.requests < policy.min_requests:
            self._healthy_since = None
            need = f"{policy.min_requests} answers per group in {policy.window_s:g} s"
            return Verdict("hold", f"waiting for {need}", stable, canary)
        excess = canary.error_rate - stable.error_rate
        if excess > policy.max_error_rate_increase:
            reason = (
                f"canary error rate {canary.error_rate:.1%} exceeds stable {stable.error_rate:.1%} by more "
                f"than {policy.max_error_rate_increase:.0%} ({canary.requests} vs {stable.requests} answers)"
            )
            return Verdict("rollback", reason, stable, canary)
        assert stable.p95_s is not None and canary.p95_s is not None
        if canary.p95_s > policy.max_latency_ratio * stable.p95_s:
            reason = (
                f"canary p95 latency {canary.p95_s:.3f} s is more than {policy.max_latency_ratio:g}x "
                f"stable's {stable.p95_s:.3f} s"
            )
            return Verdict("rollback", reason, stable, canary)
        if self._healthy_since is None:
            self._healthy_since = now
        healthy_s = now - self._healthy_since
        if policy.promote_after_s is not None and healthy_s >= policy.promote_after_s:
            return Verdict("promote", f"canary healthy for {healthy_s:g} s", stable, canary)
        return Verdict("hold", "canary within the margins", stable, canary)
