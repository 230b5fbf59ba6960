"""The rollout state machine and the canary judge: pure decisions, driven by a simulated replica set and
a fake clock."""

from __future__ import annotations

import pytest

from lamina.errors import ConfigError, ConflictError
from lamina.orchestration._replicas import DeploymentRecord, ReplicaRecord
from lamina.orchestration._rollout import (
    CanaryJudge,
    CanaryPolicy,
    Rollout,
    RolloutPhase,
    RolloutStrategy,
    VersionedReplica,
    canary_replicas,
    picks_canary,
    plan_rollout,
)
from lamina.orchestration._rollout_control import RolloutControl
from lamina.orchestration._workload import ReplicaState, WorkloadSpec

R, S, D, U = ReplicaState.READY, ReplicaState.STARTING, ReplicaState.DEAD, ReplicaState.UNHEALTHY


class Fleet:
    """Replicas that obey the steps: started ones become ready on the next ``tick``; stopped ones go."""

    def __init__(self, version: str, n: int) -> None:
        self.replicas = {f"r{i}": VersionedReplica(f"r{i}", version, R) for i in range(n)}
        self.next = n

    def apply(self, start: int, stop: tuple[str, ...], version: str) -> None:
        for rid in stop:
            del self.replicas[rid]
        for _ in range(start):
            rid = f"r{self.next}"
            self.next += 1
            self.replicas[rid] = VersionedReplica(rid, version, S)

    def tick(self) -> None:
        self.replicas = {k: VersionedReplica(k, r.version, R) for k, r in self.replicas.items()}

    def ready(self) -> int:
        return sum(1 for r in self.replicas.values() if r.state is R)

    def versions(self) -> set[str]:
        return {r.version for r in self.replicas.values()}


def drive(rollout: Rollout, fleet: Fleet, desired: int, steps: int = 100) -> tuple[Rollout, list[int]]:
    """Run the plan until it finishes; returns the final rollout and the ready count after each step."""
    readiness: list[int] = []
    for _ in range(steps):
        step = plan_rollout(rollout, list(fleet.replicas.values()), desired)
        rollout = Rollout(step.stable, rollout.target, rollout.strategy, step.phase, 0.0, rollout.weight)
        if rollout.finished:
            return rollout, readiness
        fleet.apply(step.start, step.stop, rollout.target)
        readiness.append(fleet.ready())
        fleet.tick()
    raise AssertionError("the rollout did not finish")


@pytest.mark.parametrize("desired", [1, 2, 4])
def test_rolling_replaces_every_replica_without_losing_capacity(desired: int) -> None:
    fleet = Fleet("m@1", desired)
    rollout = Rollout.begin("m@1", "m@2", RolloutStrategy.ROLLING, now=0.0)
    final, readiness = drive(rollout, fleet, desired)
    assert final.phase is RolloutPhase.DONE and final.stable == "m@2"
    assert fleet.versions() == {"m@2"} and fleet.ready() == desired
    assert min(readiness) >= desired  # never fewer ready replicas than desired
    assert len(fleet.replicas) == desired  # the surge is gone at the end


def test_rolling_waits_for_the_new_replica_to_be_ready() -> None:
    rollout = Rollout.begin("m@1", "m@2", RolloutStrategy.ROLLING, now=0.0)
    replicas = [VersionedReplica("a", "m@1", R), VersionedReplica("b", "m@2", S)]
    step = plan_rollout(rollout, replicas, 1)
    assert (step.start, step.stop, step.phase) == (0, (), RolloutPhase.ROLLING)
    ready = [VersionedReplica("a", "m@1", R), VersionedReplica("b", "m@2", R)]
    assert plan_rollout(rollout, ready, 1).stop == ("a",)


def test_rolling_stops_a_broken_old_replica_first() -> None:
    rollout = Rollout.begin("m@1", "m@2", RolloutStrategy.ROLLING, now=0.0)
    replicas = [VersionedReplica("a", "m@1", R), VersionedReplica("b", "m@1", D)]
    assert plan_rollout(rollout, replicas, 2).stop == ("b",)


def test_a_failed_new_replica_is_not_multiplied() -> None:
    rollout = Rollout.begin("m@1", "m@2", RolloutStrategy.ROLLING, now=0.0)
    replicas = [VersionedReplica("a", "m@1", R), VersionedReplica("b", "m@2", D)]
    step = plan_rollout(rollout, replicas, 1)
    assert (step.start, step.stop) == (0, ())  # the controller restarts b; no second one


