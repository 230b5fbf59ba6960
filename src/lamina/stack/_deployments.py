"""Deployments made while the stack runs: the admin API's :class:`DeploymentManager`, wired here.

It owns the path from a request to serving replicas: the registry lookup and the engine's options (the
models layer's ``deploy``), the will-it-fit check on what this machine has free now (``_fit``, as
``build_stack`` does for the config), the metadata store (so a restart restores it), the controller (run
its replicas, autoscaled when the replica count is a range) and the catalog (so clients can call it).
Everything that can refuse a deployment runs before anything is stored or started.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lamina.application import DeployRequest
from lamina.compute import NodeInventory, probe_inventory
from lamina.config import LaminaConfig
from lamina.errors import (
    ConfigError,
    ConflictError,
    InvalidRequestError,
    LaminaError,
    ModelNotFoundError,
    NotFoundError,
)
from lamina.models import Catalog, Registry, ServedModel, check_deployment, deploy
from lamina.orchestration import AutoscalePolicy, Controller, WorkloadSpec
from lamina.stack._deployment_store import DeploymentStore, StoredDeployment
from lamina.stack._fit import check_fit, workload_needs
from lamina.store import Store

log = logging.getLogger("lamina.deployments")


class RuntimeDeployments:
    """Implements the admin API's DeploymentManager over the registry, controller, catalog and store."""

    def __init__(
        self,
        *,
        config: LaminaConfig,
        registry: Registry,
        repo: DeploymentStore,
        controller: Controller,
        catalog: Catalog,
        run_dir: Path,
        inventory: Callable[[], Sequence[NodeInventory]] = lambda: [probe_inventory()],
        drain_timeout_s: float = 60.0,
    ) -> None:
        self._config = config
        self._registry = registry
        self._repo = repo
        self._controller = controller
        self._catalog = catalog
        self._run_dir = run_dir
        self._inventory = inventory
        self._drain_timeout_s = drain_timeout_s
        self._stored: dict[str, StoredDeployment] = {}
        #: stored deployments that could not be restored at start, with why
        self._broken: dict[str, tuple[StoredDeployment, str]] = {}

    # ---- start -------------------------------------------------------------------------------------

    def restore(self) -> list[str]:
        """Start serving every stored deployment again (at build time); one that fails is logged, kept
        in the store (fix the cause and restart) and listed as failed. Returns the names restored."""
        restored = []
        for stored in self._repo.list():
            try:
                served, workload = self._prepare(stored, check_space=False)
                self._start(stored, served, workload)
            except LaminaError as exc:
                self._broken[stored.name] = (stored, exc.message)
                log.error("could not restore deployment %r: %s", stored.name, exc.message)
                continue
            restored.append(stored.name)
        return restored

    # ---- DeploymentManager -------------------------------------------------------------------------

    async def deploy(self, request: DeployRequest) -> dict[str, Any]:
        low, high = request.replica_range
        stored = StoredDeployment(
            name=request.deployment_name,
            model=request.model,
            engine=request.engine,
            options=request.options,
            min_replicas=low,
            max_replicas=high,
            target_concurrency=request.target_concurrency,
            autoscale=request.timings(),
        )
        self._refuse_taken(stored.name)
        with contextlib.suppress(ModelNotFoundError):
            taken = self._catalog.resolve(stored.name).deployment  # another deployment's model name
            raise ConflictError(
                f"{stored.name!r} already reaches the deployment {taken!r}; choose another --name"
            )
        served, workload = await asyncio.to_thread(self._prepare, stored, check_space=True)
        stored = await asyncio.to_thread(self._repo.add, stored)  # a name taken meanwhile: ConflictError
        try:
            self._start(stored, served, workload)
        except LaminaError:
            await asyncio.to_thread(self._repo.delete, stored.name)
            raise
        log.info("deployed %s (%s, replicas %d..%d)", stored.name, stored.model, low, high)
        return self._describe(stored.name)

    def list(self) -> list[dict[str, Any]]:
        names = {d.name for d in self._config.deployments} | set(self._stored) | set(self._broken)
        return [self._describe(name) for name in sorted(names)]

    async def undeploy(self, name: str) -> dict[str, Any]:
        if any(d.name == name for d in self._config.deployments):
            raise ConflictError(
                f"{name!r} is a deployment of the config file; remove it from `deployments` in lamina.yaml "
                "and restart the stack (`lamina undeploy` removes deployments made with `lamina deploy`)"
            )
        if name not in self._stored and name not in self._broken:
            known = ", ".join(sorted(self._stored)) or "none"
            raise NotFoundError(f"no run-time deployment named {name!r} (run-time deployments: {known})")
        started = time.monotonic()
        await asyncio.to_thread(self._repo.delete, name)  # first: a restart meanwhile does not restore it
        self._broken.pop(name, None)
        if self._stored.pop(name, None) is not None:
            self._catalog.remove(name)  # stop routing: new requests for it are a 404 from here on
            with contextlib.suppress(ModelNotFoundError):
                self._controller.remove(name)
            deadline = started + self._drain_timeout_s
            while not self._controller.gone(name) and time.monotonic() < deadline:
                await self._controller.wait_for_change(0.2)
        return {"name": name, "deleted": True, "drained_s": round(time.monotonic() - started, 3)}

    # ---- the parts -----------------------------------------------------------------------------------

    def _refuse_taken(self, name: str) -> None:
        config = self._config
        taken = {d.name for d in config.deployments} | {a.name for a in config.rag}
        taken |= {g.name for g in config.groups}
        if name in taken:
            raise ConflictError(
                f"{name!r} is already served by the config file (a deployment, RAG alias or model group); "
                "choose another name with --name"
            )
        if name in self._stored or name in self._broken or self._catalog.get(name) is not None:
            raise ConflictError(
                f"a deployment named {name!r} exists already; `lamina undeploy {name}` first or choose "
                "another name with --name"
            )

    def _prepare(self, stored: StoredDeployment, *, check_space: bool) -> tuple[ServedModel, WorkloadSpec]:
        """The catalog entry and workload of ``stored``: engine, options and model checked; with
        ``check_space``, refused unless its largest replica count fits in what this machine has free."""
        try:
            stored.policy()  # the autoscaler's limits and delays, checked (ConfigError)
            deployment = check_deployment(stored.deployment_config())
            served, workload = deploy(
                deployment, self._registry, self._run_dir, self._config.orchestration.ready_timeout_s
            )
        except ConfigError as exc:  # the request's fault, not the server's: a 400 saying what to change
            raise InvalidRequestError(exc.message) from exc
        if check_space:
            most = dataclasses.replace(workload, replicas=stored.max_replicas)
            try:
                check_fit(workload_needs(self._registry, [(served.model_ref, most)]), self._inventory())
            except ConfigError as exc:
                raise InvalidRequestError(exc.message, param="replicas") from exc
        return served, workload

    def _start(self, stored: StoredDeployment, served: ServedModel, workload: WorkloadSpec) -> None:
        self._catalog.add(served)
        try:
            self._controller.add(workload, stored.policy())
        except LaminaError:
            self._catalog.remove(served.deployment)
            raise
        self._stored[stored.name] = stored

    def _describe(self, name: str) -> dict[str, Any]:
        broken = self._broken.get(name)
        stored = self._stored.get(name) or (broken[0] if broken else None)
        config = next((d for d in self._config.deployments if d.name == name), None)
        status = next((s for s in self._controller.status() if s.name == name), None)
        served = self._catalog.get(name)
        desired = status.desired if status else 0
        ready = status.ready if status else 0
        found = None
        if status is not None and broken is None:
            with contextlib.suppress(ModelNotFoundError):  # removed meanwhile: draining
                found = self._controller.decision(name)
        decision = None if found is None else found.to_json()
        scale = config.autoscale if config is not None else None
        if broken is not None:
            state = "failed"
        elif desired == 0:
            state = "scaled_to_zero" if found is not None else "stopped"
        elif ready >= desired:
            state = "ready"
        else:
            state = "starting" if ready == 0 else "scaling"
        if stored is not None:
            low, high = stored.min_replicas, stored.max_replicas
        elif scale is not None:
            low, high = scale.min_replicas, scale.max_replicas
        else:
            low = high = config.replicas if config is not None else 0
        target = scale.target_concurrency if scale else None
        target = stored.target_concurrency if stored and stored.autoscaled else target
        return {
            "name": name,
            "source": "runtime" if config is None else "config",
            "model": stored.model if stored else (config.model_ref if config else name),
            "model_version": served.model_ref if served else None,
            "engine": served.engine if served else (stored.engine if stored else None),
            "min_replicas": low,
            "max_replicas": high,
            "target_concurrency": target,
            "scale_to_zero": low == 0 and high > 0,
            "desired": desired,
            "ready": ready,
            "state": state,
            "autoscaler": decision,
            "error": broken[1] if broken else None,
        }


