"""One run of a job, as the scheduler follows it: the events its process appends (progress, lineage, its
result or error; ``_job_main`` documents them), read as the file grows, and the job's state once the
process has exited: succeeded, cancelled, preempted or stopped with the gateway (queued again, not counted
as an attempt), or failed (retried after a backoff while attempts remain, unless its error says the same
arguments would fail again).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from lamina.compute import Placement
from lamina.orchestration._job_process import JobProcess
from lamina.orchestration._jobs import Job, JobState
from lamina.orchestration._jobs_policy import retry_delay

#: the last lines of a failed job's log quoted in its error
_TAIL_LINES = 8


@dataclass
class JobRun:
    """One job process the scheduler started."""

    job: Job
    handle: JobProcess
    placement: Placement
    started: float
    events: Path
    offset: int = 0
    stopping: Literal["cancel", "preempt", "shutdown"] | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    #: False when the job's error says the same arguments would fail again
    retry: bool = True
    progress: tuple[float, str] | None = None
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)

    def read_events(self) -> dict[str, Any]:
        """Take in the events written since the last read; what the job's row should change (progress and
        message, lineage), empty when nothing should."""
        try:
            with self.events.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return {}
        end = data.rfind(b"\n") + 1  # a line being written is read next time
        self.offset += end
        for line in data[:end].splitlines():
            with contextlib.suppress(ValueError):
                self._event(json.loads(line))
        changes: dict[str, Any] = {}
        if self.progress is not None:
            changes["progress"], changes["message"] = self.progress
            self.progress = None
        if end and (self.inputs or self.outputs):
            changes["inputs"], changes["outputs"] = self.inputs, self.outputs
        return changes

    def _event(self, event: dict[str, Any]) -> None:
        kind = event.pop("type", None)
        if kind == "progress":
            self.progress = (float(event.get("progress", 0.0)), str(event.get("message", "")))
        elif kind == "input":
            self.inputs.append(event)
        elif kind == "output":
            self.outputs.append(event)
        elif kind == "result":
            self.result = event.get("result") or {}
        elif kind == "error":
            self.error = str(event.get("error"))
            self.retry = event.get("retry") is not False

    def outcome(
        self, code: int, now: datetime, backoff_s: float, backoff_max_s: float
    ) -> tuple[JobState, dict[str, Any]]:
        """The job's state after its process exited with ``code`` at ``now``, and the row's other changes."""
        job = self.job
        common: dict[str, Any] = {"pid": None, "finished_at": now, "cancel_requested": False}
        if code == 0 and self.result is not None:  # done, even if a stop came as it finished
            common.update(result=self.result, progress=1.0, message="succeeded")
            return JobState.SUCCEEDED, common
        if self.stopping == "cancel":
            return JobState.CANCELLED, {**common, "message": "cancelled while running"}
        if self.stopping in ("preempt", "shutdown"):
            preempted = self.stopping == "preempt"
            why = (
                "preempted for serving or a higher-priority job" if preempted else "stopped with the gateway"
            )
            common.update(message=f"{why}; waits in the queue to run again", attempts=job.attempts - 1)
            common["finished_at"] = None
            if preempted:
                common["preemptions"] = job.preemptions + 1
            return (JobState.PREEMPTED if preempted else JobState.QUEUED), common
        error = self.error or f"the job process exited with code {code}: {self._tail()}"
        common["error"] = error
        if not self.retry:
            common["message"] = f"failed, not retried (the same arguments would fail again): {error}"
            return JobState.FAILED, common
        if job.attempts < job.max_attempts:
            delay = retry_delay(job.attempts, backoff_s, backoff_max_s)
            common.update(not_before=now + timedelta(seconds=delay), finished_at=None)
            common["message"] = (
                f"attempt {job.attempts} of {job.max_attempts} failed; retrying in {delay:.0f}s: {error}"
            )
            return JobState.QUEUED, common
        common["message"] = f"failed after {job.attempts} attempts: {error}"
        return JobState.FAILED, common

    def _tail(self) -> str:
        return self.handle.tail_log(_TAIL_LINES).strip() or "(no output)"
