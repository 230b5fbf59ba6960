"""The job queue's decisions as a pure function of a frozen context: which queued jobs start, on what,
and which running jobs are preempted to make room (for serving, or for a job of higher priority).

The scheduler (``_job_runner``) gathers the context (what the machine has free after the serving
replicas, the running jobs with their placements, the waiting jobs, the time) and carries out the
decision; this module never touches a process or the store, so it is tested table-driven with a fake
clock.

The rules, in order:

1. Serving first. When the serving replicas grow into what running jobs hold (autoscaling, a new
   deployment), running jobs are preempted, lowest priority first and newest first among equals, until
   nothing is overcommitted. Only jobs that hold some of an overcommitted resource are preempted.
2. Waiting jobs are taken by priority (higher first), then age (older first). A job whose retry backoff
   has not passed waits. A job that fits in what is free starts (placed best-fit, so big holes stay
   open). A job that does not fit may preempt running jobs of strictly lower priority, lowest first,
   and starts when enough of them are stopped; jobs of equal priority never preempt each other.
3. A job that could not fit even on the empty machine (its request exceeds the totals) is failed with
   the numbers, instead of waiting forever. Other waiting jobs get a reason (what is missing).

Smaller jobs behind a waiting big one may start (backfill); the big one can still preempt them later
when their priority is lower. The rejected alternative, strict head-of-line order, leaves the machine
idle while a job waits for resources that serving holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from lamina.compute import FULL_GPU, ClusterSnapshot, Demand, NodeState, Placement, apply, best_fit
from lamina.orchestration._policy import restart_delay

_MIB = 1 << 20


@dataclass(frozen=True)
class WaitingJob:
    """A queued (or preempted) job. Times are the clock's seconds."""

    job_id: str
    priority: int
    created: float
    demand: Demand
    #: a retry waits until then (its backoff); 0: now
    not_before: float = 0.0


@dataclass(frozen=True)
class RunningJob:
    job_id: str
    priority: int
    started: float
    placement: Placement


@dataclass(frozen=True)
class QueueContext:
    """``free``: what the machine has after the serving replicas (running jobs not yet taken off);
    ``total``: the machine with nothing running, to tell a job that can never fit."""

    free: ClusterSnapshot
    total: ClusterSnapshot
    running: tuple[RunningJob, ...]
    waiting: tuple[WaitingJob, ...]
    now: float


@dataclass(frozen=True)
class QueueDecision:
    """``preempt`` before ``start``: the preempted jobs' resources are what the started ones take."""

    start: tuple[tuple[str, Placement], ...] = ()
    preempt: tuple[str, ...] = ()
    #: jobs that can never fit here, with why
    unfit: tuple[tuple[str, str], ...] = ()
    #: why each job that waits for resources waits
    waiting: dict[str, str] = field(default_factory=dict)
    #: jobs whose retry backoff has not passed yet
    backoff: tuple[str, ...] = ()


def job_demand(cpus: float, memory_bytes: int, gpus: int = 0, gpu_milli: int = 0) -> Demand:
    """A job's request as placement sees it: ``gpus`` whole GPUs, or ``gpu_milli`` (1..999) of one."""
    if gpus < 0 or cpus < 0 or memory_bytes < 0 or gpu_milli < 0:
        raise ValueError("a job's resources are never negative")
    if gpus and 0 < gpu_milli < FULL_GPU:
        raise ValueError(f"ask for {gpus} whole GPUs or {gpu_milli} milli of one, not both")
    if gpus == 0 and gpu_milli == 0:
        return Demand(cpu_milli=round(cpus * 1000), memory_bytes=memory_bytes)
    share = gpu_milli if gpus == 0 else FULL_GPU
    return Demand(
        cpu_milli=round(cpus * 1000), memory_bytes=memory_bytes, num_gpus=max(gpus, 1), gpu_milli=share
    )


def retry_delay(failures: int, base_s: float, max_s: float) -> float:
    """Seconds a job that has failed ``failures`` times waits before its next attempt: ``base_s``, then
    doubling, capped at ``max_s`` (the replicas' restart backoff)."""
    return restart_delay(max(failures - 1, 0), base_s, max_s)


