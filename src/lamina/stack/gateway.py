"""The whole stack around the gateway: ``build_stack`` makes every object, ``serve`` runs them.

``serve`` runs the gateway and the control loop until SIGINT/SIGTERM, then stops every replica process it
started. This module imports the web stack; ``lamina data`` never imports it.
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

from lamina.application import (
    CostPolicy,
    GatewayDeps,
    KeyAuthenticator,
    KeyStore,
    ModelRouter,
    Policy,
    PromptStore,
    RagOptions,
    ResponseCache,
    SemanticIndex,
    ThreadedIngestService,
    close_policies,
    create_app,
    gateway_hosts,
    gpu_hour_usd,
    replica_hourly_usd,
    response_cache,
)
from lamina.application.guards import input_guards, output_guards
from lamina.compute import probe_inventory, sample_devices_forever
from lamina.config import LaminaConfig
from lamina.data import (
    AsyncEmbedder,
    DriftRecorder,
    DriftReports,
    DriftWindow,
    Retriever,
    publish_drift_metrics,
)
from lamina.errors import LaminaError
from lamina.models import (
    Catalog,
    DispatchQueryEmbedder,
    Registry,
    ThreadQueryEmbedder,
    deploy,
    register_bundled,
)
from lamina.observability import DeviceMetrics, DriftMetrics, Telemetry
from lamina.orchestration import Controller, Dispatcher, LocalProcessBackend, WorkloadSpec
from lamina.stack._data import DataStack, checked_config, open_data_stack, open_registry
from lamina.stack._fit import check_fit, workload_needs
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
        return _readiness(self.controller)

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


def build_stack(config: LaminaConfig, state_dir: Path) -> Stack:
    """Build every layer on ``config``, whole; starts no process yet."""
    config = checked_config(config)
    store, registry = open_registry(config, state_dir)
    if config.register_bundled:
        register_bundled(registry)
    orch = config.orchestration
    run_dir = state_dir / "run"
    deployed = [deploy(d, registry, run_dir, orch.ready_timeout_s) for d in config.deployments]
    # before anything starts: every replica must fit in what this machine has free (README, "Compute")
    check_fit(workload_needs(registry, [(s.model_ref, w) for s, w in deployed]), [probe_inventory()])
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
        unhealthy_checks=orch.unhealthy_checks,
    )
    dispatcher = Dispatcher(controller, http, retry_deadline_s=orch.retry_deadline_s)
    catalog = Catalog([s for s, _ in deployed], readiness=lambda: _readiness(controller))
    data = open_data_stack(config, state_dir, store=store, registry=registry)
    queries, query_model = _query_embedder(config, registry, catalog, dispatcher, data)
    return Stack(
        config=config,
        state_dir=state_dir,
        store=store,
        registry=registry,
        telemetry=telemetry,
        http=http,
        controller=controller,
        dispatcher=dispatcher,
        catalog=catalog,
        workloads=[w for _, w in deployed],
        data=data,
        retriever=Retriever(data.catalog, data.vectors, queries, query_model),
        drift=DriftRecorder(DriftWindow(store)),
        drift_metrics=DriftMetrics(telemetry.metrics.registry),
        ingest=ThreadedIngestService(data.pipeline, data.catalog, config.data, config.data.ingest_roots),
    )


def _readiness(controller: Controller) -> dict[str, bool]:
    return {d.name: d.ready > 0 for d in controller.status()}


def _query_embedder(
    config: LaminaConfig, registry: Registry, catalog: Catalog, dispatcher: Dispatcher, data: DataStack
) -> tuple[AsyncEmbedder, str | None]:
    """Queries are embedded by a replica serving the datasets' embedding model, else in-process; with the
    ``name@version`` of that model."""
    try:
        ref = registry.get(config.data.embedding_model).ref
    except LaminaError:
        ref = None
    deployment = None if ref is None else catalog.serving(ref)
    if deployment is not None:
        return DispatchQueryEmbedder(dispatcher, deployment), ref
    return ThreadQueryEmbedder(data.embedder), ref


def create_gateway(
    stack: Stack, on_ready: Callable[[], None] | None = None, *, host: str | None = None
) -> FastAPI:
    """The gateway app whose lifespan runs the control loop and stops every replica at the end; ``host``:
    the address it is bound to (default: server.host), which it answers to."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        stop = asyncio.Event()
        stack.controller.apply(stack.workloads)
        loop_task = asyncio.create_task(stack.controller.run(stop), name="lamina-control-loop")
        ready_task = asyncio.create_task(_announce_ready(stack, on_ready))
        drift_task = asyncio.create_task(_publish_drift_forever(stack), name="lamina-drift-metrics")
        devices = DeviceMetrics(stack.telemetry.metrics.registry)
        device_task = asyncio.create_task(sample_devices_forever(devices), name="lamina-device-metrics")
        warm_task = asyncio.create_task(asyncio.to_thread(stack.warm_search), name="lamina-warm-search")
        try:
            yield
        finally:
            ready_task.cancel()
            drift_task.cancel()
            device_task.cancel()
            warm_task.cancel()
            stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await loop_task
            await close_policies(policies)
            if cache is not None:
                await cache.aclose()
            await stack.aclose()

    policies = _policies(stack)
    cache = _response_cache(stack)
    router = _router(stack)
    deps = GatewayDeps(
        catalog=stack.catalog if router is None else router.catalog,
        dispatcher=stack.dispatcher,
        readiness=stack.readiness,
        telemetry=stack.telemetry,
        api_keys=stack.config.server.api_keys,
        authenticator=KeyAuthenticator(KeyStore(stack.store), stack.config.server.api_keys),
        allowed_hosts=gateway_hosts(host or stack.config.server.host, stack.config.server.allowed_hosts),
        allowed_origins=stack.config.server.allowed_origins,
        retriever=stack.retriever,
        rag_aliases={
            a.name: (a.model, RagOptions(dataset=a.dataset, k=a.k, mode=a.mode)) for a in stack.config.rag
        },
        query_sink=stack.drift,
        ingest=stack.ingest,
        policies=policies,
        output_guards=output_guards(stack.config.guards, stack.telemetry.metrics, stack.registry),
        limits=stack.config.limits,
        router=router,
        cache=cache,
        prompts=PromptStore(stack.store),
    )
    return create_app(deps, lifespan=lifespan)


