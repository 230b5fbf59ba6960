"""A job kind for the job queue's tests, registered like a user's own (``jobs.kinds``, by file path, so
that the job process imports nothing of the test suite): it prints, sleeps, reports progress and lineage
through its ``JobContext``, and fails on request."""

from __future__ import annotations

import os
import time
from typing import Any


class BadInput(ValueError):
    """A job kind's own error that running again cannot mend."""

    retryable = False


def sleepy(args: dict[str, Any], job: Any) -> dict[str, Any]:
    """``steps`` steps of ``step_s`` seconds each, a progress report and a log line per step.

    ``fail``: raise after the steps; ``fail_until``: raise while the attempt is below it (retries);
    ``fail_for_good``: raise an error no retry can mend, a Lamina ``NotFoundError`` ("lamina") or an
    exception of the job's own marked ``retryable = False`` ("own"); ``reads``: a dataset ref recorded as
    the job's input.
    """
    steps, step_s = int(args.get("steps", 3)), float(args.get("step_s", 0.1))
    print(f"sleepy attempt {job.attempt}: {steps} steps of {step_s}s", flush=True)
    if args.get("reads"):
        job.read("dataset", str(args["reads"]))
    for i in range(1, steps + 1):
        time.sleep(step_s)
        print(f"step {i}", flush=True)
        job.progress(i / steps, f"step {i} of {steps}")
    if args.get("fail_for_good") == "lamina":
        from lamina.errors import NotFoundError

        raise NotFoundError("no dataset 'nope'; `lamina data list` shows the datasets")
    if args.get("fail_for_good") == "own":
        raise BadInput("the argument x must be positive")
    if args.get("fail") or job.attempt < int(args.get("fail_until", 0)):
        raise RuntimeError(f"asked to fail on attempt {job.attempt}")
    job.produced("note", f"sleepy-{job.job_id}")
    return {"steps": steps, "attempt": job.attempt, "nice": os.nice(0)}
