"""The job queue's policy (``schedule_jobs``): priority then age, fit, backfill, preemption for serving and
for higher-priority jobs, retry backoff; pure functions on hand-built snapshots and a clock in seconds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pytest

from lamina.compute import ClusterSnapshot, CPUInfo, Demand, GPUState, NodeInventory, NodeState, Placement
from lamina.config import JobsConfig, LaminaConfig
from lamina.orchestration import (
    DeploymentStatus,
    QueueContext,
    ReplicaState,
    ReplicaStatus,
    Resources,
    RunningJob,
    WaitingJob,
    WorkloadSpec,
    job_demand,
    reserve,
    retry_delay,
    schedule_jobs,
)
from lamina.stack import job_capacity, serving_demands

GIB = 1 << 30
NOW = 1_000.0


def machine(cpus: float = 4, memory_gib: int = 8, gpus: int = 0) -> ClusterSnapshot:
    milli, mem = round(cpus * 1000), memory_gib * GIB
    node = NodeState(
        "n1",
        milli,
        mem,
        tuple(GPUState(i) for i in range(gpus)),
        cpu_milli_total=milli,
        memory_total_bytes=mem,
    )
    return ClusterSnapshot((node,))


def waiting(
    job_id: str, cpus: float = 1, *, priority: int = 0, created: float = 0, **kw: float
) -> WaitingJob:
    memory = int(kw.pop("memory_gib", 0) * GIB)
    return WaitingJob(job_id, priority, created, job_demand(cpus, memory), not_before=kw.get("not_before", 0))


def running(job_id: str, cpus: float = 1, *, priority: int = 0, started: float = 0) -> RunningJob:
    return RunningJob(job_id, priority, started, Placement("n1", (), job_demand(cpus, 0)))


def decide(jobs: list[WaitingJob], run: Sequence[RunningJob] = ()) -> tuple[list[str], list[str]]:
    whole = machine()
    d = schedule_jobs(QueueContext(whole, whole, tuple(run), tuple(jobs), NOW))
    return [job_id for job_id, _ in d.start], list(d.preempt)


@pytest.mark.parametrize(
    ("jobs", "started"),
    [
        # all fit: all start, higher priority first, then older first
        (
            [waiting("a", 1, created=2), waiting("b", 1, priority=5, created=3), waiting("c", 1, created=1)],
            ["b", "c", "a"],
        ),
        # only one 3-core job fits in 4: the higher priority one, whatever its age
        ([waiting("old", 3, created=1), waiting("urgent", 3, priority=1, created=9)], ["urgent"]),
        # equal priority: the older one
        ([waiting("new", 3, created=9), waiting("old", 3, created=1)], ["old"]),
        # backfill: the 1-core job starts beside the running 3-core one while a 2-core job waits
        (
            [waiting("big", 3, created=1), waiting("mid", 2, created=2), waiting("small", 1, created=3)],
            ["big", "small"],
        ),
    ],
)
def test_priority_then_age_and_fit(jobs: list[WaitingJob], started: list[str]) -> None:
    assert decide(jobs)[0] == started


def test_a_job_waits_for_its_backoff() -> None:
    whole = machine()
    d = schedule_jobs(QueueContext(whole, whole, (), (waiting("r", not_before=NOW + 30),), NOW))
    assert d.start == ()
    assert (d.backoff, d.waiting) == (("r",), {})
    later = schedule_jobs(QueueContext(whole, whole, (), (waiting("r", not_before=NOW + 30),), NOW + 30))
    assert [j for j, _ in later.start] == ["r"]


def test_a_job_bigger_than_the_machine_is_refused_with_the_numbers() -> None:
    whole = machine(cpus=2, memory_gib=1)
    d = schedule_jobs(QueueContext(whole, whole, (), (waiting("huge", 8, memory_gib=2),), NOW))
    assert d.start == ()
    [(job_id, reason)] = d.unfit
    assert job_id == "huge"
    assert "8 CPUs wanted, 2 free" in reason and "2048 MiB wanted, 1024 MiB free" in reason


def test_a_job_that_fits_later_waits_with_what_is_missing() -> None:
    started, preempted = decide([waiting("b", 3, priority=1)], [running("a", 2, priority=1)])
    assert (started, preempted) == ([], [])
    whole = machine()
    d = schedule_jobs(
        QueueContext(whole, whole, (running("a", 2, priority=1),), (waiting("b", 3, priority=1),), NOW)
    )
    assert d.waiting == {"b": "waiting for resources: 3 CPUs wanted, 2 free"}  # for a job: no word of serving


def test_a_job_that_waits_for_serving_says_what_the_replicas_hold() -> None:
    """On a 2-core laptop the default deployments reserve 3 CPUs: a job waits with the reason, not a
    bare "0 free" on a machine that looks idle."""
    whole = machine(cpus=2)
    (node,) = whole.nodes
    after_serving = ClusterSnapshot((replace(node, cpu_milli_free=-1000, memory_free_bytes=7 * GIB),))
    d = schedule_jobs(QueueContext(after_serving, whole, (), (waiting("embed", 1),), NOW))
    assert d.waiting == {
        "embed": "waiting for resources: 1 CPUs wanted, 0 free (the serving replicas hold 3 of the 2 CPUs; "
        "it starts when serving scales down; with `jobs.nice` above 0, jobs use the cores the replicas leave "
        "idle, at a lower priority)"
    }
    d = schedule_jobs(QueueContext(after_serving, whole, (), (waiting("big", 0.5, memory_gib=8),), NOW))
    assert "the serving replicas hold 3 of the 2 CPUs and 1024 of the 8192 MiB" in d.waiting["big"]


@pytest.mark.parametrize(
    ("run", "job", "preempted"),
    [
        # a higher-priority job preempts a lower one that holds what it needs
        ([running("low", 4, priority=0)], waiting("high", 2, priority=5), ["low"]),
        # lowest priority first; among equals the newest (least work lost); no more than needed
        (
            [
                running("p1-old", 1, priority=1, started=1),
                running("p0", 1, priority=0, started=1),
                running("p1-new", 1, priority=1, started=5),
                running("p2", 1, priority=2, started=9),
            ],
            waiting("high", 2, priority=3),
            ["p0", "p1-new"],
        ),
        # equal priority never preempts
        ([running("same", 4, priority=1)], waiting("also", 2, priority=1), []),
        # lower priority never preempts
        ([running("high", 4, priority=3)], waiting("low", 2, priority=0), []),
    ],
)
def test_preemption_by_priority(run: list[RunningJob], job: WaitingJob, preempted: list[str]) -> None:
    started, got = decide([job], run)
    assert got == preempted
    assert started == ([job.job_id] if preempted else [])


def test_preemption_that_cannot_make_room_preempts_nothing() -> None:
    # even without the low job, the high one (4 cores) does not fit beside the higher-priority 2-core job
    run = [running("low", 1, priority=0), running("top", 2, priority=9)]
    assert decide([waiting("high", 4, priority=5)], run) == ([], [])


def test_serving_growth_preempts_lowest_priority_jobs_until_nothing_is_overcommitted() -> None:
    whole = machine(cpus=4)
    # serving now holds 3 of the 4 cores: the jobs (2 + 1 + 1 cores) must shed 3
    free = reserve(whole, [Demand(cpu_milli=3000)])
    run = (running("keep", 1, priority=9), running("low", 2, priority=0), running("mid", 1, priority=5))
    d = schedule_jobs(QueueContext(free, whole, run, (), NOW))
    assert list(d.preempt) == ["low", "mid"]


def test_serving_preemption_spares_jobs_that_hold_none_of_what_is_short() -> None:
    whole = machine(cpus=4, memory_gib=4)
    free = reserve(whole, [Demand(memory_bytes=3 * GIB)])  # memory is short, CPUs are not
    cpu_only = RunningJob("cpu-only", 0, 0, Placement("n1", (), job_demand(2, 0)))
    hungry = RunningJob("hungry", 5, 0, Placement("n1", (), job_demand(0, 2 * GIB)))
    d = schedule_jobs(QueueContext(free, whole, (cpu_only, hungry), (), NOW))
    assert list(d.preempt) == ["hungry"]


def test_gpu_jobs_take_whole_gpus_or_shares() -> None:
    whole = machine(cpus=8, gpus=2)
    jobs = (
        WaitingJob("two", 1, 1, job_demand(1, 0, gpus=2)),
        WaitingJob("half", 0, 2, job_demand(1, 0, gpu_milli=500)),
    )
    d = schedule_jobs(QueueContext(whole, whole, (), jobs, NOW))
    assert [(j, p.gpus) for j, p in d.start] == [("two", (0, 1))]
    assert "milli-GPU" in d.waiting["half"]
    with pytest.raises(ValueError, match="whole GPUs or 500 milli"):
        job_demand(1, 0, gpus=2, gpu_milli=500)


@pytest.mark.parametrize(
    ("failures", "delay"), [(0, 5.0), (1, 5.0), (2, 10.0), (3, 20.0), (6, 160.0), (7, 300.0), (500, 300.0)]
)
def test_retry_backoff_doubles_up_to_its_cap(failures: int, delay: float) -> None:
    assert retry_delay(failures, 5.0, 300.0) == delay


def test_serving_holds_each_deployments_replicas_times_its_resources() -> None:
    spec = WorkloadSpec("chat", ("x",), resources=Resources(cpus=1.5, memory_mb=100, gpus=0))
    replica = ReplicaStatus("chat-0", "chat", ReplicaState.READY, 1, None, 0)
    statuses = [
        DeploymentStatus("chat", desired=3, replicas=(replica,)),  # scaling up: the desired count holds
        DeploymentStatus("gone", desired=1, replicas=()),  # no workload known: holds nothing
    ]
    demands = serving_demands(lambda: statuses, lambda: [spec])()
    assert demands == [Demand(cpu_milli=1500, memory_bytes=100 << 20)] * 3
    # jobs below serving's OS priority (jobs.nice > 0) use the CPUs idle replicas leave: only memory holds
    below = serving_demands(lambda: statuses, lambda: [spec], cpus=False)()
    assert below == [Demand(cpu_milli=0, memory_bytes=100 << 20)] * 3
    whole = machine(cpus=2)
    (node,) = whole.nodes

    def after(held: list[Demand]) -> ClusterSnapshot:
        cpu, memory = sum(d.cpu_milli for d in held), sum(d.memory_bytes for d in held)
        free = replace(node, cpu_milli_free=2000 - cpu, memory_free_bytes=node.memory_free_bytes - memory)
        return ClusterSnapshot((free,))

    job = waiting("embed", 2)
    held = schedule_jobs(QueueContext(after(demands), whole, (), (job,), NOW))
    assert held.start == () and "the serving replicas hold 4.5 of the 2 CPUs" in held.waiting["embed"]
    shared = schedule_jobs(QueueContext(after(below), whole, (), (job,), NOW))
    assert [j for j, _ in shared.start] == ["embed"]


def test_the_queue_shares_the_configured_totals_or_the_machines() -> None:
    cpu = CPUInfo("test cpu", physical=4, logical=8, affinity=tuple(range(6)), usable_physical=3)
    node = NodeInventory("box", cpu, memory_total_bytes=16 * GIB, memory_available_bytes=9 * GIB)
    [mine] = job_capacity(LaminaConfig(), node).nodes
    assert (mine.cpu_milli_free, mine.memory_free_bytes, mine.gpus) == (6000, 16 * GIB, ())
    jobs = JobsConfig(cpus=2.5, memory_bytes=GIB, gpus=1)
    [configured] = job_capacity(LaminaConfig(jobs=jobs), node).nodes
    assert (configured.cpu_milli_free, configured.memory_free_bytes) == (2500, GIB)
    assert [g.index for g in configured.gpus] == [0]


def test_a_job_error_that_the_same_arguments_would_meet_again_is_not_retried() -> None:
    """Lamina's client errors (a bad argument, a dataset not found, a gate failed) fail a job at once; its
    timeouts and rate limits, server errors, and foreign exceptions are retried, unless marked otherwise."""
    from lamina import errors
    from lamina.orchestration._job_main import retryable

    class Own(ValueError):
        retryable = False

    class Foreign(Exception):
        status = 404  # an attribute of the same name, not a Lamina error: no code

    final = [errors.InvalidRequestError("x"), errors.NotFoundError("x"), errors.GateFailedError("x"), Own()]
    again = [errors.RateLimitError("x"), errors.UnavailableError("x"), errors.StoreError("x"), Foreign()]
    again.append(OSError())
    assert [retryable(e) for e in final] == [False] * len(final)
    assert [retryable(e) for e in again] == [True] * len(again)
