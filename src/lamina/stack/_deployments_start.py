"""How a stack starts its deployments: the run-time ones restored beside the config's, and which of them
can take a request now."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lamina.config import LaminaConfig
from lamina.errors import ModelNotFoundError
from lamina.models import Catalog, Registry, ServedModel
from lamina.orchestration import AutoscalePolicy, Controller, WorkloadSpec
from lamina.stack._deployment_store import DeploymentStore
from lamina.stack._deployments import RuntimeDeployments
from lamina.store import Store


def open_deployments(
    config: LaminaConfig,
    registry: Registry,
    store: Store,
    controller: Controller,
    catalog: Catalog,
    run_dir: Path,
    deployed: Sequence[tuple[ServedModel, WorkloadSpec]] = (),
    config_models: dict[str, str] | None = None,
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
        store=store,
        config_models=config_models,
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