def test_canary_runs_beside_stable_then_promotes_rolling() -> None:
    fleet = Fleet("m@1", 4)
    rollout = Rollout.begin("m@1", "m@2", RolloutStrategy.CANARY, now=0.0, weight=50)
    for _ in range(3):
        step = plan_rollout(rollout, list(fleet.replicas.values()), 4)
        assert step.phase is RolloutPhase.CANARY and step.stop == ()
        fleet.apply(step.start, step.stop, "m@2")
        fleet.tick()
    counts = [r.version for r in fleet.replicas.values()]
    assert counts.count("m@1") == 4 and counts.count("m@2") == canary_replicas(4, 50) == 2
    final, readiness = drive(rollout.promote(), fleet, 4)
    assert final.phase is RolloutPhase.DONE and fleet.versions() == {"m@2"} and len(fleet.replicas) == 4
    assert min(readiness) >= 4


def test_canary_rollback_stops_only_the_canary() -> None:
    fleet = Fleet("m@1", 2)
    rollout = Rollout.begin("m@1", "m@2", RolloutStrategy.CANARY, now=0.0, weight=10)
    step = plan_rollout(rollout, list(fleet.replicas.values()), 2)
    assert step.start == 1
    fleet.apply(step.start, step.stop, "m@2")
    back = rollout.rollback("error rate")
    step = plan_rollout(back, list(fleet.replicas.values()), 2)
    assert step.phase is RolloutPhase.ROLLING_BACK and step.stop == ("r2",)
    fleet.apply(0, step.stop, "m@2")
    done = plan_rollout(back, list(fleet.replicas.values()), 2)
    assert done.phase is RolloutPhase.ROLLED_BACK and done.stable == "m@1"
    assert fleet.versions() == {"m@1"}


def test_rollout_commands_are_checked_and_state_round_trips() -> None:
    with pytest.raises(ConflictError, match="already runs"):
        Rollout.begin("m@1", "m@1", RolloutStrategy.ROLLING, now=0.0)
    with pytest.raises(ConfigError, match="1 to 99"):
        Rollout.begin("m@1", "m@2", RolloutStrategy.CANARY, now=0.0, weight=100)
    rolling = Rollout.begin("m@1", "m@2", RolloutStrategy.ROLLING, now=5.0)
    with pytest.raises(ConflictError, match="only a running canary"):
        rolling.promote()
    back = Rollout.begin("m@1", "m@2", RolloutStrategy.CANARY, now=5.0, weight=30).rollback("p95 too high")
    assert Rollout.from_json(back.to_json()) == back
    with pytest.raises(ConflictError, match="rolled_back already"):
        Rollout(**{**back.__dict__, "phase": RolloutPhase.ROLLED_BACK}).rollback()


@pytest.mark.parametrize("weight", [1, 10, 33, 50, 99])
def test_weighted_picks_are_exact_over_100(weight: int) -> None:
    for offset in (0, 17, 250):
        assert sum(picks_canary(offset + i, weight) for i in range(100)) == weight


def feed(
    judge: CanaryJudge, t: float, *, canary: bool, n: int, errors: int = 0, latency: float = 0.1
) -> None:
    for i in range(n):
        judge.record(t, canary=canary, status=500 if i < errors else 200, latency_s=latency)


def test_judge_holds_until_both_groups_have_enough_answers() -> None:
    judge = CanaryJudge(CanaryPolicy(window_s=60, min_requests=20))
    feed(judge, 0.0, canary=False, n=100)
    feed(judge, 0.0, canary=True, n=19, errors=19)
    assert judge.judge(1.0).action == "hold"


def test_judge_rolls_back_on_error_rate_above_the_margin() -> None:
    judge = CanaryJudge(CanaryPolicy(window_s=60, min_requests=20, max_error_rate_increase=0.05))
    feed(judge, 0.0, canary=False, n=100, errors=2)
    feed(judge, 0.0, canary=True, n=20, errors=1)  # 5 % vs 2 %: within 5 points
    assert judge.judge(1.0).action == "hold"
    feed(judge, 2.0, canary=True, n=20, errors=3)  # 4 of 40 = 10 %: 8 points worse
    verdict = judge.judge(3.0)
    assert verdict.action == "rollback" and "error rate 10.0%" in verdict.reason


