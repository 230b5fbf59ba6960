"""Jobs as Ray tasks: a job's entrypoint (``"package.module:function"`` and its arguments) run on the Ray
cluster with the job's CPUs, GPUs and memory; the job queue submits, polls and cancels (``lamina[ray]``)."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lamina.errors import InvalidRequestError, NotFoundError
from lamina.orchestration._ray import connect, import_ray, ready

_MIB = 1 << 20

RayJobState = Literal["running", "succeeded", "failed", "cancelled"]


@dataclass(frozen=True)
class RayJobStatus:
    state: RayJobState
    #: the entrypoint's return value once it succeeded
    result: Any = None
    #: the failure, for people, once it failed
    error: str | None = None


def run_entrypoint(entrypoint: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    """Import ``module:function`` and call it (the body of every job task)."""
    module, _, name = entrypoint.partition(":")
    return getattr(importlib.import_module(module), name)(*args, **kwargs)


class RayJobRunner:
    """Runs a job's entrypoint (``"package.module:function"`` and its arguments) as a Ray task with the
    job's resources; ``submit`` returns at once, ``poll`` never waits, ``cancel`` stops the task."""

    def __init__(self, *, address: str | None = None, temp_dir: Path | None = None, **init: Any) -> None:
        self._ray = import_ray()
        self._started_ray = connect(self._ray, address, temp_dir, **init)
        self._task = self._ray.remote(max_retries=0)(run_entrypoint)
        self._refs: dict[str, Any] = {}
        self._cancelled: set[str] = set()

    def submit(
        self,
        entrypoint: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        cpus: float = 1.0,
        gpus: float = 0.0,
        memory_mb: int | None = None,
    ) -> str:
        """Start the task; its id (for ``poll`` and ``cancel``)."""
        module, sep, name = entrypoint.partition(":")
        if not (module and sep and name):
            raise InvalidRequestError(
                f"a job entrypoint is 'package.module:function', not {entrypoint!r}", param="entrypoint"
            )
        options: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus}
        if memory_mb is not None:
            options["memory"] = memory_mb * _MIB
        ref = self._task.options(**options).remote(entrypoint, list(args), dict(kwargs or {}))
        job_id = str(ref.hex())
        self._refs[job_id] = ref
        return job_id

    def poll(self, job_id: str) -> RayJobStatus:
        ray, ref = self._ray, self._ref(job_id)
        if not ready(ref):
            return RayJobStatus("running")
        try:
            return RayJobStatus("succeeded", result=ray.get(ref))
        except ray.exceptions.TaskCancelledError:
            return RayJobStatus("cancelled", error="cancelled")
        except ray.exceptions.RayError as exc:
            if job_id in self._cancelled:
                return RayJobStatus("cancelled", error="cancelled")
            cause = getattr(exc, "cause", None) or exc
            return RayJobStatus("failed", error=f"{type(cause).__name__}: {cause}")

    def cancel(self, job_id: str) -> None:
        """Stop the task (its process is killed if it already runs); ``poll`` then says cancelled."""
        self._cancelled.add(job_id)
        with contextlib.suppress(Exception):
            self._ray.cancel(self._ref(job_id), force=True)

    def _ref(self, job_id: str) -> Any:
        try:
            return self._refs[job_id]
        except KeyError:
            raise NotFoundError(f"no Ray job {job_id!r} was submitted here", param="job_id") from None

    def close(self) -> None:
        if self._started_ray:
            self._ray.shutdown()