def open_deployments(
    config: LaminaConfig,
    registry: Registry,
    store: Store,
    controller: Controller,
    catalog: Catalog,
    run_dir: Path,
    deployed: Sequence[tuple[ServedModel, WorkloadSpec]] = (),
) -> RuntimeDeployments:
    """The run-time deployments of a stack, with those an earlier run stored restored."""
    deployments = RuntimeDeployments(
        config=config,
        registry=registry,
        repo=DeploymentStore(store),
        controller=controller,
        catalog=catalog,
        run_dir=run_dir,
        drain_timeout_s=config.orchestration.drain_grace_s + 30.0,  # the drain, then stopping
    )
    autoscaled = {d.name: d.autoscale for d in config.deployments if d.autoscale is not None}
    for _, workload in deployed:  # the config's autoscaled ones: ``apply`` keeps their autoscaler
        if (scale := autoscaled.get(workload.name)) is not None:
            controller.add(workload, AutoscalePolicy(**scale.model_dump()))
    deployments.restore()
    return deployments


def serving_readiness(controller: Controller) -> dict[str, bool]:
    """Whether each deployment can take a request now: it has a ready replica, or its autoscaler scaled it
    to zero (a request starts one). Deployments removed and still draining are left out."""
    readiness = {}
    for status in controller.status():
        try:
            decision = controller.decision(status.name)
        except ModelNotFoundError:  # removed: draining, no longer served
            continue
        scaled_to_zero = decision is not None and status.desired == 0
        readiness[status.name] = status.ready > 0 or scaled_to_zero
    return readiness