def test_judge_rolls_back_on_p95_latency_and_forgets_old_answers() -> None:
    judge = CanaryJudge(CanaryPolicy(window_s=10, min_requests=20, max_latency_ratio=2.0))
    feed(judge, 0.0, canary=False, n=40, latency=0.1)
    feed(judge, 0.0, canary=True, n=40, latency=0.5)
    verdict = judge.judge(1.0)
    assert verdict.action == "rollback" and "p95" in verdict.reason
    assert verdict.canary.p95_s == pytest.approx(0.5)
    assert judge.judge(20.0).action == "hold"  # the window moved on: nothing left to compare


def test_judge_promotes_after_a_healthy_period() -> None:
    judge = CanaryJudge(CanaryPolicy(window_s=60, min_requests=5, promote_after_s=30))
    feed(judge, 0.0, canary=False, n=10)
    feed(judge, 0.0, canary=True, n=10, latency=0.12)
    assert judge.judge(1.0).action == "hold"
    feed(judge, 30.0, canary=False, n=10)
    feed(judge, 30.0, canary=True, n=10)
    assert judge.judge(31.0).action == "promote"


def test_canary_policy_is_checked() -> None:
    with pytest.raises(ConfigError):
        CanaryPolicy(max_latency_ratio=1.0)
    with pytest.raises(ConfigError):
        CanaryPolicy(min_requests=0)


def control_of(
    versions: dict[str, str], policy: CanaryPolicy | None
) -> tuple[RolloutControl, DeploymentRecord]:
    spec = WorkloadSpec("m", ("worker",), replicas=2)
    dep = DeploymentRecord(spec, desired=2, version="m@1")
    for rid, version in versions.items():
        dep.replicas[rid] = ReplicaRecord(rid, "m", R, 0.0, version=version)
    rollout = Rollout.begin("m@1", "m@2", RolloutStrategy.CANARY, now=0.0, weight=25)
    judge = None if policy is None else CanaryJudge(policy)
    return RolloutControl(rollout, WorkloadSpec("m", ("worker", "v2")), judge), dep


def test_the_judge_rolls_a_canary_back_at_the_next_step() -> None:
    control, dep = control_of({"m-0": "m@1", "m-1": "m@1", "m-2": "m@2"}, CanaryPolicy(min_requests=10))
    for i in range(20):
        control.observe("m@1", 200, 0.1, now=float(i))
        control.observe("m@2", 503 if i % 2 else 200, 0.1, now=float(i))
    step = control.step(dep, now=20.0)
    assert step is not None and step.phase is RolloutPhase.ROLLING_BACK and step.stop == ("m-2",)
    assert control.rollout.reason is not None and control.rollout.reason.startswith("automatic: canary error")


def test_routing_gives_the_canary_its_weight_and_done_makes_the_target_the_spec() -> None:
    control, dep = control_of({"m-0": "m@1", "m-1": "m@1", "m-2": "m@2"}, None)
    ready = [r.status() for r in dep.replicas.values()]
    picked = [control.route(ready) for _ in range(100)]
    assert sum(1 for group in picked if {r.version for r in group} == {"m@2"}) == 25
    assert all(len({r.version for r in group}) == 1 for group in picked)
    control.promote()
    for rid in ("m-0", "m-1"):
        del dep.replicas[rid]
    dep.replicas["m-3"] = ReplicaRecord("m-3", "m", R, 0.0, version="m@2")
    step = control.step(dep, now=1.0)
    assert step is not None and step.phase is RolloutPhase.DONE
    assert dep.spec == control.target_spec and dep.version == "m@2"
    assert control.route(ready) == ready  # no split once done


def test_a_request_pinned_to_a_version_goes_to_its_replicas_whatever_the_weight() -> None:
    """Query embeddings must come from the model that embedded the dataset, canary or not."""
    control, dep = control_of({"m-0": "m@1", "m-1": "", "m-2": "m@2"}, None)  # "": never labelled
    ready = [r.status() for r in dep.replicas.values()]
    for _ in range(20):
        assert {r.version for r in control.route(ready, "m@2")} == {"m@2"}
        assert {r.replica_id for r in control.route(ready, "m@1")} == {"m-0", "m-1"}
    only_new = [r for r in ready if r.version == "m@2"]
    assert control.route(only_new, "m@1") == only_new  # none of m@1 left: not held up
