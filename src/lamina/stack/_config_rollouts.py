"""Rollouts of the config file's own deployments, kept over a restart.

The config file is the record of its deployments, so the version a rollout moves one of them to is kept
beside it, in the ``config_rollouts`` table: the deployment, the model the config named when the rollout
finished, and the version (and engine options) it rolled to. At the next start that version serves while
the config still names the same model. Once the config names another, the edit is the newer decision: the
config's model serves and the stored rollout is dropped (with a warning in the log), as it is when the
deployment has left the config.
"""

from __future__ import annotations

import builtins
import logging
from dataclasses import dataclass
from typing import Any

from lamina.clock import Clock, utcnow
from lamina.config import DeploymentConfig, LaminaConfig
from lamina.models import check_deployment
from lamina.stack._named_rows import NamedRows
from lamina.store import Store, config_rollouts

log = logging.getLogger("lamina.deployments")


@dataclass(frozen=True)
class ConfigRollout:
    """A config deployment that a rollout moved to ``model`` while the config named ``config_model``."""

    name: str
    config_model: str
    model: str
    options: dict[str, dict[str, Any]]


class ConfigRollouts:
    """The ``config_rollouts`` table. Synchronous: call it from a worker thread on an event loop."""

    def __init__(self, store: Store, clock: Clock = utcnow) -> None:
        self._rows = NamedRows(store, config_rollouts, clock)

    def save(self, rollout: ConfigRollout) -> None:
        """Keep ``rollout``, replacing an earlier one of the same deployment."""
        self._rows.put(
            rollout.name, config_model=rollout.config_model, model=rollout.model, options=rollout.options
        )

    def list(self) -> builtins.list[ConfigRollout]:
        return [
            ConfigRollout(r.name, r.config_model, r.model, dict(r.options or {})) for r in self._rows.rows()
        ]

    def apply(self, config: LaminaConfig) -> tuple[LaminaConfig, dict[str, str]]:
        """``config`` with every stored rollout that still applies in place of its deployment's model,
        and the model the config file names for each deployment (what a later rollout is stored against).
        Rollouts the config has moved past, or whose deployment it no longer has, are dropped."""
        kept = {r.name: r for r in self.list()}
        named = {d.name: d.model_ref for d in config.deployments}
        deployments: builtins.list[DeploymentConfig] = []
        for d in config.deployments:
            rolled = kept.get(d.name)
            if rolled is not None and rolled.config_model == d.model_ref:
                del kept[d.name]
                moved = d.model_copy(update={"model": rolled.model, "options": rolled.options})
                deployments.append(check_deployment(moved))  # its engine's options, defaults filled in
                log.info("deployment %r serves %s, where a rollout moved it", d.name, rolled.model)
                continue
            if rolled is not None:
                log.warning(
                    "deployment %r: the config now names %s, not %s as when it was rolled out to %s; "
                    "serving the config's model",
                    d.name,
                    d.model_ref,
                    rolled.config_model,
                    rolled.model,
                )
            deployments.append(d)
        if kept:
            self._rows.drop(kept)
        return config.model_copy(update={"deployments": deployments}), named