def _policies(stack: Stack) -> list[Policy]:
    """The gateway's policies from the config, in the order a call meets them."""
    from lamina.application import RateLimitPolicy

    config = stack.config
    served = [d.name for d in config.deployments] + [a.name for a in config.rag]
    served += [g.name for g in config.groups]
    # always on, even with no limit configured: a key created while the gateway runs may carry limits,
    # and a call that no limit applies to costs a few attribute reads (README, "Rate limits")
    policies: list[Policy] = [RateLimitPolicy(config.rate_limits, known_models=served)]
    policies.append(CostPolicy(stack.store, stack.config.costs, _replica_hourly_usd(stack)))
    # last: a call refused by a limit or a budget costs no guard time (README, "Guardrails")
    guards = input_guards(config.guards, stack.telemetry.metrics, stack.registry)
    if guards is not None:
        policies.append(guards)
    return policies


def _router(stack: Stack) -> ModelRouter | None:
    """The model groups of the config (None: none), priced for lowest_cost in USD per million tokens: a
    member's token prices (costs.models, input and output averaged), else its replica's hourly compute
    price over its conservative tokens/s (costs.tokens_per_second)."""
    config = stack.config
    if not config.groups:
        return None
    costs = config.costs
    hourly = _replica_hourly_usd(stack) if any(g.strategy == "lowest_cost" for g in config.groups) else {}

    def cost_of(member: str) -> float | None:
        price = costs.models.get(member)
        if price is not None:
            return (price.input_per_million + price.output_per_million) / 2
        if member not in hourly:
            return None
        rate = costs.tokens_per_second.get(member, costs.default_tokens_per_second)
        return hourly[member] / (rate * 3600) * 1e6

    return ModelRouter(config.groups, stack.catalog, stack.telemetry, stack.readiness, cost_of=cost_of)


def _response_cache(stack: Stack) -> ResponseCache | None:
    """The response cache of the config (None: off). Its key is salted with the guard configuration; the
    semantic cache embeds with a query embedder built like the retriever's, into the vector store."""
    config = stack.config
    semantic = None
    if config.cache.enabled and config.cache.semantic.enabled:
        queries, _ = _query_embedder(config, stack.registry, stack.catalog, stack.dispatcher, stack.data)
        semantic = SemanticIndex(
            stack.data.vectors,
            queries,
            min_similarity=config.cache.semantic.min_similarity,
            max_entries=config.cache.max_entries,
        )
    return response_cache(config.cache, stack.store, salt=config.guards.model_dump_json(), semantic=semantic)


def _replica_hourly_usd(stack: Stack) -> dict[str, float]:
    """USD per hour of one replica of each deployment: its cores (a GGUF replica's threads) and its GPUs,
    priced by the name of this machine's first GPU (NVML is asked only when a deployment uses a GPU)."""
    costs = stack.config.costs
    gpu_price = 0.0
    if any(w.resources.gpus for w in stack.workloads):
        names = [gpu.name for gpu in probe_inventory().gpus]
        price = gpu_hour_usd(costs, names[0]) if names else None
        if price is None:
            log.warning(
                "no price for the GPU %s: add it to costs.gpu_hour_usd; GPU time is priced at 0 until then",
                names[0] if names else "(none found)",
            )
        gpu_price = price or 0.0
    return {
        w.name: replica_hourly_usd(costs, w.resources.cpus, [gpu_price] * w.resources.gpus)
        for w in stack.workloads
    }


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
    app = create_gateway(stack, on_ready, host=host)
    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on")
    )
    server.run()
