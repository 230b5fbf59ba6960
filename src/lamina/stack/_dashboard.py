"""The dashboard's ports, filled from the stack's own objects (see ``DashboardSources``).

Each adapter turns one layer's records into the dashboard's views; a port whose part of the stack does
not exist stays ``None`` and its page says so. The jobs and the doctor are wired by their own modules
when the stack has them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from lamina.application import CostLedger
from lamina.application.dashboard import (
    DashboardSources,
    DeploymentView,
    Link,
    ReplicaView,
    StoreTraces,
    Table,
    Verdict,
)
from lamina.config import LaminaConfig
from lamina.data import DatasetCatalog, DriftReports
from lamina.models import Catalog, Registry
from lamina.observability import Telemetry
from lamina.observability import Verdict as Diagnosis
from lamina.orchestration import Controller, JobQueue
from lamina.store import Store

#: versions of each dataset the Datasets page lists (the lineage page of a version shows all of it)
_VERSIONS_SHOWN = 5


def dashboard_sources(
    *,
    config: LaminaConfig,
    store: Store,
    telemetry: Telemetry,
    controller: Controller,
    registry: Registry,
    catalog: Catalog,
    datasets: DatasetCatalog,
    rag_aliases: Sequence[str],
    jobs: JobQueue | None = None,
    doctor: Callable[[str], Awaitable[Diagnosis]] | None = None,
) -> DashboardSources:
    """Every port the stack can fill; ``jobs`` (the job queue, when jobs are on) and ``doctor`` come from
    their own parts of the stack."""
    chat = [m.id for m in catalog.models() if "chat" in m.capabilities]
    return DashboardSources(
        metrics=lambda: telemetry.render_metrics()[0],
        deployments=lambda: deployment_views(controller),
        models=lambda: models_table(registry, catalog),
        chat_models=lambda: [*rag_aliases, *chat],
        playground_model=next(iter(rag_aliases), None) or next(iter(chat), None),
        datasets=lambda: datasets_table(datasets),
        lineage=lambda ref: lineage_table(datasets, ref),
        drift=lambda: drift_table(DriftReports(store)),
        costs=CostLedger(store),
        traces=StoreTraces(store) if config.observability.store_spans else None,
        jobs=None if jobs is None else (lambda: jobs_table(jobs)),
        doctor=None if doctor is None else doctor_port(doctor),
    )


def doctor_port(
    doctor: Callable[[str], Awaitable[Diagnosis]], window: str = "15m"
) -> Callable[[], Awaitable[Verdict]]:
    """The doctor (``/admin/v1/doctor``'s) over the last ``window``, as the overview shows it."""

    async def verdict() -> Verdict:
        found = await doctor(window)
        if found.bottleneck is None:
            summary = f"too little traffic in the last {window} to name a layer ({found.requests} requests)"
        else:
            summary = f"the layer to investigate, over {found.requests} requests in the last {window}"
        problems = [f"broken: {p.layer}: {p.what} ({p.action})" for p in found.problems]
        return Verdict(found.bottleneck, summary, (*found.evidence, *problems), "; ".join(found.actions))

    return verdict


def deployment_views(controller: Controller) -> list[DeploymentView]:
    return [
        DeploymentView(
            name=d.name,
            desired=d.desired,
            replicas=tuple(
                ReplicaView(
                    replica_id=r.replica_id,
                    state=str(getattr(r.state, "value", r.state)),
                    pid=r.pid,
                    url=r.url,
                    restarts=r.restarts,
                    last_error=r.last_error,
                )
                for r in d.replicas
            ),
        )
        for d in controller.status()
    ]


def models_table(registry: Registry, catalog: Catalog) -> Table:
    served: dict[str, list[str]] = {}
    for card in catalog.models():
        if card.version:
            served.setdefault(card.version, []).append(card.id)
    rows = [
        (
            mv.ref,
            str(mv.format),
            f"{mv.size_bytes / 1e6:,.1f} MB",
            ", ".join(mv.aliases) or None,
            ", ".join(served.get(mv.ref, [])) or "not served",
            mv.sha256[:12],
            mv.created_at.strftime("%Y-%m-%d %H:%M"),
        )
        for mv in registry.list()
    ]
    columns = ("model", "format", "size", "aliases", "served by", "sha256", "registered")
    return Table(columns, rows, note="the model registry; `lamina models list` prints the same")


def datasets_table(catalog: DatasetCatalog) -> Table:
    rows: list[tuple[str | int | Link | None, ...]] = []
    for name in catalog.names():
        for version in catalog.log(name)[:_VERSIONS_SHOWN]:
            sources = catalog.sources(version)
            rows.append(
                (
                    name,
                    Link(f"@{version.seq}", f"/ui/datasets/{version.ref}"),
                    version.version_id[:12],
                    version.created_at.strftime("%Y-%m-%d %H:%M"),
                    len(sources),
                    sum(s.n_chunks for s in sources),
                    ", ".join(version.tags) or None,
                    version.embedding_model,
                )
            )
    columns = ("dataset", "version", "id", "created", "files", "chunks", "tags", "embedding model")
    return Table(
        columns,
        rows,
        note=f"the newest {_VERSIONS_SHOWN} versions of each; a version's page shows its lineage",
    )


def lineage_table(catalog: DatasetCatalog, ref: str) -> Table:
    version = catalog.resolve(ref)
    rows = [
        (s.uri, s.sha256[:12], f"{s.size_bytes:,} B", len(s.documents), s.n_chunks)
        for s in catalog.sources(version)
    ]
    note = (
        f"{version.ref} ({version.version_id[:12]}), ingest run {version.run_id}, pipeline "
        f"{version.pipeline_version}: every chunk of this version comes from one of these files"
    )
    return Table(("source", "sha256", "size", "documents", "chunks"), rows, note=note)


def drift_table(reports: DriftReports) -> Table:
    rows = [
        (r.dataset, r.version, r.window, r.verdict, r.created_at.strftime("%Y-%m-%d %H:%M"), r.explanation)
        for r in reports.latest()
    ]
    columns = ("dataset", "version", "window", "verdict", "checked", "explanation")
    return Table(columns, rows, note="the newest report of each dataset; `lamina data drift` writes them")


#: jobs the Jobs page lists, newest first
_JOBS_SHOWN = 100


def jobs_table(queue: JobQueue) -> Table:
    rows = [
        (
            job.id,
            job.kind,
            str(job.state),
            f"{job.progress:.0%}",
            job.priority,
            f"{job.attempts}/{job.max_attempts}",
            job.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            job.error or job.message or None,
        )
        for job in queue.list(limit=_JOBS_SHOWN)
    ]
    columns = ("job", "kind", "state", "progress", "priority", "attempts", "submitted", "message")
    return Table(columns, rows, note=f"the newest {_JOBS_SHOWN} jobs; `lamina jobs` manages them")
