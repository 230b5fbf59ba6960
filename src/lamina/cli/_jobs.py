"""``lamina jobs``: submit batch work (embed, eval, quantize, train) and follow it: list, show, logs, cancel.

The commands read and write the job queue in the metadata store of the state directory, not the gateway's
API: the store is the queue, and the scheduler in the running gateway (`lamina up`) picks new jobs up and
acts on cancels within a second (``jobs.interval_s``). So jobs can be queued, listed and cancelled while
the stack is down too (they start with it), with no admin key to hand around.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from lamina.cli._common import (
    ConfigOption,
    JsonOption,
    StateDirOption,
    fail,
    load,
    out_console,
    print_json,
    print_table,
)
from lamina.errors import InvalidRequestError, LaminaError
from lamina.orchestration import Job, JobQueue, JobResources
from lamina.stack import open_job_queue, open_store

jobs_app = typer.Typer(
    help="The job queue: batch embedding, evaluation, quantization and training jobs.", no_args_is_help=True
)

JobId = Annotated[str, typer.Argument(help="The job's id (job_...).", show_default=False)]
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from ``512M``, ``2GiB``, ``1.5g`` or ``1048576`` (K, M, G, T are powers of 1024)."""
    m = _SIZE.match(text)
    if m is None:
        raise InvalidRequestError(f"--memory {text!r}: give a size like 512M, 2G or a number of bytes")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2).lower() or "_"))


def parse_args(pairs: list[str]) -> dict[str, Any]:
    """``k=v`` pairs; a value that reads as JSON (a number, true, a list) is that, any other a string."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidRequestError(f"--arg {pair!r}: write it as NAME=VALUE")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


@contextmanager
def _queue(config: Path | None, state_dir: Path | None) -> Iterator[JobQueue]:
    cfg, root = load(config, state_dir)
    try:
        store = open_store(cfg, root)
    except LaminaError as exc:
        fail(exc)
    try:
        yield open_job_queue(cfg, root, store)
    except InvalidRequestError as exc:
        fail(exc, exit_code=2)
    except LaminaError as exc:
        fail(exc)
    finally:
        store.close()


def _when(job: Job) -> str:
    return job.created_at.strftime("%Y-%m-%d %H:%M:%S")


def _table(jobs: list[Job]) -> Table:
    table = Table("id", "kind", "state", "prio", "progress", "attempts", "created", "message")
    for j in jobs:
        table.add_row(
            j.id,
            j.kind,
            j.state.value,
            str(j.priority),
            f"{j.progress:.0%}",
            f"{j.attempts}/{j.max_attempts}",
            _when(j),
            j.message[:80],
        )
    return table


@jobs_app.command("submit")
def submit(
    kind: Annotated[str, typer.Argument(help="embed, eval, quantize, train, or a kind from jobs.kinds.")],
    arg: Annotated[
        list[str] | None, typer.Option("--arg", help="A job argument NAME=VALUE (repeatable).")
    ] = None,
    priority: Annotated[int, typer.Option(help="Higher runs first and preempts lower-priority jobs.")] = 0,
    cpus: Annotated[float | None, typer.Option(help="CPU cores the job needs (default: the kind's).")] = None,
    memory: Annotated[
        str | None, typer.Option(help="Memory the job needs: 512M, 2G (default: the kind's).")
    ] = None,
    gpus: Annotated[int | None, typer.Option(help="Whole GPUs the job needs (default: the kind's).")] = None,
    max_attempts: Annotated[int | None, typer.Option(help="Runs before a failing job is given up.")] = None,
    config: ConfigOption = None,
    state_dir: StateDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Queue a job; the running stack starts it when its resources are free (`lamina jobs show ID`)."""
    with _queue(config, state_dir) as queue:
        base = queue.kind(kind).resources
        resources = JobResources(
            cpus=base.cpus if cpus is None else cpus,
            memory_bytes=base.memory_bytes if memory is None else parse_size(memory),
            gpus=base.gpus if gpus is None else gpus,
            gpu_milli=base.gpu_milli,
        )
        job = queue.submit(
            kind, parse_args(arg or []), priority=priority, resources=resources, max_attempts=max_attempts
        )
    if as_json:
        print_json(job.to_json())
    else:
        out_console.print(f"queued [bold]{job.id}[/] ({kind}); `lamina jobs show {job.id}` follows it")


@jobs_app.command("list")
def list_jobs(
    config: ConfigOption = None, state_dir: StateDirOption = None, as_json: JsonOption = False
) -> None:
    """The jobs, newest first."""
    with _queue(config, state_dir) as queue:
        jobs = queue.list()
    if as_json:
        print_json([j.to_json() for j in jobs])
    elif not jobs:
        out_console.print("no jobs yet; `lamina jobs submit KIND --arg NAME=VALUE` queues one")
    else:
        print_table(_table(jobs))


@jobs_app.command("show")
def show(
    job_id: JobId, config: ConfigOption = None, state_dir: StateDirOption = None, as_json: JsonOption = False
) -> None:
    """One job: its state, progress, attempts, result or error, lineage and log file."""
    with _queue(config, state_dir) as queue:
        job = queue.get(job_id)
    data = job.to_json()
    if as_json:
        print_json(data)
        return
    for key, value in data.items():
        shown = json.dumps(value, default=str) if isinstance(value, dict | list) else value
        out_console.print(f"[bold]{key}:[/] {shown}", highlight=False, soft_wrap=True)


@jobs_app.command("logs")
def logs(
    job_id: JobId,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False,
    config: ConfigOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """The job's log (what its process printed, every attempt)."""
    with _queue(config, state_dir) as queue:
        job = queue.get(job_id)
        offset = 0
        while True:
            offset = _print_from(job.log_path, offset)
            if not follow or job.finished:
                break
            time.sleep(0.5)
            job = queue.get(job_id)
        offset = _print_from(job.log_path, offset)
    if job.log_path is None:
        out_console.print(f"job {job_id} has not started yet ({job.message})")


def _print_from(path: str | None, offset: int) -> int:
    if path is None:
        return offset
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return offset
    if data:
        typer.echo(data.decode("utf-8", errors="replace"), nl=False)
    return offset + len(data)


@jobs_app.command("cancel")
def cancel(job_id: JobId, config: ConfigOption = None, state_dir: StateDirOption = None) -> None:
    """Cancel a job: a waiting one at once, a running one is stopped by the scheduler (SIGTERM, SIGKILL)."""
    with _queue(config, state_dir) as queue:
        job = queue.cancel(job_id)
    out_console.print(f"{job.id}: {job.state.value} ({job.message})")
