"""The job queue with real job processes: progress, logs and lineage, retries, preemption by priority and by
serving, cancel, the `embed` and `eval` kinds on the bundled MiniLM, the CLI, and the gateway running it.

The scheduler is stepped by the tests (``step``), except in the gateway test, where the stack's lifespan
runs it. Resource totals are small (2 cores) so that preemption triggers on any machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from lamina.cli._app import app
from lamina.compute import ClusterSnapshot, Demand, NodeState
from lamina.config import JobsConfig, LaminaConfig
from lamina.orchestration import Job, JobQueue, JobResources, JobScheduler, JobState, SchedulerSettings
from lamina.stack import job_kinds, open_data_stack, open_store
from lamina.stack.gateway import build_stack, create_gateway
from lamina.store import Store
from tests.support.jobs import SLEEPY

pytestmark = pytest.mark.anyio

GIB = 1 << 30
SMALL = JobResources(cpus=1, memory_bytes=64 << 20)
#: a job process's niceness: the scheduler's (this process's) plus the default 19, capped at 19
NICE = min(os.nice(0) + 19, 19)


def config(**jobs: object) -> LaminaConfig:
    settings = {"kinds": {"sleepy": SLEEPY}, "cpus": 2, "memory_bytes": GIB, "interval_s": 0.1, **jobs}
    return LaminaConfig(register_bundled=False, deployments=[], jobs=JobsConfig.model_validate(settings))


State = tuple[LaminaConfig, Path, Store]


@pytest.fixture
def state(tmp_path: Path) -> Iterator[State]:
    cfg = config()
    store = open_store(cfg, tmp_path / "state")
    yield cfg, tmp_path / "state", store
    store.close()


def scheduler(
    cfg: LaminaConfig, root: Path, store: Store, serving: list[Demand] | None = None
) -> tuple[JobQueue, JobScheduler]:
    queue = JobQueue(store, job_kinds(cfg, root))
    node = NodeState("n1", 2000, GIB, cpu_milli_total=2000, memory_total_bytes=GIB)
    settings = SchedulerSettings(interval_s=0.1, retry_backoff_s=0.3, retry_backoff_max_s=1, stop_grace_s=3)
    held = serving if serving is not None else []
    return queue, JobScheduler(
        queue, root / "jobs", total=ClusterSnapshot((node,)), serving=lambda: held, settings=settings
    )


async def until(
    sched: JobScheduler, done: Callable[[], bool], timeout_s: float = 30, what: str = "the condition"
) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            jobs = [(j.id, j.state.value, j.message) for j in sched.queue.list()]
            raise AssertionError(f"{what} did not happen within {timeout_s}s; jobs: {jobs}")
        await sched.step()
        await asyncio.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_a_job_reports_progress_lineage_and_logs_and_a_too_big_one_is_refused(state: State) -> None:
    cfg, root, store = state
    queue, sched = scheduler(cfg, root, store)
    job = queue.submit("sleepy", {"steps": 8, "step_s": 0.25, "reads": "docs@1"}, resources=SMALL)
    huge = queue.submit("sleepy", {}, resources=JobResources(cpus=8, memory_bytes=1))
    seen: list[float] = []

    def progressed() -> bool:
        seen.append(queue.get(job.id).progress)
        return queue.get(job.id).finished

    try:
        await until(sched, progressed, what="the job's end")
    finally:
        await sched.shutdown()
    done = queue.get(job.id)
    assert done.state is JobState.SUCCEEDED, done
    # below the scheduler's OS priority (serving's), so a busy replica gets the CPU first
    assert done.result == {"steps": 8, "attempt": 1, "nice": NICE}
    assert any(0 < p < 1 for p in seen), seen  # progress arrived while it ran
    assert done.progress == 1.0 and done.attempts == 1
    assert done.inputs == [{"kind": "dataset", "ref": "docs@1"}]
    assert done.outputs == [{"kind": "note", "ref": f"sleepy-{job.id}"}]
    assert done.log_path is not None and "step 8" in Path(done.log_path).read_text()
    refused = queue.get(huge.id)
    assert refused.state is JobState.FAILED
    assert refused.error is not None and "8 CPUs wanted, 2 free" in refused.error


async def test_failed_jobs_are_retried_with_backoff_then_given_up(state: State) -> None:
    cfg, root, store = state
    queue, sched = scheduler(cfg, root, store)
    flaky = queue.submit("sleepy", {"steps": 1, "fail_until": 2}, resources=SMALL, max_attempts=3)
    broken = queue.submit("sleepy", {"steps": 1, "fail": True}, resources=SMALL, max_attempts=2)
    # an error the same arguments would meet again fails the job at once, whatever max_attempts says
    for_good = [
        queue.submit("sleepy", {"steps": 1, "fail_for_good": how}, resources=SMALL, max_attempts=3)
        for how in ("lamina", "own")
    ]
    messages: set[str] = set()

    def both_done() -> bool:
        messages.update(j.message for j in queue.list())
        return all(queue.get(j.id).finished for j in (flaky, broken, *for_good))

    try:
        await until(sched, both_done, timeout_s=40, what="both jobs' end")
    finally:
        await sched.shutdown()
    ok, bad = queue.get(flaky.id), queue.get(broken.id)
    assert (ok.state, ok.attempts) == (JobState.SUCCEEDED, 2)
    assert ok.result == {"steps": 1, "attempt": 2, "nice": NICE}
    assert any(m.startswith("attempt 1 of 3 failed; retrying in 0s") for m in messages), messages
    assert (bad.state, bad.attempts) == (JobState.FAILED, 2)
    assert bad.error == "RuntimeError: asked to fail on attempt 2"
    assert bad.message.startswith("failed after 2 attempts")
    assert bad.log_path is not None
    assert Path(bad.log_path).read_text().count("sleepy attempt") == 2
    lamina_error, own_error = (queue.get(j.id) for j in for_good)
    assert (lamina_error.state, lamina_error.attempts) == (JobState.FAILED, 1)
    assert lamina_error.error == "NotFoundError: no dataset 'nope'; `lamina data list` shows the datasets"
    assert lamina_error.message.startswith("failed, not retried (the same arguments would fail again): ")
    assert (own_error.state, own_error.attempts, own_error.error) == (
        JobState.FAILED,
        1,
        "BadInput: the argument x must be positive",
    )


async def test_preemption_by_priority_and_by_serving_and_cancels(state: State) -> None:
    cfg, root, store = state
    serving: list[Demand] = []
    queue, sched = scheduler(cfg, root, store, serving)
    both_cores = JobResources(cpus=2, memory_bytes=64 << 20)
    long = {"steps": 400, "step_s": 0.05}
    low = queue.submit("sleepy", long, resources=both_cores, priority=0)

    def get(job: Job) -> Job:
        return queue.get(job.id)

    try:
        await until(sched, lambda: get(low).progress > 0, what="the low job's progress")
        low_pid = get(low).pid
        high = queue.submit("sleepy", long, resources=SMALL, priority=5)
        await sched.step()  # the high job needs a core the low one holds: the low one is preempted
        assert (get(low).state, get(high).state) == (JobState.PREEMPTED, JobState.RUNNING)
        assert (get(low).preemptions, get(low).attempts) == (1, 0)  # not counted as a failure
        assert low_pid is not None and not alive(low_pid)
        await until(sched, lambda: get(high).progress > 0, what="the high job's progress")
        high_pid = get(high).pid
        assert queue.cancel(high.id).cancel_requested  # a running job: its scheduler stops it
        await until(sched, lambda: get(high).finished, what="the cancel")
        assert get(high).state is JobState.CANCELLED
        assert high_pid is not None and not alive(high_pid)
        await until(sched, lambda: get(low).state is JobState.RUNNING, what="the low job's restart")
        assert get(low).attempts == 1
        serving.append(Demand(cpu_milli=1500))  # serving grows into the cores the low job holds
        await sched.step()
        assert (get(low).state, get(low).preemptions, get(low).attempts) == (JobState.PREEMPTED, 2, 0)
        assert queue.cancel(low.id).state is JobState.CANCELLED  # a waiting job: at once
    finally:
        await sched.shutdown()
    assert get(low).message == "cancelled before it ran"
    assert sched.running == []


async def test_embed_and_eval_kinds_on_the_bundled_minilm(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    texts = {
        "cats.txt": "Cats are small domesticated felines that purr, hunt mice and sleep most of the day.",
        "rockets.txt": "Rockets burn liquid fuel and oxidizer to lift satellites into orbit around Earth.",
        "bread.txt": "Bread is baked from flour, water, salt and yeast; the dough rises before the oven.",
    }
    for name, text in texts.items():
        (docs / name).write_text(text)
    queries = tmp_path / "queries.jsonl"
    labelled = [
        ("which pet purrs and hunts mice", "cats.txt"),
        ("launching satellites to orbit", "rockets.txt"),
        ("how is a loaf baked with yeast", "bread.txt"),
    ]
    queries.write_text("".join(json.dumps({"query": q, "relevant": [r]}) + "\n" for q, r in labelled))
    cfg = config().model_copy(update={"register_bundled": True})
    root = tmp_path / "state"
    data = open_data_stack(cfg, root)
    try:
        data.pipeline().ingest([str(docs)], "docs")
        queue, sched = scheduler(cfg, root, data.store)
        embed = queue.submit("embed", {"dataset": "docs@1", "target": "docs-copy"})
        evaluation = queue.submit("eval", {"dataset": "docs@1", "queries": str(queries)})
        try:
            await until(
                sched,
                lambda: queue.get(embed.id).finished and queue.get(evaluation.id).finished,
                timeout_s=60,
                what="the embed and eval jobs' end",
            )
        finally:
            await sched.shutdown()
        made, scored = queue.get(embed.id), queue.get(evaluation.id)
        assert made.state is JobState.SUCCEEDED, made.error
        assert made.result is not None and made.result["version"] == "docs-copy@1"
        assert made.result["counts"]["chunks_embedded"] == 3
        assert [i["ref"] for i in made.inputs] == ["docs@1", data.embedding_model_ref()]
        assert [o["ref"] for o in made.outputs] == ["docs-copy@1"]
        copy = data.catalog.resolve("docs-copy")
        assert len(data.catalog.members(copy)) == 3
        assert scored.state is JobState.SUCCEEDED, scored.error
        assert scored.result is not None
        assert scored.result["queries"] == 3 and scored.result["ndcg@10"] == 1.0
        assert scored.result["recall@10"] == 1.0
    finally:
        data.close()


def test_the_cli_queues_lists_shows_and_cancels(tmp_path: Path) -> None:
    cfg_file = tmp_path / "lamina.yaml"
    cfg_file.write_text(f"register_bundled: false\ndeployments: []\njobs:\n  kinds:\n    sleepy: {SLEEPY}\n")
    base = ["--config", str(cfg_file), "--state-dir", str(tmp_path / "state")]

    def lamina(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(app, ["jobs", *args, *base])
        return result.exit_code, result.output

    code, out = lamina(
        "submit",
        "sleepy",
        "--arg",
        "steps=2",
        "--arg",
        "note=hi",
        "--priority",
        "3",
        "--cpus",
        "0.5",
        "--memory",
        "64M",
        "--json",
    )
    assert code == 0, out
    job = json.loads(out)
    assert (job["state"], job["priority"], job["args"]) == ("queued", 3, {"steps": 2, "note": "hi"})
    assert job["resources"] == {"cpus": 0.5, "memory_bytes": 64 << 20, "gpus": 0, "gpu_milli": 0}
    code, out = lamina("list", "--json")
    assert code == 0 and [j["id"] for j in json.loads(out)] == [job["id"]]
    code, out = lamina("show", job["id"])
    assert code == 0 and "queued" in out
    code, out = lamina("logs", job["id"])
    assert code == 0 and "has not started yet" in out
    code, out = lamina("cancel", job["id"])
    assert code == 0 and "cancelled" in out
    code, out = lamina("cancel", job["id"])
    assert code == 1 and "already cancelled" in out
    code, out = lamina("submit", "nope")
    assert code == 2 and "unknown job kind 'nope'" in out and "sleepy" in out
    code, out = lamina("submit", "eval", "--arg", "dataset=docs")
    assert code == 2 and "missing job argument queries" in out
    code, out = lamina("submit", "sleepy", "--memory", "lots")
    assert code == 2 and "give a size like 512M" in out
    # a misspelt dataset or model is refused when submitted, naming what there is, not when the job runs
    code, out = lamina("submit", "embed", "--arg", "dataset=dcos")
    assert code == 1 and "dataset 'dcos' has no versions (datasets: none yet)" in out
    code, out = lamina("submit", "quantize", "--arg", "model=minlm", "--arg", "method=int8")
    assert code == 1 and "minlm" in out
    code, out = lamina("list", "--json")
    assert code == 0 and len(json.loads(out)) == 1  # nothing queued by the refusals
    code, out = lamina("show", "job_nothere")
    assert code == 1 and "no job 'job_nothere'" in out


async def test_gateways_that_share_a_store_run_its_queue_one_at_a_time(state: State) -> None:
    """Two gateways on one metadata store: the second's scheduler must not take the first's running job
    for an orphan (it would queue it again, to run twice); it stands by, and runs the queue once the
    first stops."""
    cfg, root, store = state
    queue, first = scheduler(cfg, root, store)
    other_store = open_store(cfg, root)  # the second gateway's own connection to the store
    _, second = scheduler(cfg, root, other_store)
    job = queue.submit("sleepy", {"steps": 100, "step_s": 0.1}, resources=SMALL)
    stop_first, stop_second = asyncio.Event(), asyncio.Event()
    running_first = asyncio.create_task(first.run(stop_first))
    running_second: asyncio.Task[None] | None = None
    try:
        deadline = time.monotonic() + 30
        while queue.get(job.id).state is not JobState.RUNNING:
            assert time.monotonic() < deadline, queue.get(job.id)
            await asyncio.sleep(0.05)
        pid = queue.get(job.id).pid
        running_second = asyncio.create_task(second.run(stop_second))
        await asyncio.sleep(1.0)  # ten of its intervals
        still = queue.get(job.id)
        assert (still.state, still.pid, still.attempts) == (JobState.RUNNING, pid, 1), still
        assert first.running == [job.id] and second.running == []
        stop_first.set()  # the first gateway stops: its job goes back to the queue, and the second runs it
        await running_first
        deadline = time.monotonic() + 30
        while second.running != [job.id]:
            assert time.monotonic() < deadline, queue.get(job.id)
            await asyncio.sleep(0.05)
        taken = queue.get(job.id)
        assert taken.state is JobState.RUNNING and taken.pid not in (None, pid) and not alive(pid or 0)
    finally:
        stop_first.set()
        stop_second.set()
        await running_first
        if running_second is not None:
            await running_second
        other_store.close()


async def test_the_gateway_runs_the_queue_and_requeues_its_jobs_when_it_stops(tmp_path: Path) -> None:
    cfg = config(nice=5)
    stack = build_stack(cfg, tmp_path / "state")
    assert stack.jobs is not None
    queue = stack.jobs.queue
    quick = queue.submit("sleepy", {"steps": 1}, resources=SMALL)
    slow = queue.submit("sleepy", {"steps": 400, "step_s": 0.05}, resources=SMALL)
    app_ = create_gateway(stack)
    async with app_.router.lifespan_context(app_):
        deadline = time.monotonic() + 30
        while not (queue.get(quick.id).finished and queue.get(slow.id).progress > 0):
            assert time.monotonic() < deadline, queue.list()
            await asyncio.sleep(0.1)
        pid = queue.get(slow.id).pid
    assert queue.get(quick.id).state is JobState.SUCCEEDED
    assert (queue.get(quick.id).result or {}).get("nice") == min(os.nice(0) + 5, 19)  # jobs.nice
    store = open_store(cfg, tmp_path / "state")  # the stack closed its own
    try:
        stopped = JobQueue(store, {}).get(slow.id)
    finally:
        store.close()
    assert stopped.state is JobState.QUEUED and stopped.attempts == 0
    assert "stopped with the gateway" in stopped.message
    assert pid is not None and not alive(pid)
    assert os.path.isfile(str(stopped.log_path))
    # the CLI reads what the gateway's scheduler wrote: the log of a finished job, --follow returns at its end
    logs = CliRunner().invoke(
        app, ["jobs", "logs", quick.id, "--follow", "--state-dir", str(tmp_path / "state")]
    )
    assert logs.exit_code == 0 and "sleepy attempt 1" in logs.output and "step 1" in logs.output


async def test_a_new_scheduler_requeues_jobs_a_stopped_one_left_running_or_ends_their_cancel(
    state: State,
) -> None:
    cfg, root, store = state
    # serving holds both cores, so nothing starts: what the first step did to the rows is what shows
    queue, sched = scheduler(cfg, root, store, [Demand(cpu_milli=2000)])
    cut, cancelled = (queue.submit("sleepy", {}, resources=SMALL) for _ in range(2))
    for job in (cut, cancelled):  # as a scheduler that died leaves them
        assert queue.claim(job.id, log_path=str(root / "x.log")) is not None
    queue.cancel(cancelled.id)
    await sched.step()
    requeued = queue.get(cut.id)
    assert (requeued.state, requeued.attempts, requeued.pid) == (JobState.QUEUED, 0, None)
    assert requeued.message == (
        "waiting for resources: 1 CPUs wanted, 0 free (the serving replicas hold 2 of the 2 CPUs; it starts "
        "when serving scales down; with `jobs.nice` above 0, jobs use the cores the replicas leave idle, "
        "at a lower priority)"
    )
    assert queue.get(cancelled.id).state is JobState.CANCELLED
