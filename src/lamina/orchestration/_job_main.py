"""The job process: ``python .../lamina/orchestration/_job_main.py PARENT_PID SPEC.json``, and the
``JobContext`` a job function gets.

It imports the kind's entrypoint (``module:function``) and calls ``function(args, job)``. ``job`` is a
:class:`JobContext`: the job reports progress and lineage through it, as JSON lines appended to the
events file the spec names, which the scheduler reads while the job runs (the protocol):

    {"type": "progress", "progress": 0.25, "message": "embedded 250 of 1000 chunks"}
    {"type": "input", "kind": "dataset", "ref": "docs@3", "version_id": "ab12..."}
    {"type": "output", "kind": "model", "ref": "minilm@int8"}
    {"type": "result", "result": {...}}          (what the function returned; exit code 0)
    {"type": "error", "error": "ErrorType: what went wrong", "retry": true}   (exit code 1)

``retry`` is false for an error that the same arguments would meet again: a Lamina error of a client status
(4xx but 408 and 429: a bad argument, a dataset or model not found, an accuracy gate failed), or any
exception whose ``retryable`` attribute is False (a job kind of the user's own may raise one); the scheduler
then fails the job at once instead of retrying it.

Anything the job prints goes to its log file. SIGTERM ends it (Python's default action), which is how
the scheduler cancels and preempts it. Like a replica, the job dies with the scheduler's process: it asks
Linux for ``PR_SET_PDEATHSIG`` itself, first thing (as ``_trampoline`` does for replicas, without the
second interpreter start that an exec through the trampoline costs). Then it lowers its OS priority by the
spec's ``nice`` (``jobs.nice``), so that the kernel gives a busy replica the CPU before a job's threads.

It runs as a script, by path, and imports nothing of Lamina itself: importing ``lamina.orchestration``
costs seconds on a loaded machine, and a job needs none of it (its entrypoint imports what it uses). As
``python -m`` would, the working directory replaces the script's own directory on ``sys.path``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib
import importlib.util
import json
import math
import os
import signal
import sys
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO


class JobContext:
    """What a job function gets besides its arguments: who it is, and where to report."""

    def __init__(self, job_id: str, attempt: int, context: Mapping[str, str], events: TextIO) -> None:
        self.job_id = job_id
        #: 1 on the first run, 2 on the first retry ... (preempted runs are not counted)
        self.attempt = attempt
        #: the kind's fixed values from the composition root (state directory, config)
        self.context = dict(context)
        self._events = events

    def emit(self, event: dict[str, Any]) -> None:
        self._events.write(json.dumps(event, default=str) + "\n")
        self._events.flush()

    def progress(self, fraction: float, message: str = "") -> None:
        """Report how far the job is (0..1, clamped) and what it is doing."""
        value = 0.0 if math.isnan(fraction) else min(max(fraction, 0.0), 1.0)
        self.emit({"type": "progress", "progress": value, "message": message})

    def read(self, kind: str, ref: str, **detail: Any) -> None:
        """Record that the job read ``ref`` (a dataset version, a model version) for lineage."""
        self.emit({"type": "input", "kind": kind, "ref": ref, **detail})

    def produced(self, kind: str, ref: str, **detail: Any) -> None:
        """Record that the job produced ``ref`` (a dataset version, a model version) for lineage."""
        self.emit({"type": "output", "kind": kind, "ref": ref, **detail})


#: the exit code of a job whose function raised
FAILED_EXIT = 1
_PR_SET_PDEATHSIG = 1


def resolve(entrypoint: str) -> Callable[..., Any]:
    """The function ``module:function`` (or ``path/to/file.py:function``) names."""
    module_name, sep, attr = entrypoint.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"entrypoint {entrypoint!r}: write it as module:function or file.py:function")
    target: Any
    if module_name.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
        if spec is None or spec.loader is None:
            raise ImportError(f"entrypoint {entrypoint!r}: cannot load {module_name}")
        target = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(target)
    else:
        target = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"entrypoint {entrypoint!r} is not callable")
    return target  # type: ignore[no-any-return]


def run(spec: Mapping[str, Any]) -> int:
    """Run the job ``spec`` describes; returns the process's exit code."""
    with Path(spec["events"]).open("a", encoding="utf-8") as events:
        job = JobContext(spec["job_id"], int(spec["attempt"]), spec.get("context", {}), events)
        try:
            result = resolve(spec["entrypoint"])(dict(spec.get("args", {})), job)
        except Exception as exc:
            traceback.print_exc()
            message = getattr(exc, "message", None) or str(exc)
            job.emit({"type": "error", "error": f"{type(exc).__name__}: {message}", "retry": retryable(exc)})
            return FAILED_EXIT
        job.emit({"type": "result", "result": result if isinstance(result, dict) else {"value": result}})
    return 0


def retryable(exc: BaseException) -> bool:
    """Whether running the job again might succeed (see the module doc); by attributes, since this module
    imports nothing of Lamina: its errors carry an HTTP ``status`` and a ``code``."""
    if getattr(exc, "retryable", None) is False:
        return False
    status, code = getattr(exc, "status", None), getattr(exc, "code", None)
    client = type(status) is int and 400 <= status < 500 and status not in (408, 429)
    return not (client and isinstance(code, str))


def die_with(parent: int) -> bool:
    """Ask for SIGTERM when the parent (thread) exits (Linux); False when the parent is already gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    return os.getppid() == parent


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m lamina.orchestration._job_main PARENT_PID SPEC.json", file=sys.stderr)
        return 2
    if not die_with(int(argv[0])):
        return 1
    spec = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    # below serving's priority, set while this is the only thread, so every thread the job starts has it
    os.nice(int(spec.get("nice", 0)))
    print(f"--- job {spec['job_id']} attempt {spec['attempt']}: {spec['entrypoint']}", flush=True)
    return run(spec)


if __name__ == "__main__":
    sys.path[0] = os.getcwd()
    sys.exit(main(sys.argv[1:]))
