"""The job scheduler: a loop that gathers the queue's facts, asks ``schedule_jobs`` what to do, and does it.

Each step (``step``):

1. reads the job processes' events files (progress, lineage, result) into the store, and finishes the
   jobs whose process exited: succeeded, failed (retried after a backoff while attempts remain),
   cancelled, or preempted (back to the queue, not counted as an attempt);
2. stops running jobs whose cancel was asked for (SIGTERM to the process group, SIGKILL after a grace);
3. decides (``schedule_jobs``) on what the machine has free after the serving replicas, preempts what
   it says, fails the jobs that can never fit, and starts the rest as processes of the replicas'
   ``LocalProcessBackend`` (own session, log file, dies with the gateway).

Jobs found running in the store but not started by this scheduler were cut off by a previous gateway's
exit (their processes died with it): they go back to the queue, not counted as an attempt. The loop
never dies: a failing step is logged and the next one runs.

One scheduler runs a queue: gateways that share a metadata store (PostgreSQL, several hosts) each have
one, and ``run`` steps only while it holds the queue's lock (``JobQueue.leadership``); the others stand by
and take over when it is released (its gateway stopped or died: the operating system or the database
releases it). Without that, a second gateway's start would take the first's running jobs for orphans and
queue them again, to run twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lamina.clock import Clock, utcnow
from lamina.compute import ClusterSnapshot, Demand, Placement
from lamina.errors import ConflictError
from lamina.orchestration._job_process import JobProcess
from lamina.orchestration._job_run import JobRun
from lamina.orchestration._jobs import WAITING, Job, JobQueue, JobState
from lamina.orchestration._jobs_policy import (
    QueueContext,
    RunningJob,
    WaitingJob,
    job_demand,
    reserve,
    schedule_jobs,
)
from lamina.store import HeldLock

log = logging.getLogger("lamina.jobs")

#: the job process's script, run by path (see its docstring)
_JOB_MAIN = str(Path(__file__).with_name("_job_main.py"))


@dataclass(frozen=True)
class SchedulerSettings:
    """How often the scheduler looks, how failed jobs back off, how long a stopped job may take."""

    interval_s: float = 1.0
    retry_backoff_s: float = 5.0
    retry_backoff_max_s: float = 300.0
    stop_grace_s: float = 10.0
    #: added to a job process's niceness (its OS priority below the gateway's and the replicas')
    nice: int = 19


class JobScheduler:
    """Runs the queue's jobs on what ``total`` has left after ``serving()``; files under ``run_dir``."""

    def __init__(
        self,
        queue: JobQueue,
        run_dir: Path,
        *,
        total: ClusterSnapshot,
        serving: Callable[[], Sequence[Demand]] = tuple,
        settings: SchedulerSettings | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self.queue = queue
        self._dir = run_dir
        self._total = total
        self._serving = serving
        self._settings = settings or SchedulerSettings()
        self._clock = clock
        self._runs: dict[str, JobRun] = {}
        self._waiting_reason: dict[str, str] = {}
        self._adopted = False

    def log_path(self, job_id: str) -> Path:
        return self._dir / "logs" / f"{job_id}.log"

    @property
    def running(self) -> list[str]:
        return sorted(self._runs)

    async def run(self, stop: asyncio.Event) -> None:
        """While this scheduler leads the queue (the module doc), step every ``interval_s`` until ``stop``
        is set, then stop the jobs (they are queued again); until it leads, stand by."""
        standing_by = False
        while not stop.is_set():
            try:
                with self.queue.leadership() as held:
                    if standing_by:
                        log.info("job scheduler: the queue's scheduler stopped; this gateway runs it now")
                    standing_by = False
                    await self._lead(stop, held)
                continue
            except ConflictError:
                if not standing_by:
                    log.info("job scheduler: another gateway's scheduler runs this queue; standing by")
                standing_by = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._settings.interval_s)

    async def _lead(self, stop: asyncio.Event, held: HeldLock) -> None:
        self._adopted = False  # what is running and not ours now was left by the scheduler before
        try:
            while not stop.is_set():
                try:
                    held.check()
                except ConflictError as exc:
                    log.warning("job scheduler: %s; its jobs are stopped", exc.message)
                    return
                try:
                    await self.step()
                except Exception:
                    log.exception("job scheduler step failed; retrying")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._settings.interval_s)
        finally:
            await self.shutdown()

    async def step(self) -> None:
        for run in list(self._runs.values()):
            await asyncio.to_thread(self._follow, run)
        rows = await asyncio.to_thread(self.queue.list, [JobState.RUNNING, *WAITING], None)
        if not self._adopted:  # once: later, a running job not ours may be another scheduler's
            await asyncio.to_thread(self._requeue_orphans, [j for j in rows if j.state is JobState.RUNNING])
            self._adopted = True
            rows = await asyncio.to_thread(self.queue.list, [JobState.RUNNING, *WAITING], None)
        cancels = [r for j in rows if j.cancel_requested and (r := self._runs.get(j.id)) is not None]
        await self._stop_all(cancels, "cancel")
        waiting = [j for j in rows if j.state in WAITING]
        await self._schedule(waiting)

    async def shutdown(self) -> None:
        """Stop every job process; their jobs go back to the queue for the next start."""
        await self._stop_all(list(self._runs.values()), "shutdown")

    # -- following and finishing ---------------------------------------------------------------------

    def _follow(self, run: JobRun) -> None:
        """Read the events the job wrote since last time; finish it if its process exited."""
        code = run.handle.poll()
        self._read_events(run)
        if code is not None:
            self._finish(run, code)

    def _read_events(self, run: JobRun) -> None:
        changes = run.read_events()
        if changes:
            self.queue.update(run.job.id, expect=JobState.RUNNING, **changes)

    def _finish(self, run: JobRun, code: int) -> None:
        self._runs.pop(run.job.id, None)
        settings = self._settings
        state, changes = run.outcome(
            code, self._clock(), settings.retry_backoff_s, settings.retry_backoff_max_s
        )
        self.queue.update(run.job.id, expect=JobState.RUNNING, state=state, **changes)
        log.info("job %s (%s): %s", run.job.id, run.job.kind, state.value)

    def _requeue_orphans(self, running: Sequence[Job]) -> None:
        for job in running:
            if job.id in self._runs:
                continue
            if job.cancel_requested:  # its process died with the last scheduler; the cancel is done
                self.queue.update(
                    job.id,
                    expect=JobState.RUNNING,
                    state=JobState.CANCELLED,
                    pid=None,
                    finished_at=self._clock(),
                    message="cancelled while running",
                )
                continue
            self.queue.update(
                job.id,
                expect=JobState.RUNNING,
                state=JobState.QUEUED,
                attempts=max(job.attempts - 1, 0),
                pid=None,
                message="interrupted by a restart of the scheduler; waits in the queue to run again",
            )

    async def _stop_all(self, runs: Sequence[JobRun], why: Literal["cancel", "preempt", "shutdown"]) -> None:
        for run in runs:
            run.stopping = why

        async def stop(run: JobRun) -> None:
            code = await asyncio.to_thread(run.handle.stop, self._settings.stop_grace_s)
            await asyncio.to_thread(self._read_events, run)
            await asyncio.to_thread(self._finish, run, code)

        await asyncio.gather(*(stop(r) for r in runs))

    # -- deciding and starting -----------------------------------------------------------------------

    async def _schedule(self, waiting: Sequence[Job]) -> None:
        now = self._clock().timestamp()
        ctx = QueueContext(
            free=reserve(self._total, list(self._serving())),
            total=self._total,
            running=tuple(
                RunningJob(r.job.id, r.job.priority, r.started, r.placement)
                for r in self._runs.values()
                if r.stopping is None
            ),
            waiting=tuple(_waiting(j) for j in waiting),
            now=now,
        )
        decision = schedule_jobs(ctx)
        await self._stop_all([self._runs[i] for i in decision.preempt if i in self._runs], "preempt")
        by_id = {j.id: j for j in waiting}
        for job_id, reason in decision.unfit:
            message = f"refused: {reason}; submit it again with smaller --cpus/--memory/--gpus"
            await asyncio.to_thread(
                self.queue.update,
                job_id,
                expect=WAITING,
                state=JobState.FAILED,
                error=reason,
                message=message,
                finished_at=self._clock(),
            )
        for job_id, placement in decision.start:
            self._launch(by_id[job_id], placement, now)
        self._waiting_reason = {k: v for k, v in self._waiting_reason.items() if k in decision.waiting}
        for job_id, reason in decision.waiting.items():
            if self._waiting_reason.get(job_id) != reason:
                self._waiting_reason[job_id] = reason
                await asyncio.to_thread(self.queue.update, job_id, expect=WAITING, message=reason)

    def _launch(self, job: Job, placement: Placement, now: float) -> None:
        """Start ``job``'s process (on the loop's thread: the process dies with that thread)."""
        claimed = self.queue.claim(job.id, log_path=str(self.log_path(job.id)))
        if claimed is None:
            return
        self._waiting_reason.pop(job.id, None)
        kind = self.queue.kinds.get(job.kind)
        if kind is None:
            self.queue.update(
                job.id,
                state=JobState.FAILED,
                finished_at=self._clock(),
                error=f"no job kind {job.kind!r} in this stack",
                message="failed: unknown kind",
            )
            return
        job_dir = self._dir / job.id
        job_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        events = job_dir / f"events-{claimed.attempts}-{claimed.preemptions}.jsonl"
        spec_path = job_dir / "spec.json"
        spec = {
            "job_id": job.id,
            "kind": job.kind,
            "attempt": claimed.attempts,
            "entrypoint": kind.entrypoint,
            "args": job.args,
            "context": dict(kind.context),
            "resources": job.resources.__dict__,
            "events": str(events),
            "nice": self._settings.nice,
        }
        fd = os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(spec, f)
        argv = [sys.executable, _JOB_MAIN, str(os.getpid()), str(spec_path)]
        try:
            handle = JobProcess.start(job.id, argv, self.log_path(job.id))
        except OSError as exc:
            self.queue.update(
                job.id,
                state=JobState.FAILED,
                finished_at=self._clock(),
                error=f"could not start the job process: {exc}",
                message="failed to start",
            )
            return
        self.queue.update(job.id, pid=handle.pid, message="running")
        self._runs[job.id] = JobRun(claimed, handle, placement, now, events)
        log.info("job %s (%s) started, attempt %d, pid %d", job.id, job.kind, claimed.attempts, handle.pid)


def _waiting(job: Job) -> WaitingJob:
    r = job.resources
    return WaitingJob(
        job_id=job.id,
        priority=job.priority,
        created=job.created_at.timestamp(),
        demand=job_demand(r.cpus, r.memory_bytes, r.gpus, r.gpu_milli),
        not_before=0.0 if job.not_before is None else job.not_before.timestamp(),
    )
