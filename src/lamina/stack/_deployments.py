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
import re
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from lamina.application import DeployRequest
from lamina.compute import NodeInventory, probe_inventory
from lamina.config import DeploymentConfig, LaminaConfig
from lamina.errors import (
    ConfigError,
    ConflictError,
    InvalidRequestError,
    LaminaError,
    ModelNotFoundError,
    NotFoundError,
)
from lamina.models import Catalog, Registry, ServedModel, check_deployment, deploy
from lamina.orchestration import (
    CanaryJudge,
    CanaryPolicy,
    Controller,
    Rollout,
    RolloutControl,
    RolloutPhase,
    RolloutStrategy,
    WorkloadSpec,
)
from lamina.stack._config_rollouts import ConfigRollout, ConfigRollouts
from lamina.stack._deployment_store import DeploymentStore, StoredDeployment
from lamina.stack._fit import check_fit, workload_needs
from lamina.stack._rollouts_pending import KeptRollouts, PendingRollout, resume
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
        store: Store | None = None,
        config_models: dict[str, str] | None = None,
    ) -> None:
        self._config = config
        self._registry = registry
        self._repo = repo
        self._controller = controller
        self._catalog = catalog
        self._run_dir = run_dir
        self._inventory = inventory
        self._drain_timeout_s = drain_timeout_s
        self._store = store
        self._stored: dict[str, StoredDeployment] = {}
        #: the model the config file names for each of its deployments (a rollout may serve another)
        self._config_models = {d.name: d.model_ref for d in config.deployments} | (config_models or {})
        #: a rollout's target (what is stored and served once it is done), by deployment
        self._targets: dict[str, tuple[StoredDeployment | DeploymentConfig, ServedModel]] = {}
        controller.after_step.append(self._settle_rollouts)
        #: the rollouts in progress, kept so that a restart begins them again
        self._kept = KeptRollouts(store)
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
        self._targets.pop(name, None)
        await asyncio.to_thread(self._kept.forget, name)
        if self._stored.pop(name, None) is not None:
            self._catalog.remove(name)  # stop routing: new requests for it are a 404 from here on
            with contextlib.suppress(ModelNotFoundError):
                self._controller.remove(name)
            deadline = started + self._drain_timeout_s
            while not self._controller.gone(name) and time.monotonic() < deadline:
                await self._controller.wait_for_change(0.2)
        return {"name": name, "deleted": True, "drained_s": round(time.monotonic() - started, 3)}

    async def rollout(
        self,
        name: str,
        model: str,
        strategy: str,
        weight: int,
        policy: dict[str, float] | None,
        options: dict[str, dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Roll ``model`` out to the deployment ``name`` (see ``lamina.orchestration._rollout``); one of the
        config file's is kept over a restart as the config's rollout (``_config_rollouts``)."""
        stored, config = self._stored.get(name), self._config_deployment(name)
        served = self._catalog.get(name)
        if served is None or (stored is None and config is None):
            known = ", ".join(sorted(set(self._stored) | set(self._config_models))) or "none"
            raise NotFoundError(f"no deployment named {name!r} to roll out to (deployments: {known})")
        # the target's worker spec file beside the stable one's, which its restarts still read
        here = self._run_dir / "rollouts" / re.sub(r"[^A-Za-z0-9._-]", "_", model)
        target: StoredDeployment | DeploymentConfig
        if stored is not None:
            target = dataclasses.replace(
                stored, model=model, options=stored.options if options is None else options
            )
            new_served, workload = await asyncio.to_thread(
                self._prepare, target, check_space=False, run_dir=here
            )
        else:
            assert config is not None
            target = config.model_copy(
                update={"model": model, "options": config.options if options is None else options}
            )
            new_served, workload = await asyncio.to_thread(self._prepare_config, target, here)
        one = dataclasses.replace(workload, replicas=1)  # the surge: one more replica at a time
        try:
            check_fit(workload_needs(self._registry, [(new_served.model_ref, one)]), self._inventory())
        except ConfigError as exc:
            raise InvalidRequestError(exc.message, param="model") from exc
        asked = stored.model if stored is not None else config.model_ref if config is not None else name
        stable, wanted = served.model_ref or asked, new_served.model_ref or model
        try:
            judge = None if policy is None else CanaryJudge(_canary_policy(policy))
            begun = Rollout.begin(stable, wanted, RolloutStrategy(strategy), time.monotonic(), weight)
        except ConfigError as exc:  # the request's settings: a 400 saying what to change
            raise InvalidRequestError(exc.message) from exc
        self._controller.start_rollout(name, RolloutControl(begun, workload, judge))
        self._targets[name] = (target, new_served)
        config_model = None if stored is not None else self._config_models.get(name)
        asked_for = PendingRollout(name, model, strategy, weight, policy, options, config_model)
        await asyncio.to_thread(self._kept.begin, asked_for)
        log.info("rolling %s out to %s (%s)", wanted, name, strategy)
        return self._describe(name)

    async def finish_rollout(self, name: str, action: str) -> dict[str, Any]:
        """Promote the canary of ``name``, or roll its rollout back."""
        known = name in self._stored or self._config_deployment(name) is not None
        control = self._controller.rollout(name) if known else None
        if control is None:
            raise NotFoundError(
                f"{name!r} has no rollout; start one with `lamina rollout {name} MODEL@VERSION`"
            )
        if action == "promote":
            control.promote()
        else:
            control.rollback()
        self._controller.wake()
        return self._describe(name)

    async def resume_rollouts(self) -> Sequence[str]:
        """Begin again the rollouts that a restart interrupted (``_rollouts_pending``), each once its
        deployment's replicas are ready (the control loop runs meanwhile); returns their deployments."""

        async def start(p: PendingRollout) -> object:  # from the stable version's replicas, once they run
            await self._controller.wait_ready(self._config.orchestration.ready_timeout_s, [p.name])
            return await self.rollout(p.name, p.model, p.strategy, p.weight, p.policy, p.options)

        return await resume(self._kept, start, self._config_models)

    def _settle_rollouts(self) -> None:
        """After each reconcile pass: a finished rollout's version serves (catalog, store) at once."""
        for name in list(self._targets):
            self._settle(name)

    def _settle(self, name: str) -> dict[str, Any] | None:
        """The deployment's rollout as JSON; once it is done, the target is what the deployment serves."""
        control = self._controller.rollout(name)
        if control is None:
            return None
        rollout = control.rollout
        self._kept.follow(name, rollout)
        done = self._targets.get(name) if rollout.phase is RolloutPhase.DONE else None
        if done is not None:
            target, new_served = done
            self._catalog.remove(name)
            self._catalog.add(new_served)
            del self._targets[name]
            if isinstance(target, StoredDeployment):
                self._stored[name] = target
                self._store_version(name, partial(self._repo.set_model, name, target.model, target.options))
            else:
                kept = [target if d.name == name else d for d in self._config.deployments]
                self._config = self._config.model_copy(update={"deployments": kept})
                rolled = ConfigRollout(
                    name, self._config_models[name], new_served.model_ref or target.model_ref, target.options
                )
                if self._store is not None:
                    self._store_version(name, partial(ConfigRollouts(self._store).save, rolled))
        return rollout.to_json()

    def _store_version(self, name: str, save: Callable[[], None]) -> None:
        """Store the version a finished rollout moved ``name`` to (``save`` does): a restart serves it."""
        try:
            save()
        except LaminaError as exc:
            log.error("could not store the new version of %r: %s", name, exc.message)

    # ---- the parts -----------------------------------------------------------------------------------

    def _config_deployment(self, name: str) -> DeploymentConfig | None:
        return next((d for d in self._config.deployments if d.name == name), None)

    def _prepare_config(self, target: DeploymentConfig, run_dir: Path) -> tuple[ServedModel, WorkloadSpec]:
        """The catalog entry and workload of a config deployment moved to another model."""
        try:
            timeout_s = self._config.orchestration.ready_timeout_s
            return deploy(check_deployment(target), self._registry, run_dir, timeout_s)
        except ConfigError as exc:
            raise InvalidRequestError(exc.message) from exc

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

    def _prepare(
        self, stored: StoredDeployment, *, check_space: bool, run_dir: Path | None = None
    ) -> tuple[ServedModel, WorkloadSpec]:
        """The catalog entry and workload of ``stored``: engine, options and model checked; with
        ``check_space``, refused unless its largest replica count fits in what this machine has free."""
        try:
            stored.policy()  # the autoscaler's limits and delays, checked (ConfigError)
            deployment = check_deployment(stored.deployment_config())
            timeout_s = self._config.orchestration.ready_timeout_s
            served, workload = deploy(deployment, self._registry, run_dir or self._run_dir, timeout_s)
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
        rollout = self._settle(name) if name in self._stored or config is not None else None
        served = self._catalog.get(name)
        rollout = rollout or self._kept.waiting_json(name, served.model_ref if served else None)
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
            "rollout": rollout,
            "versions": sorted({r.version for r in status.replicas if r.version}) if status else [],
        }


def _canary_policy(given: dict[str, float]) -> CanaryPolicy:
    """The automatic rollback's policy from the admin API's settings (checked: ConfigError)."""
    promote = given.get("promote_after_s")
    return CanaryPolicy(
        window_s=given.get("window_s", 60.0),
        min_requests=int(given.get("min_requests", 20)),
        max_error_rate_increase=given.get("max_error_rate_increase", 0.05),
        max_latency_ratio=given.get("max_latency_ratio", 2.0),
        promote_after_s=None if promote is None else float(promote),
    )
