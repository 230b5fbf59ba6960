"""The composition root: reads the config once, builds each layer and wires them together.

Nothing else in Lamina reads the environment or builds layers from global state. ``build_stack`` makes
the objects; ``serve`` runs the gateway and the control loop until SIGINT/SIGTERM, then stops every
replica process it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from lamina._data_stack import DataStack, open_data_stack
from lamina.application import GatewayDeps, create_app
from lamina.application._admin import ThreadedIngestService
from lamina.application._rag import RagOptions
from lamina.config import DeploymentConfig, LaminaConfig
from lamina.data import (
    AsyncEmbedder,
    DriftRecorder,
    DriftReports,
    DriftWindow,
    Retriever,
    publish_drift_metrics,
)
from lamina.errors import ConfigError, LaminaError
from lamina.models import (
    Catalog,
    DispatchQueryEmbedder,
    Registry,
    ServedModel,
    ThreadQueryEmbedder,
    register_bundled,
    worker_workload,
)
from lamina.observability import DriftMetrics, Telemetry
from lamina.orchestration import Controller, Dispatcher, LocalProcessBackend, WorkloadSpec
from lamina.store import Store

log = logging.getLogger("lamina")


@dataclass
class Stack:
    """Every long-lived object of one running Lamina, wired."""

    config: LaminaConfig
    state_dir: Path
    store: Store
    registry: Registry
    telemetry: Telemetry
    http: httpx.AsyncClient
    controller: Controller
    dispatcher: Dispatcher
    catalog: Catalog
    workloads: list[WorkloadSpec]
    data: DataStack
    retriever: Retriever
    drift: DriftRecorder
    drift_metrics: DriftMetrics
    ingest: ThreadedIngestService

    def readiness(self) -> dict[str, bool]:
        return {d.name: d.ready > 0 for d in self.controller.status()}

    def warm_search(self) -> None:
        """Load the search index of every dataset's newest version and of every RAG alias's version, so
        the first retrievals after a start do not wait for it."""
        try:
            refs = [*self.data.catalog.names(), *(a.dataset for a in self.config.rag)]
            self.retriever.warm(list(dict.fromkeys(refs)))
        except LaminaError as exc:
            log.warning("could not warm the search indexes: %s", exc)

    def publish_drift(self) -> None:
        """Export the newest stored drift report of each dataset as gauges."""
        publish_drift_metrics(DriftReports(self.store).latest(), self.drift_metrics)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.ingest.close)  # running ingests stop before committing
        await self.controller.shutdown()
        await self.http.aclose()
        self.drift.close()
        self.data.close()
        self.telemetry.shutdown()
        self.store.close()


def open_registry(config: LaminaConfig, state_dir: Path) -> tuple[Store, Registry]:
    """The migrated metadata store and the model registry of a state directory."""
    state_dir.mkdir(parents=True, exist_ok=True)
    store = Store(config.database_url(state_dir))
    store.migrate()
    return store, Registry(store, state_dir / "blobs")


def _served_model(
    dep: DeploymentConfig, registry: Registry, run_dir: Path, ready_timeout_s: float
) -> tuple[ServedModel, WorkloadSpec]:
    if dep.engine == "fake":
        spec = worker_workload(
            deployment=dep, engine="fake", path=None, sha256=None, extra_files={},
            model_version=None, run_dir=run_dir, ready_timeout_s=ready_timeout_s,
        )  # fmt: skip
        return ServedModel(deployment=dep.name, engine="fake", model_ref=None), spec
    mv = registry.get(dep.model_ref)
    engine = dep.engine or mv.format
    if engine != mv.format:
        raise ConfigError(
            f"deployment {dep.name!r} asks for engine {engine!r} but {mv.ref} is a {mv.format} file; "
            f"set `engine: {mv.format}` or leave it out"
        )
    spec = worker_workload(
        deployment=dep, engine=engine, path=mv.path, sha256=mv.sha256, extra_files=mv.extra_files,
        model_version=mv.ref, run_dir=run_dir, ready_timeout_s=ready_timeout_s,
    )  # fmt: skip
    aliases = tuple(n for n in (mv.ref, dep.model_ref) if n != dep.name)
    served = ServedModel(
        deployment=dep.name, engine=engine, model_ref=mv.ref, aliases=aliases,
        created=int(mv.created_at.timestamp()),
    )  # fmt: skip
    return served, spec


def build_stack(config: LaminaConfig, state_dir: Path) -> Stack:
    """Build every layer on ``config``; starts no process yet."""
    store, registry = open_registry(config, state_dir)
    if config.register_bundled:
        register_bundled(registry)
    run_dir = state_dir / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    orch = config.orchestration
    pairs = [_served_model(d, registry, run_dir, orch.ready_timeout_s) for d in config.deployments]
    telemetry = Telemetry(
        service_name=config.observability.service_name,
        store=store if config.observability.store_spans else None,
        otlp_endpoint=config.observability.otlp_endpoint,
    )
    http = httpx.AsyncClient(
        timeout=httpx.Timeout(None, connect=5.0), limits=httpx.Limits(max_connections=None)
    )
    controller = Controller(
        LocalProcessBackend(state_dir / "logs"),
        http=http,
        health_interval_s=orch.health_interval_s,
        restart_backoff_s=orch.restart_backoff_s,
        restart_backoff_max_s=orch.restart_backoff_max_s,
    )
    dispatcher = Dispatcher(controller, http, retry_deadline_s=orch.retry_deadline_s)
    served = [s for s, _ in pairs]
    data = open_data_stack(config, state_dir, store=store, registry=registry)
    queries, query_model = _query_embedder(config, registry, served, dispatcher, data)
    retriever = Retriever(data.catalog, data.vectors, queries, query_model)
    stack = Stack(
        config=config, state_dir=state_dir, store=store, registry=registry, telemetry=telemetry,
        http=http, controller=controller, dispatcher=dispatcher, catalog=Catalog([]), workloads=[],
        data=data, retriever=retriever, drift=DriftRecorder(DriftWindow(store)),
        drift_metrics=DriftMetrics(telemetry.metrics.registry),
        ingest=ThreadedIngestService(data.pipeline, data.catalog, config.data, config.data.ingest_roots),
    )  # fmt: skip
    stack.catalog = Catalog(served, readiness=stack.readiness)
    stack.workloads = [w for _, w in pairs]
    return stack


def _query_embedder(
    config: LaminaConfig,
    registry: Registry,
    served: list[ServedModel],
    dispatcher: Dispatcher,
    data: DataStack,
) -> tuple[AsyncEmbedder, str | None]:
    """Queries are embedded by a replica serving the datasets' embedding model, else in-process; with the
    ``name@version`` of that model."""
    try:
        ref = registry.get(config.data.embedding_model).ref
    except LaminaError:
        ref = None
    deployment = next((s.deployment for s in served if ref is not None and s.model_ref == ref), None)
    if deployment is not None:
        return DispatchQueryEmbedder(dispatcher, deployment), ref
    return ThreadQueryEmbedder(data.embedder), ref


def create_gateway(stack: Stack, on_ready: Callable[[], None] | None = None) -> FastAPI:
    """The gateway app whose lifespan runs the control loop and stops every replica at the end."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        stop = asyncio.Event()
        stack.controller.apply(stack.workloads)
        loop_task = asyncio.create_task(stack.controller.run(stop), name="lamina-control-loop")
        ready_task = asyncio.create_task(_announce_ready(stack, on_ready))
        drift_task = asyncio.create_task(_publish_drift_forever(stack), name="lamina-drift-metrics")
        warm_task = asyncio.create_task(asyncio.to_thread(stack.warm_search), name="lamina-warm-search")
        try:
            yield
        finally:
            ready_task.cancel()
            drift_task.cancel()
            warm_task.cancel()
            stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await loop_task
            await stack.aclose()

    deps = GatewayDeps(
        catalog=stack.catalog,
        dispatcher=stack.dispatcher,
        readiness=stack.readiness,
        telemetry=stack.telemetry,
        api_keys=stack.config.server.api_keys,
        retriever=stack.retriever,
        rag_aliases={
            a.name: (a.model, RagOptions(dataset=a.dataset, k=a.k, mode=a.mode)) for a in stack.config.rag
        },
        query_sink=stack.drift,
        ingest=stack.ingest,
    )
    return create_app(deps, lifespan=lifespan)


async def _publish_drift_forever(stack: Stack, every_s: float = 30.0) -> None:
    """Drift reports are written by `lamina data drift` (any process); the gauges follow them."""
    while True:
        try:
            await asyncio.to_thread(stack.publish_drift)
        except LaminaError as exc:
            log.warning("could not export drift metrics: %s", exc)
        await asyncio.sleep(every_s)


async def _announce_ready(stack: Stack, on_ready: Callable[[], None] | None) -> None:
    if await stack.controller.wait_ready(stack.config.orchestration.ready_timeout_s) and on_ready:
        on_ready()


def serve(stack: Stack, host: str, port: int, on_ready: Callable[[], None] | None = None) -> None:
    """Run the gateway in the foreground until SIGINT or SIGTERM; every replica is stopped on the way out."""
    app = create_gateway(stack, on_ready)
    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on")
    )
    server.run()
