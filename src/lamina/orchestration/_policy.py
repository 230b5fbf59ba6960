"""The decisions of orchestration as pure functions of a frozen context, with the clock passed in.

The controller and the dispatcher gather the facts (replica states, in-flight counts, the time) and apply
what these functions decide; keeping the two apart lets the policies be tested table-driven, without
processes and without sleeping.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lamina.orchestration._workload import ReplicaState

#: beyond this many doublings the delay is capped anyway; bounding the exponent avoids float overflow
_MAX_DOUBLINGS = 62

#: which replicas go first when scaling down: the least useful ones
_STOP_ORDER = {
    ReplicaState.DEAD: 0,
    ReplicaState.UNHEALTHY: 1,
    ReplicaState.STARTING: 2,
    ReplicaState.READY: 3,
}


def restart_delay(restarts: int, base_s: float, max_s: float) -> float:
    """Seconds to wait before restarting a replica that has failed ``restarts + 1`` times in a row.

    Exponential backoff (``base_s``, ``2 * base_s``, ``4 * base_s`` ...) capped at ``max_s``, so a workload
    that crashes at start does not spin the machine, yet a one-off crash is restarted at once.
    """
    if restarts <= 0:
        return min(base_s, max_s)
    return min(base_s * 2.0 ** min(restarts, _MAX_DOUBLINGS), max_s)


@dataclass(frozen=True)
class ReplicaLoad:
    """A ready replica and the requests this gateway has in flight on it."""

    replica_id: str
    in_flight: int


def pick_replica(candidates: Sequence[ReplicaLoad], counter: int) -> str:
    """The least-loaded candidate; ties go round-robin by ``counter`` (the caller's pick count).

    Requests are never refused for load: the least-loaded replica queues them. Raises ValueError when
    there is no candidate (the dispatcher waits for a ready replica before asking).
    """
    if not candidates:
        raise ValueError("pick_replica needs at least one ready replica")
    fewest = min(c.in_flight for c in candidates)
    tied = [c.replica_id for c in candidates if c.in_flight == fewest]
    return tied[counter % len(tied)]


@dataclass(frozen=True)
class ReplicaView:
    """What the reconcile policy needs to know of one replica.

    ``since`` is the clock reading of the last state change; ``failures`` counts failures (crashes,
    start timeouts) since the replica was last ready, and sets the restart backoff; ``failed_checks``
    counts the health checks in a row that a replica which had been ready has failed.
    """

    replica_id: str
    state: ReplicaState
    since: float
    failures: int = 0
    failed_checks: int = 0


@dataclass(frozen=True)
class Plan:
    """What one reconcile pass does for one deployment.

    ``start``: new replicas to create; ``stop``: replicas to stop and forget (beyond the desired count);
    ``restart``: dead replicas whose backoff has passed; ``fail``: live replicas that stayed starting or
    unhealthy too long, or failed too many health checks in a row, to be stopped and marked dead
    (restarted later after backoff).
    """

    start: int = 0
    stop: tuple[str, ...] = ()
    restart: tuple[str, ...] = ()
    fail: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReconcileTimings:
    """The deployment's limits: times in the clock's seconds, and the health checks a replica may fail.

    ``unhealthy_checks``: a replica that was ready is replaced once it has failed this many health checks
    in a row (a check fails on any answer but 200, or none within the timeout). The first failed check
    already takes it out of rotation; the count only decides when to give up on it and start another.
    """

    ready_timeout_s: float
    backoff_s: float
    backoff_max_s: float
    unhealthy_checks: int = 3


def _excess(desired: int, replicas: Sequence[ReplicaView]) -> tuple[str, ...]:
    """Replicas to stop when there are more than desired: dead first, ready last, newest first."""
    extra = len(replicas) - max(desired, 0)
    if extra <= 0:
        return ()
    ranked = sorted(enumerate(replicas), key=lambda pair: (_STOP_ORDER.get(pair[1].state, -1), -pair[0]))
    return tuple(r.replica_id for _, r in ranked[:extra])


def _given_up(replica: ReplicaView, now: float, timings: ReconcileTimings) -> bool:
    """Whether a live replica is to be replaced: starting or unhealthy for longer than the ready timeout,
    or unhealthy after failing ``unhealthy_checks`` health checks in a row."""
    if replica.state not in (ReplicaState.STARTING, ReplicaState.UNHEALTHY):
        return False
    if now - replica.since > timings.ready_timeout_s:
        return True
    return replica.state is ReplicaState.UNHEALTHY and replica.failed_checks >= timings.unhealthy_checks


def reconcile_plan(
    desired: int, replicas: Sequence[ReplicaView], now: float, timings: ReconcileTimings
) -> Plan:
    """Compare the desired replica count with the replicas there are (in creation order), and decide.

    Replicas in STOPPING are on their way out and count for nothing.
    """
    live = [r for r in replicas if r.state is not ReplicaState.STOPPING]
    stop = _excess(desired, live)
    kept = [r for r in live if r.replica_id not in stop]
    restart = tuple(
        r.replica_id
        for r in kept
        if r.state is ReplicaState.DEAD
        and now - r.since >= restart_delay(r.failures - 1, timings.backoff_s, timings.backoff_max_s)
    )
    fail = tuple(r.replica_id for r in kept if _given_up(r, now, timings))
    return Plan(start=max(desired - len(live), 0), stop=stop, restart=restart, fail=fail)
