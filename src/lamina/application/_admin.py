"""The admin API's ingestion: ``lamina data ingest`` over HTTP, run in the gateway's own process.

The gateway reads its *own* filesystem on a client's behalf, so every path a request names must lie
inside a configured root (``data.ingest_roots``; none configured turns the endpoint off). Patterns are
checked twice: here, lexically and with the literal prefix's symlinks resolved, before anything runs;
then by the pipeline's discovery, which refuses symbolic links and files whose real path escapes the
pattern's root.

The pipeline is synchronous (file reads, the embedder, the metadata store), so each run goes to a worker
thread and the request answers 202 at once with a run id to poll. One run per dataset at a time: a second
request for a dataset that is being ingested is a 409 naming the running run (the pipeline's lock file
also guards against a ``lamina data ingest`` in another process; that run then fails with its message).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from glob import has_magic
from pathlib import Path
from typing import Any, Literal, Protocol

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lamina.application._bounds import DEFAULT_LIMITS, read_body
from lamina.application._requests import parse_body
from lamina.clock import Clock, utcnow
from lamina.config import DataConfig
from lamina.data import (
    DatasetCatalog,
    IngestOptions,
    IngestPipeline,
    IngestReport,
    IngestRun,
    LoadOptions,
    check_dataset_name,
)
from lamina.errors import (
    ConflictError,
    InvalidRequestError,
    LaminaError,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
)

log = logging.getLogger("lamina.admin")

RunState = Literal["running", "completed", "unchanged", "failed"]
RUNS_PATH = "/admin/v1/ingest-runs"


class IngestSettings(BaseModel):
    """Per-run overrides of ``DataConfig`` (null: the configured value)."""

    model_config = ConfigDict(extra="forbid")

    text_field: str | None = Field(None, description="JSONL/CSV: the field holding the text (default text).")
    meta_fields: list[str] = Field(default_factory=list, description="JSONL/CSV: fields kept as metadata.")
    chunk_size: int | None = Field(None, ge=8, description="Tokens per chunk (default data.chunk_size).")
    chunk_overlap: int | None = Field(None, ge=0, description="Tokens shared by neighbouring chunks.")


class IngestRequest(IngestSettings):
    """The body of ``POST /admin/v1/datasets/{name}/ingest``."""

    paths: list[str] = Field(
        min_length=1, description="Files, directories or globs; relative ones are under the first root."
    )


class IngestService(Protocol):
    """What the admin router needs: start runs, report on them, list datasets."""

    def start(self, dataset: str, patterns: Sequence[str], options: IngestSettings) -> str:
        """Start ingesting ``patterns`` into ``dataset``; returns the run id at once."""
        ...

    def status(self, run_id: str) -> dict[str, Any]: ...
    def datasets(self) -> list[dict[str, Any]]: ...


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def confine(patterns: Sequence[str], roots: Sequence[Path]) -> list[str]:
    """``patterns`` as absolute, normalised patterns inside ``roots`` (resolved directories).

    Raises PermissionDeniedError without roots, InvalidRequestError naming the first pattern outside.
    """
    if not roots:
        raise PermissionDeniedError(
            "ingestion through the admin API is off: no directory is allowed; set data.ingest_roots in "
            "lamina.yaml to the directories the gateway may read, and restart `lamina up`"
        )
    confined = []
    for pattern in patterns:
        given = Path(pattern)
        normal = Path(os.path.normpath(given if given.is_absolute() else roots[0] / given))
        parts = normal.parts
        literal = Path(*parts[: next((i for i, p in enumerate(parts) if has_magic(p)), len(parts))])
        if "\x00" in pattern or not (_inside(normal, roots) and _inside(literal.resolve(), roots)):
            allowed = ", ".join(str(r) for r in roots)
            raise InvalidRequestError(
                f"the path {pattern!r} is outside the ingest roots ({allowed}); name files under one of "
                "them, or add the directory to data.ingest_roots in lamina.yaml",
                param="paths",
            )
        confined.append(str(normal))
    return confined


@dataclass
class _Run:
    """One admin-started run, as polled."""

    run_id: str
    dataset: str
    started_at: datetime
    state: RunState = "running"
    files: tuple[int, int] = (0, 0)
    chunks: tuple[int, int] = (0, 0)
    finished_at: datetime | None = None
    report: IngestReport | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        report = self.report
        version = None if report is None or report.version is None else report.version.to_json()
        return {
            "run_id": self.run_id,
            "dataset": self.dataset,
            "state": self.state,
            "started_at": self.started_at.isoformat(),
            "finished_at": None if self.finished_at is None else self.finished_at.isoformat(),
            "progress": {"files": list(self.files), "chunks": list(self.chunks)},
            "counts": {} if report is None else dict(report.counts),
            "version": version,
            "skipped": []
            if report is None
            else [{"path": s.path, "reason": s.reason} for s in report.skipped],
            "error": self.error,
            "ingest_run_id": None if report is None else report.run_id,
        }


@dataclass
class _Progress:
    """The pipeline's progress into the run; stops the run (before its commit) when the service closes."""

    run: _Run
    closing: threading.Event = field(repr=False)

    def _check(self) -> None:
        if self.closing.is_set():
            raise UnavailableError(
                "the gateway shut down during this ingest; the previous version is intact; send the "
                "request again when the gateway is back"
            )

    def files(self, done: int, total: int) -> None:
        self._check()
        self.run.files = (done, total)

    def chunks(self, done: int, total: int) -> None:
        self._check()
        self.run.chunks = (done, total)


