"""The job queue's records: job kinds (registered entrypoints), jobs and their states, in the metadata
store's ``jobs`` table.

Orchestration stays generic: a job kind is a name, an entrypoint ``module:function`` and a context (the
fixed values its runs need, such as the state directory), supplied by the composition root for each kind
the upper layers offer (embed, eval, quantize, train). The queue knows nothing of what a kind does.

The store is the queue: ``lamina jobs submit`` writes a row from any process, the scheduler running in
the gateway (``_job_runner``) claims it with a conditional update, and a cancel is a flag that scheduler
acts on. So the CLI needs no connection to the gateway, and jobs submitted while nothing runs wait.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Row, insert, select, update

from lamina.clock import Clock, utcnow
from lamina.errors import ConflictError, InvalidRequestError, NotFoundError
from lamina.orchestration._jobs_policy import job_demand
from lamina.store import HeldLock, Store, jobs

_MIB = 1 << 20


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    #: stopped to free resources for serving or a higher-priority job; waits in the queue again
    PREEMPTED = "preempted"


#: states of a job that waits to (re)start
WAITING = frozenset({JobState.QUEUED, JobState.PREEMPTED})
#: states a job never leaves
FINISHED = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


@dataclass(frozen=True)
class JobResources:
    """What one job asks for: cores, memory, whole GPUs or a share of one (``gpu_milli`` 1..999)."""

    cpus: float = 1.0
    memory_bytes: int = 512 * _MIB
    gpus: int = 0
    gpu_milli: int = 0

    def __post_init__(self) -> None:
        try:
            job_demand(self.cpus, self.memory_bytes, self.gpus, self.gpu_milli)
        except ValueError as exc:
            raise InvalidRequestError(f"job resources: {exc}") from exc


#: checks a submitted job's arguments and returns them normalised; raises InvalidRequestError
ArgsCheck = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class JobKind:
    """A kind of job, offered by an upper layer through the composition root.

    ``entrypoint`` is ``module:function``; the job process calls ``function(args, job)`` with the job's
    arguments and a ``JobContext`` (progress, lineage, ``job.context``), and records what it returns (a
    JSON object) as the job's result. ``context``: fixed strings every run of the kind gets (the state
    directory, the config file), kept out of the job's own arguments.
    """

    name: str
    entrypoint: str
    description: str
    resources: JobResources = field(default_factory=JobResources)
    context: Mapping[str, str] = field(default_factory=dict)
    check_args: ArgsCheck | None = None
    max_attempts: int = 3


@dataclass(frozen=True)
class Job:
    """One job as the store holds it."""

    id: str
    kind: str
    args: dict[str, Any]
    state: JobState
    priority: int
    resources: JobResources
    attempts: int
    max_attempts: int
    preemptions: int
    progress: float
    message: str
    result: dict[str, Any] | None
    error: str | None
    log_path: str | None
    pid: int | None
    cancel_requested: bool
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    not_before: datetime | None

    @property
    def finished(self) -> bool:
        """Whether the job is over (succeeded, failed or cancelled): it will not run again."""
        return self.state in FINISHED

    def to_json(self) -> dict[str, Any]:
        """The job as plain JSON data (what ``--json`` prints)."""
        data = {k: v for k, v in self.__dict__.items() if k != "resources"}
        data["state"] = self.state.value
        data["resources"] = self.resources.__dict__.copy()
        for key in ("created_at", "started_at", "finished_at", "not_before"):
            value = data[key]
            data[key] = value.isoformat() if isinstance(value, datetime) else None
        return data


def _job(row: Row[Any]) -> Job:
    m = row._mapping
    return Job(
        id=m["id"],
        kind=m["kind"],
        args=dict(m["args"]),
        state=JobState(m["state"]),
        priority=m["priority"],
        resources=JobResources(m["cpus"], m["memory_bytes"], m["gpus"], m["gpu_milli"]),
        attempts=m["attempts"],
        max_attempts=m["max_attempts"],
        preemptions=m["preemptions"],
        progress=m["progress"],
        message=m["message"],
        result=m["result"],
        error=m["error"],
        log_path=m["log_path"],
        pid=m["pid"],
        cancel_requested=bool(m["cancel_requested"]),
        inputs=list(m["inputs"]),
        outputs=list(m["outputs"]),
        created_at=m["created_at"],
        started_at=m["started_at"],
        finished_at=m["finished_at"],
        not_before=m["not_before"],
    )


class JobQueue:
    """Jobs in a metadata ``store``: submit, read, cancel, and the state changes the scheduler makes."""

    def __init__(self, store: Store, kinds: Mapping[str, JobKind], *, clock: Clock = utcnow) -> None:
        self._store = store
        self.kinds = dict(kinds)
        self._clock = clock

    def leadership(self) -> AbstractContextManager[HeldLock]:
        """The lock one scheduler holds while it runs this queue (every gateway on one store has one);
        ConflictError at once when another holds it."""
        busy = "another gateway's job scheduler runs this queue"
        return self._store.lock("jobs:scheduler", busy=busy)

    def kind(self, name: str) -> JobKind:
        try:
            return self.kinds[name]
        except KeyError:
            known = ", ".join(sorted(self.kinds)) or "none"
            raise InvalidRequestError(f"unknown job kind {name!r}; the kinds are: {known}") from None

    def submit(
        self,
        kind: str,
        args: Mapping[str, Any] | None = None,
        *,
        priority: int = 0,
        resources: JobResources | None = None,
        max_attempts: int | None = None,
    ) -> Job:
        """Queue a job of ``kind``; its arguments are checked by the kind first (InvalidRequestError)."""
        k = self.kind(kind)
        checked = dict(args or {})
        if k.check_args is not None:
            checked = k.check_args(checked)
        res = resources or k.resources
        attempts = k.max_attempts if max_attempts is None else max_attempts
        if attempts < 1:
            raise InvalidRequestError(f"max_attempts {attempts}: give 1 or more")
        job_id = "job_" + secrets.token_hex(6)
        values = {
            "id": job_id,
            "kind": kind,
            "args": checked,
            "state": JobState.QUEUED.value,
            "priority": priority,
            "cpus": res.cpus,
            "memory_bytes": res.memory_bytes,
            "gpus": res.gpus,
            "gpu_milli": res.gpu_milli,
            "attempts": 0,
            "max_attempts": attempts,
            "preemptions": 0,
            "progress": 0.0,
            "message": "queued",
            "cancel_requested": False,
            "inputs": [],
            "outputs": [],
            "created_at": self._clock(),
        }
        with self._store.begin() as conn:
            conn.execute(insert(jobs).values(**values))
        return self.get(job_id)

    def get(self, job_id: str) -> Job:
        with self._store.begin() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
        if row is None:
            raise NotFoundError(f"no job {job_id!r}; `lamina jobs list` shows the jobs")
        return _job(row)

    def list(self, states: Sequence[JobState] | None = None, limit: int | None = 200) -> list[Job]:
        """Jobs, newest first (``states``: only those)."""
        query = select(jobs).order_by(jobs.c.created_at.desc(), jobs.c.id)
        if states is not None:
            query = query.where(jobs.c.state.in_([s.value for s in states]))
        if limit is not None:
            query = query.limit(limit)
        with self._store.begin() as conn:
            return [_job(row) for row in conn.execute(query)]

    def cancel(self, job_id: str) -> Job:
        """Cancel a job: a waiting one at once, a running one by its scheduler (SIGTERM, then SIGKILL)."""
        now = self._clock()
        waiting = [s.value for s in WAITING]
        with self._store.begin() as conn:
            done = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.state.in_(waiting))
                .values(state=JobState.CANCELLED.value, finished_at=now, message="cancelled before it ran")
            ).rowcount
            if not done:
                conn.execute(
                    update(jobs)
                    .where(jobs.c.id == job_id, jobs.c.state == JobState.RUNNING.value)
                    .values(cancel_requested=True, message="cancelling")
                )
        job = self.get(job_id)
        if job.state in FINISHED and not done:
            raise ConflictError(f"job {job_id} already {job.state.value}; there is nothing to cancel")
        return job

    # -- what the scheduler changes --------------------------------------------------------------------

    def update(
        self, job_id: str, *, expect: JobState | frozenset[JobState] | None = None, **values: Any
    ) -> bool:
        """Set columns of a job (``expect``: only while it is in that state, or one of those states); True
        when it changed."""
        if isinstance(values.get("state"), JobState):
            values["state"] = values["state"].value
        query = update(jobs).where(jobs.c.id == job_id)
        if isinstance(expect, JobState):
            query = query.where(jobs.c.state == expect.value)
        elif expect is not None:
            query = query.where(jobs.c.state.in_([s.value for s in expect]))
        with self._store.begin() as conn:
            return bool(conn.execute(query.values(**values)).rowcount)

    def claim(self, job_id: str, *, log_path: str) -> Job | None:
        """Mark a waiting job running (one more attempt); None when another scheduler or a cancel won."""
        waiting = [s.value for s in WAITING]
        with self._store.begin() as conn:
            claimed = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.state.in_(waiting))
                .values(
                    state=JobState.RUNNING.value,
                    attempts=jobs.c.attempts + 1,
                    started_at=self._clock(),
                    finished_at=None,
                    log_path=log_path,
                    progress=0.0,
                    message="starting",
                    error=None,
                )
            ).rowcount
        return self.get(job_id) if claimed else None