def release(snapshot: ClusterSnapshot, placement: Placement) -> ClusterSnapshot:
    """The snapshot after what ``placement`` took is given back."""
    d, taken = placement.demand, set(placement.gpus)

    def back(node: NodeState) -> NodeState:
        return replace(
            node,
            cpu_milli_free=node.cpu_milli_free + d.cpu_milli,
            memory_free_bytes=node.memory_free_bytes + d.memory_bytes,
            gpus=tuple(
                replace(
                    g,
                    milli_free=g.milli_free + d.gpu_milli,
                    memory_free_bytes=g.memory_free_bytes + d.gpu_memory_bytes,
                )
                if g.index in taken
                else g
                for g in node.gpus
            ),
        )

    return ClusterSnapshot(tuple(back(n) if n.name == placement.node else n for n in snapshot.nodes))


def reserve(snapshot: ClusterSnapshot, demands: Sequence[Demand]) -> ClusterSnapshot:
    """The snapshot after ``demands`` (the serving replicas, already running) took their share: each
    placed best-fit, or, when it cannot be, taken from the first node anyway (overcommitted: rule 1
    then preempts jobs)."""
    for demand in demands:
        found = best_fit(snapshot, demand)
        if found is None and snapshot.nodes:
            cpu_mem = Demand(cpu_milli=demand.cpu_milli, memory_bytes=demand.memory_bytes)
            found = Placement(snapshot.nodes[0].name, (), cpu_mem)
        if found is not None:
            snapshot = apply(snapshot, found)
    return snapshot


def _over(snapshot: ClusterSnapshot) -> set[tuple[str, str]]:
    """The (node, resource) pairs that are overcommitted: "cpu", "memory" or "gpu<index>"."""
    over: set[tuple[str, str]] = set()
    for n in snapshot.nodes:
        if n.cpu_milli_free < 0:
            over.add((n.name, "cpu"))
        if n.memory_free_bytes < 0:
            over.add((n.name, "memory"))
        over |= {(n.name, f"gpu{g.index}") for g in n.gpus if g.milli_free < 0 or g.memory_free_bytes < 0}
    return over


def _holds(placement: Placement, over: set[tuple[str, str]]) -> bool:
    d, node = placement.demand, placement.node
    held = {"cpu"} if d.cpu_milli > 0 else set()
    held |= {"memory"} if d.memory_bytes > 0 else set()
    held |= {f"gpu{i}" for i in placement.gpus}
    return any((node, r) in over for r in held)


def _victim_order(jobs: Sequence[RunningJob]) -> list[RunningJob]:
    """Who goes first when something must stop: lowest priority, then the newest (least work lost)."""
    return sorted(jobs, key=lambda j: (j.priority, -j.started, j.job_id))


def _make_room_for_serving(
    snapshot: ClusterSnapshot, running: Sequence[RunningJob]
) -> tuple[ClusterSnapshot, list[str]]:
    preempted: list[str] = []
    for job in _victim_order(running):
        over = _over(snapshot)
        if not over:
            break
        if _holds(job.placement, over):
            snapshot = release(snapshot, job.placement)
            preempted.append(job.job_id)
    return snapshot, preempted


def _shortfall(snapshot: ClusterSnapshot, demand: Demand) -> str:
    """What the roomiest node lacks for ``demand``, in words."""
    if not snapshot.nodes:
        return "no node to run on"
    node = max(snapshot.nodes, key=lambda n: (n.cpu_milli_free, n.memory_free_bytes, n.gpu_milli_free))
    parts = []
    if node.cpu_milli_free < demand.cpu_milli:
        parts.append(f"{demand.cpu_milli / 1000:g} CPUs wanted, {max(node.cpu_milli_free, 0) / 1000:g} free")
    if node.memory_free_bytes < demand.memory_bytes:
        free = max(node.memory_free_bytes, 0) / _MIB
        parts.append(f"{demand.memory_bytes / _MIB:.0f} MiB wanted, {free:.0f} MiB free")
    if demand.num_gpus:
        usable = sum(1 for g in node.gpus if g.milli_free >= demand.gpu_milli)
        if demand.shares_gpu:
            parts.append(f"{demand.gpu_milli} milli-GPU wanted, {usable} GPUs have that much free")
        else:
            parts.append(f"{demand.num_gpus} GPUs wanted, {usable} free")
    return "; ".join(parts) or "does not fit"


