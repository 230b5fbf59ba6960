"""The whole stack around the gateway: ``build_stack`` makes every object, ``serve`` runs them.

``serve`` runs the gateway and the control loop until SIGINT/SIGTERM, then stops every replica process it
started. This module imports the web stack; ``lamina data`` never imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from lamina.application import (
    AliasCatalog,
    GatewayDeps,
    KeyAuthenticator,
    KeyStore,
    Policy,
    PromptStore,
    ThreadedIngestService,
    create_app,
    gateway_hosts,
)
from lamina.application.guards import output_guards
from lamina.compute import CpuMeter, probe_inventory, sample_devices_forever
from lamina.config import LaminaConfig
from lamina.data import (
    DriftRecorder,
    DriftReports,
    DriftWindow,
    Retriever,
    publish_drift_metrics,
)
from lamina.errors import InvalidRequestError, LaminaError, UnavailableError
from lamina.logs import UVICORN_LOGGING
from lamina.models import (
    Catalog,
    Registry,
    ServedModel,
    deploy,
    register_bundled,
)
from lamina.observability import DriftMetrics, Telemetry
from lamina.orchestration import Controller, Dispatcher, Http1Client, JobScheduler, WorkloadSpec
from lamina.stack._backends import replica_backend
from lamina.stack._config_rollouts import ConfigRollouts
from lamina.stack._dashboard import dashboard_sources
from lamina.stack._data import DataStack, checked_config, open_data_stack, open_registry
from lamina.stack._demo import DemoIngest
from lamina.stack._deployments import RuntimeDeployments
from lamina.stack._deployments_start import open_deployments, serving_readiness
from lamina.stack._doctor import doctor_for
from lamina.stack._doctor import gather_offline as gather_offline  # for `lamina doctor --offline`
from lamina.stack._fit import check_fit, workload_needs
from lamina.stack._gateway_parts import GatewayParts, QueryEmbedders, query_embedder
from lamina.stack._jobs import job_scheduler, open_job_queue, serving_demands
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
    #: the job queue's scheduler (None: jobs.enabled is off)
    jobs: JobScheduler | None = None
    #: policies after the configured ones (a plugin's, or a test's: e.g. a slow guard for the doctor's tests)
    extra_policies: list[Policy] = field(default_factory=list)
    #: deployments made at run time (`lamina deploy`, /admin/v1/deployments); None: no such routes
    deployments: RuntimeDeployments | None = None
    #: the node's CPU utilisation between device samples (the sampler's, and the doctor's look since)
    cpu: CpuMeter = field(default_factory=CpuMeter)

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
        await self.dispatcher.aclose()
        self.drift.close()
        self.data.close()
        self.telemetry.shutdown()
        self.store.close()


def _config_deployments(
    config: LaminaConfig, store: Store, registry: Registry, run_dir: Path
) -> tuple[LaminaConfig, dict[str, str], list[tuple[ServedModel, WorkloadSpec]]]:
    """The config's deployments as they will serve: each where a kept rollout moved it while the config
    still names what it named then (with the model the config names for each), ready to start; refused
    before anything starts unless every replica fits in what this machine has free (README, "Compute")."""
    config, config_models = ConfigRollouts(store).apply(config)
    timeout_s = config.orchestration.ready_timeout_s
    deployed = [deploy(d, registry, run_dir, timeout_s) for d in config.deployments]
    check_fit(workload_needs(registry, [(s.model_ref, w) for s, w in deployed]), [probe_inventory()])
    return config, config_models, deployed


def build_stack(config: LaminaConfig, state_dir: Path) -> Stack:
    """Build every layer on ``config``, whole; starts no process yet."""
    config = checked_config(config)
    store, registry = open_registry(config, state_dir)
    if config.register_bundled:
        register_bundled(registry, [d.model_ref for d in config.deployments])
    run_dir = state_dir / "run"
    config, config_models, deployed = _config_deployments(config, store, registry, run_dir)
    orch = config.orchestration
    telemetry = Telemetry.of(config.observability, store)
    telemetry.device_kinds = {w.name: "gpu" if w.resources.gpus else "cpu" for _, w in deployed}
    http = httpx.AsyncClient(
        timeout=httpx.Timeout(None, connect=5.0), limits=httpx.Limits(max_connections=None)
    )
    backend = replica_backend(orch, state_dir)  # local processes or Ray actors (orchestration.backend)
    controller = Controller(
        backend,
        http=http,
        health_interval_s=orch.health_interval_s,
        restart_backoff_s=orch.restart_backoff_s,
        restart_backoff_max_s=orch.restart_backoff_max_s,
        unhealthy_checks=orch.unhealthy_checks,
        load=lambda: dispatcher.in_flight(),  # autoscaling and draining see the requests in flight
        drain_grace_s=orch.drain_grace_s,
    )
    dispatcher = Dispatcher(controller, Http1Client(), backend, retry_deadline_s=orch.retry_deadline_s)
    catalog = Catalog([s for s, _ in deployed], readiness=lambda: _readiness(controller))
    data = open_data_stack(config, state_dir, store=store, registry=registry)
    queries, query_model = query_embedder(config, registry, catalog, dispatcher, data)
    other_models = QueryEmbedders(registry, catalog, dispatcher, data)  # versions embedded with other models
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
        retriever=Retriever(data.catalog, data.vectors, queries, query_model, other_models),
        drift=DriftRecorder(DriftWindow(store)),
        drift_metrics=DriftMetrics(telemetry.metrics.registry),
        ingest=ThreadedIngestService(data.pipeline, data.catalog, config.data, config.data.ingest_roots),
        deployments=open_deployments(
            config, registry, store, controller, catalog, run_dir, deployed, config_models
        ),
        jobs=None
        if not config.jobs.enabled
        else job_scheduler(
            config,
            state_dir,
            open_job_queue(config, state_dir, store),
            probe_inventory(),
            serving_demands(controller.status, lambda: [w for _, w in deployed], cpus=config.jobs.nice == 0),
        ),
    )


def _readiness(controller: Controller) -> dict[str, bool]:
    return serving_readiness(controller)  # a deployment scaled to zero serves (cold start); draining: not


def create_gateway(
    stack: Stack, on_ready: Callable[[], None] | None = None, *, host: str | None = None
) -> FastAPI:
    """The gateway app whose lifespan runs the control loop and stops every replica at the end; ``host``:
    the address it is bound to (default: server.host), which it answers to."""
    parts = GatewayParts.of(stack)
    return create_app(_deps(stack, parts, host), lifespan=_lifespan(stack, parts, on_ready))


def _lifespan(
    stack: Stack, parts: GatewayParts, on_ready: Callable[[], None] | None
) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    """The gateway's background work: the control loop, the job queue, readiness, drift and device
    metrics, warming the search indexes, the demo dataset and the rollouts a restart interrupted;
    stopped, and every part closed, at the end."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        stop = asyncio.Event()
        stack.controller.apply(stack.workloads)
        loop_task = asyncio.create_task(stack.controller.run(stop), name="lamina-control-loop")
        jobs = stack.jobs
        jobs_task = None if jobs is None else asyncio.create_task(jobs.run(stop), name="lamina-jobs")
        devices = stack.telemetry.devices  # also what each request's compute span reads
        helpers: list[asyncio.Task[object]] = [
            asyncio.create_task(_announce_ready(stack, on_ready)),
            asyncio.create_task(_publish_drift_forever(stack), name="lamina-drift-metrics"),
            asyncio.create_task(
                sample_devices_forever(devices, meter=stack.cpu), name="lamina-device-metrics"
            ),
            asyncio.create_task(asyncio.to_thread(stack.warm_search), name="lamina-warm-search"),
        ]
        if stack.deployments is not None:  # the rollouts a restart interrupted
            helpers.append(asyncio.create_task(stack.deployments.resume_rollouts(), name="lamina-rollouts"))
        demo = DemoIngest(stack.config, stack.data)  # the demo dataset, never before readiness
        demo_task = asyncio.create_task(asyncio.to_thread(demo.start), name="lamina-demo-ingest")
        try:
            yield
        finally:
            for task in helpers:
                task.cancel()
            stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await loop_task
                if jobs_task is not None:  # its job processes stop; their jobs wait for the next start
                    await jobs_task
            await demo.aclose(demo_task)
            await parts.aclose()
            await stack.aclose()

    return lifespan


