"""Orchestration's policies, table-driven: pure functions of a frozen context and a given time."""

from __future__ import annotations

import pytest

from lamina.orchestration import (
    Plan,
    ReconcileTimings,
    ReplicaLoad,
    ReplicaState,
    ReplicaView,
    pick_replica,
    reconcile_plan,
    restart_delay,
)

S = ReplicaState
TIMINGS = ReconcileTimings(ready_timeout_s=10.0, backoff_s=0.5, backoff_max_s=4.0)


@pytest.mark.parametrize(
    ("restarts", "base", "cap", "expected"),
    [
        (0, 0.5, 30.0, 0.5),
        (1, 0.5, 30.0, 1.0),
        (2, 0.5, 30.0, 2.0),
        (5, 0.5, 30.0, 16.0),
        (6, 0.5, 30.0, 30.0),
        (10_000, 0.5, 30.0, 30.0),  # no overflow, just the cap
        (-3, 0.5, 30.0, 0.5),
        (0, 1.0, 0.25, 0.25),  # the cap wins even on the first restart
        (4, 0.0, 30.0, 0.0),  # no backoff configured
    ],
)
def test_restart_delay_doubles_up_to_the_cap(restarts: int, base: float, cap: float, expected: float) -> None:
    assert restart_delay(restarts, base, cap) == expected


@pytest.mark.parametrize(
    ("loads", "counter", "expected"),
    [
        ([("a", 0)], 0, "a"),
        ([("a", 3), ("b", 1), ("c", 2)], 0, "b"),
        ([("a", 3), ("b", 1), ("c", 2)], 7, "b"),  # no tie: the counter does not matter
        ([("a", 1), ("b", 1), ("c", 5)], 0, "a"),  # tie between a and b: round-robin
        ([("a", 1), ("b", 1), ("c", 5)], 1, "b"),
        ([("a", 1), ("b", 1), ("c", 5)], 2, "a"),
        ([("a", 9), ("b", 9), ("c", 9)], 5, "c"),
    ],
)
def test_pick_replica_takes_the_least_loaded_and_breaks_ties_round_robin(
    loads: list[tuple[str, int]], counter: int, expected: str
) -> None:
    assert pick_replica([ReplicaLoad(rid, n) for rid, n in loads], counter) == expected


def test_pick_replica_spreads_an_idle_set_evenly() -> None:
    idle = [ReplicaLoad(rid, 0) for rid in ("a", "b", "c")]
    assert [pick_replica(idle, i) for i in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_pick_replica_needs_a_candidate() -> None:
    with pytest.raises(ValueError, match="at least one ready replica"):
        pick_replica([], 0)


def _views(*rows: tuple[str, ReplicaState, float, int]) -> list[ReplicaView]:
    return [ReplicaView(rid, state, since, failures) for rid, state, since, failures in rows]


@pytest.mark.parametrize(
    ("desired", "replicas", "now", "expected"),
    [
        pytest.param(2, [], 0.0, Plan(start=2), id="nothing-running"),
        pytest.param(2, _views(("r0", S.READY, 0, 0), ("r1", S.STARTING, 1, 0)), 5.0, Plan(), id="steady"),
        pytest.param(0, [], 0.0, Plan(), id="zero-desired"),
        pytest.param(
            1,
            _views(("r0", S.READY, 0, 0), ("r1", S.READY, 0, 0), ("r2", S.READY, 0, 0)),
            1.0,
            Plan(stop=("r2", "r1")),
            id="scale-down-stops-newest",
        ),
        pytest.param(
            1,
            _views(("r0", S.READY, 0, 0), ("r1", S.DEAD, 0, 1), ("r2", S.STARTING, 0, 0)),
            1.0,
            Plan(stop=("r1", "r2")),
            id="scale-down-stops-dead-then-starting-before-ready",
        ),
        pytest.param(
            2, _views(("r0", S.READY, 0, 0), ("r1", S.DEAD, 10.0, 1)), 10.4, Plan(), id="dead-in-backoff"
        ),
        pytest.param(
            2,
            _views(("r0", S.READY, 0, 0), ("r1", S.DEAD, 10.0, 1)),
            10.5,
            Plan(restart=("r1",)),
            id="dead-backoff-over",
        ),
        pytest.param(
            1, _views(("r0", S.DEAD, 10.0, 3)), 11.9, Plan(), id="third-failure-waits-four-times-base"
        ),
        pytest.param(1, _views(("r0", S.DEAD, 10.0, 3)), 12.0, Plan(restart=("r0",)), id="then-restarts"),
        pytest.param(1, _views(("r0", S.DEAD, 10.0, 9)), 14.0, Plan(restart=("r0",)), id="backoff-capped"),
        pytest.param(1, _views(("r0", S.STARTING, 0, 0)), 10.0, Plan(), id="starting-within-timeout"),
        pytest.param(1, _views(("r0", S.STARTING, 0, 0)), 10.01, Plan(fail=("r0",)), id="starting-timed-out"),
        pytest.param(1, _views(("r0", S.UNHEALTHY, 5, 0)), 15.5, Plan(fail=("r0",)), id="unhealthy-too-long"),
        pytest.param(
            2,
            _views(("r0", S.STOPPING, 0, 0), ("r1", S.READY, 0, 0)),
            1.0,
            Plan(start=1),
            id="stopping-counts-for-nothing",
        ),
    ],
)
def test_reconcile_plan(desired: int, replicas: list[ReplicaView], now: float, expected: Plan) -> None:
    assert reconcile_plan(desired, replicas, now, TIMINGS) == expected