def _held_by_serving(free: ClusterSnapshot, demand: Demand) -> str:
    """When the serving replicas alone leave too little for ``demand`` (``free`` is the machine after
    serving), what they hold of the CPUs or memory it lacks, in words: why a job waits on a machine that
    looks idle. Empty when it waits for running jobs instead."""
    if not free.nodes or best_fit(free, demand) is not None:
        return ""
    parts = []
    if max(n.cpu_milli_free for n in free.nodes) < demand.cpu_milli:
        total = sum(n.cpu_milli_total for n in free.nodes)
        held = total - sum(n.cpu_milli_free for n in free.nodes)
        parts.append(f"{held / 1000:g} of the {total / 1000:g} CPUs")
    if max(n.memory_free_bytes for n in free.nodes) < demand.memory_bytes:
        total = sum(n.memory_total_bytes for n in free.nodes)
        held = total - sum(n.memory_free_bytes for n in free.nodes)
        parts.append(f"{held / _MIB:.0f} of the {total / _MIB:.0f} MiB")
    if not parts:
        return ""
    share = (
        "; with `jobs.nice` above 0, jobs use the cores the replicas leave idle, at a lower priority"
        if "CPUs" in parts[0]
        else ""
    )
    return f" (the serving replicas hold {' and '.join(parts)}; it starts when serving scales down{share})"


def _preempt_for(
    snapshot: ClusterSnapshot, job: WaitingJob, running: Sequence[RunningJob]
) -> tuple[ClusterSnapshot, list[str], Placement] | None:
    """Stop running jobs of lower priority (lowest first) until ``job`` fits; None when even all of them
    are not enough."""
    trial, victims = snapshot, []
    for other in _victim_order([r for r in running if r.priority < job.priority]):
        trial = release(trial, other.placement)
        victims.append(other.job_id)
        found = best_fit(trial, job.demand)
        if found is not None:
            return apply(trial, found), victims, found
    return None


def schedule_jobs(ctx: QueueContext) -> QueueDecision:
    """What the scheduler does now (the module docstring states the rules)."""
    snapshot = ctx.free
    for held in ctx.running:
        snapshot = apply(snapshot, held.placement)
    snapshot, preempted = _make_room_for_serving(snapshot, ctx.running)
    running = [r for r in ctx.running if r.job_id not in preempted]
    start: list[tuple[str, Placement]] = []
    unfit: list[tuple[str, str]] = []
    waiting: dict[str, str] = {}
    backoff: list[str] = []
    for job in sorted(ctx.waiting, key=lambda j: (-j.priority, j.created, j.job_id)):
        if job.not_before > ctx.now:
            backoff.append(job.job_id)
            continue
        found = best_fit(snapshot, job.demand)
        if found is not None:
            snapshot = apply(snapshot, found)
            start.append((job.job_id, found))
            continue
        if best_fit(ctx.total, job.demand) is None:
            unfit.append((job.job_id, f"it can never fit here: {_shortfall(ctx.total, job.demand)}"))
            continue
        made = _preempt_for(snapshot, job, running)
        if made is None:
            by_serving = _held_by_serving(ctx.free, job.demand)
            waiting[job.job_id] = f"waiting for resources: {_shortfall(snapshot, job.demand)}{by_serving}"
            continue
        snapshot, victims, found = made
        preempted += victims
        running = [r for r in running if r.job_id not in victims]
        start.append((job.job_id, found))
    return QueueDecision(
        start=tuple(start),
        preempt=tuple(preempted),
        unfit=tuple(unfit),
        waiting=waiting,
        backoff=tuple(backoff),
    )