def _deps(stack: Stack, parts: GatewayParts, host: str | None) -> GatewayDeps:
    config = stack.config
    return GatewayDeps(
        catalog=AliasCatalog(stack.catalog if parts.router is None else parts.router.catalog, parts.aliases),
        dispatcher=stack.dispatcher,
        readiness=stack.readiness,
        telemetry=stack.telemetry,
        api_keys=config.server.api_keys,
        authenticator=KeyAuthenticator(KeyStore(stack.store), config.server.api_keys),
        allowed_hosts=gateway_hosts(host or config.server.host, config.server.allowed_hosts),
        allowed_origins=config.server.allowed_origins,
        retriever=stack.retriever,
        rag_aliases=parts.aliases,
        query_sink=stack.drift if parts.recorder is None else parts.recorder,
        ingest=stack.ingest,
        policies=parts.policies,
        output_guards=output_guards(config.guards, stack.telemetry.metrics, stack.registry),
        limits=config.limits,
        router=parts.router,
        cache=parts.cache,
        prompts=PromptStore(stack.store),
        deployments=stack.deployments,
        traces_store=stack.store,
        doctor=doctor_for(stack),
        access_log=config.observability.access_log,
        dashboard=dashboard_sources(
            config=config,
            store=stack.store,
            telemetry=stack.telemetry,
            controller=stack.controller,
            registry=stack.registry,
            catalog=stack.catalog,
            datasets=stack.data.catalog,
            rag_aliases=list(parts.aliases),
            jobs=None if stack.jobs is None else stack.jobs.queue,
            doctor=doctor_for(stack),
        ),
    )


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