class ThreadedIngestService:
    """Runs ingests in worker threads of this process and keeps the newest runs' states in memory.

    ``pipeline`` makes the pipeline (``DataStack.pipeline``: it loads the embedder in-process on first
    use, so the first run pays for the load, in its worker thread). Runs no longer in memory, and runs
    started elsewhere (``lamina data ingest``, by the pipeline's run id), are read from the catalog.
    """

    def __init__(
        self,
        pipeline: Callable[[], IngestPipeline],
        catalog: DatasetCatalog,
        config: DataConfig,
        roots: Sequence[Path],
        *,
        max_workers: int = 2,
        keep_runs: int = 256,
        clock: Clock = utcnow,
    ) -> None:
        self._make_pipeline = pipeline
        self._catalog = catalog
        self._config = config
        self._roots = [Path(r).expanduser().resolve() for r in roots]
        self._keep = keep_runs
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="lamina-ingest")
        self._lock = threading.Lock()
        self._pipeline_lock = threading.Lock()
        self._closing = threading.Event()
        self._runs: OrderedDict[str, _Run] = OrderedDict()
        self._running: dict[str, str] = {}  # dataset -> run id

    def start(self, dataset: str, patterns: Sequence[str], options: IngestSettings) -> str:
        check_dataset_name(dataset)
        confined = confine(patterns, self._roots)
        ingest_options = self._options(options)
        with self._lock:
            if self._closing.is_set():
                raise UnavailableError("the gateway is shutting down; send the request again when it is back")
            running = self._running.get(dataset)
            if running is not None:
                raise ConflictError(
                    f"an ingest of dataset {dataset!r} is already running (run {running}); poll "
                    f"GET {RUNS_PATH}/{running} and send this request again when it has finished",
                    param="dataset",
                    run_id=running,
                )
            run = _Run(run_id=str(uuid.uuid4()), dataset=dataset, started_at=self._clock())
            self._running[dataset] = run.run_id
            self._remember(run)
        self._executor.submit(self._work, run, confined, ingest_options)
        return run.run_id

    def _options(self, settings: IngestSettings) -> IngestOptions:
        options = IngestOptions.from_config(
            self._config,
            chunk_size=settings.chunk_size,
            chunk_overlap=settings.chunk_overlap,
            load=LoadOptions(
                text_field=settings.text_field or LoadOptions().text_field,
                meta_fields=tuple(settings.meta_fields),
            ),
        )
        if options.chunk_overlap >= options.chunk_size:
            raise InvalidRequestError(
                f"chunk_overlap ({options.chunk_overlap}) must be smaller than chunk_size "
                f"({options.chunk_size}); lower chunk_overlap or raise chunk_size",
                param="chunk_overlap",
            )
        return options

    def _remember(self, run: _Run) -> None:
        """Keep ``run``, forgetting the oldest finished runs beyond ``keep_runs`` (caller holds the lock)."""
        self._runs[run.run_id] = run
        finished = [r.run_id for r in self._runs.values() if r.state != "running"]
        for run_id in finished[: max(0, len(self._runs) - self._keep)]:
            del self._runs[run_id]

    def _work(self, run: _Run, patterns: list[str], options: IngestOptions) -> None:
        try:
            with self._pipeline_lock:  # the first call loads the embedder: once, not once per thread
                pipeline = self._make_pipeline()
            report = pipeline.ingest(patterns, run.dataset, options, progress=_Progress(run, self._closing))
        except Exception as exc:
            if not isinstance(exc, LaminaError):
                log.exception("ingest run %s of %s failed", run.run_id, run.dataset)
            error = exc.message if isinstance(exc, LaminaError) else f"{type(exc).__name__}: {exc}"
            self._finish(run, "failed", error=error)
        else:
            self._finish(run, "completed" if report.state == "completed" else "unchanged", report=report)

    def _finish(
        self, run: _Run, state: RunState, *, report: IngestReport | None = None, error: str | None = None
    ) -> None:
        with self._lock:
            run.report, run.error, run.finished_at = report, error, self._clock()
            run.state = state
            if self._running.get(run.dataset) == run.run_id:
                del self._running[run.dataset]

    def status(self, run_id: str) -> dict[str, Any]:
        with self._lock:
            run = self._runs.get(run_id)
            if run is not None:
                return run.to_json()
        stored = self._catalog.runs.get(run_id)
        if stored is None:
            raise NotFoundError(
                f"no ingest run {run_id!r}; run ids come from POST /admin/v1/datasets/NAME/ingest or "
                "`lamina data ingest --json`",
                param="run_id",
            )
        return self._stored_json(stored)

    def _stored_json(self, run: IngestRun) -> dict[str, Any]:
        version: dict[str, Any] | None = None
        if run.version_seq is not None:
            try:
                version = self._catalog.resolve(f"{run.dataset}@{run.version_seq}").to_json()
            except NotFoundError:  # collected since
                version = {"dataset": run.dataset, "seq": run.version_seq}
        return {
            "run_id": run.run_id,
            "dataset": run.dataset,
            "state": run.state,
            "started_at": run.started_at.isoformat(),
            "finished_at": None if run.finished_at is None else run.finished_at.isoformat(),
            "progress": None,
            "counts": run.counts,
            "version": version,
            "skipped": [{"path": p, "reason": r} for p, r in run.skipped],
            "error": run.error,
            "ingest_run_id": run.run_id,
        }

    def datasets(self) -> list[dict[str, Any]]:
        """Every dataset with its newest version: what ``lamina data list --json`` prints."""
        rows = [(name, self._catalog.log(name)) for name in self._catalog.names()]
        return [{"dataset": n, "versions": len(v), "latest": v[0].to_json() if v else None} for n, v in rows]

    def close(self) -> None:
        """Stop: running ingests stop at their next file or batch (nothing committed), queued ones fail."""
        self._closing.set()
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for run in self._runs.values():
                if run.state == "running":
                    run.state, run.error = "failed", "the gateway shut down before this ingest started"


def admin_router(
    service: IngestService,
    authenticate: Callable[[Request], Awaitable[None]],
    max_body_bytes: int = DEFAULT_LIMITS.max_body_bytes,
) -> APIRouter:
    """``/admin/v1``: start an ingest, poll its run, list datasets; behind the gateway's key check."""
    router = APIRouter(prefix="/admin/v1", dependencies=[Depends(authenticate)])

    @router.post("/datasets/{name}/ingest", status_code=202)
    async def ingest(name: str, request: Request) -> Response:
        _, body = parse_body(await read_body(request, max_body_bytes), IngestRequest)
        run_id = await asyncio.to_thread(service.start, name, body.paths, body)
        url = f"{RUNS_PATH}/{run_id}"
        return JSONResponse(
            {"run_id": run_id, "dataset": name, "state": "running", "status_url": url},
            status_code=202,
            headers={"Location": url},
        )

    @router.get("/ingest-runs/{run_id}")
    async def ingest_run(run_id: str) -> Response:
        return JSONResponse(await asyncio.to_thread(service.status, run_id))

    @router.get("/datasets")
    async def list_datasets() -> Response:
        return JSONResponse(await asyncio.to_thread(service.datasets))

    return router
