"""The job queue's test job kind: ``workloads/sleepy_job.py``, by its path as ``jobs.kinds`` takes it."""

from __future__ import annotations

from pathlib import Path

#: the entrypoint of the test job kind (file:function): steps, progress, lineage, failures on request
SLEEPY = f"{Path(__file__).resolve().parent / 'workloads' / 'sleepy_job.py'}:sleepy"