def bind_gateway(host: str, port: int) -> socket.socket:
    """The gateway's listening socket, bound before anything starts: a port in use or an address not of
    this machine is a clear error at once, not after the models are loaded (and not uvicorn's bare
    ``[Errno 98]``)."""
    address = host.strip("[]")
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no obstacle
    try:
        sock.bind((address, port))
    except OSError as exc:
        sock.close()
        where, port_hint = f"{host}:{port}", "choose another port with --port (or server.port in lamina.yaml)"
        if exc.errno == errno.EADDRINUSE:
            raise UnavailableError(
                f"{where} is already in use (another `lamina up`, or another server): stop it, or {port_hint}"
            ) from exc
        if exc.errno == errno.EACCES:
            raise InvalidRequestError(
                f"listening on {where} needs privileges this user lacks: {port_hint}"
            ) from exc
        raise InvalidRequestError(
            f"cannot listen on {where} ({exc.strerror or exc}): give an address of this machine with --host "
            "or server.host (127.0.0.1: this machine only; 0.0.0.0: every interface)"
        ) from exc
    return sock


def serve(stack: Stack, sock: socket.socket, host: str, on_ready: Callable[[], None] | None = None) -> None:
    """Run the gateway on ``sock`` (``bind_gateway``) in the foreground until SIGINT or SIGTERM; every
    replica is stopped on the way out."""
    app = create_gateway(stack, on_ready, host=host)
    loop = "auto" if stack.config.server.event_loop == "uvloop" else "asyncio"  # auto: uvloop if installed
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, lifespan="on", loop=loop, **UVICORN_LOGGING)
    )
    settle_garbage_collector()
    server.run(sockets=[sock])


#: the collector's first threshold in the gateway: allocations between young-generation collections
GC_YOUNG_THRESHOLD = 10_000


def settle_garbage_collector() -> None:
    """What is loaded by now (modules, models, guards) lives as long as the process: frozen out of the
    cyclic collector's passes, which then walk only what requests allocate, and run a tenth as often
    (CPython's default, 700 allocations, is a pass every request or two here); README, "Gateway overhead"
    has the figures."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
