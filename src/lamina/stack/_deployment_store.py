"""The run-time deployments (``lamina deploy``), kept in the metadata store so a restart restores them.

The config's own deployments are not stored: the config is their record. A row holds what was asked for
(the model reference, not the version it resolved to, so ``NAME@ALIAS`` follows its alias at a restart),
the replica limits and the autoscaler's settings.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from lamina.clock import Clock, utcnow
from lamina.config import DeploymentConfig
from lamina.errors import ConflictError
from lamina.orchestration import AutoscalePolicy
from lamina.store import Store, deployments

#: the autoscaler's settings kept in the row's ``autoscale`` column (seconds)
AUTOSCALE_TIMINGS = (
    "window_s",
    "upscale_delay_s",
    "downscale_delay_s",
    "idle_delay_s",
    "cold_start_budget_s",
)


@dataclass(frozen=True)
class StoredDeployment:
    """One run-time deployment as asked for. ``min_replicas == max_replicas``: a fixed replica count."""

    name: str
    model: str
    engine: str | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    min_replicas: int = 1
    max_replicas: int = 1
    target_concurrency: float = 2.0
    #: the autoscaler's delays and window by name (``AUTOSCALE_TIMINGS``); absent: its defaults
    autoscale: dict[str, float] = field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def scale_to_zero(self) -> bool:
        return self.min_replicas == 0

    @property
    def autoscaled(self) -> bool:
        return self.min_replicas != self.max_replicas

    def policy(self) -> AutoscalePolicy | None:
        """The autoscaler's policy (None: a fixed replica count)."""
        if not self.autoscaled:
            return None
        timings = {k: float(v) for k, v in self.autoscale.items() if k in AUTOSCALE_TIMINGS}
        return AutoscalePolicy(
            self.min_replicas, self.max_replicas, target_concurrency=self.target_concurrency, **timings
        )

    def deployment_config(self) -> DeploymentConfig:
        """The deployment as the models layer deploys it; its replicas: what it starts with."""
        policy = self.policy()
        replicas = self.min_replicas if policy is None else policy.initial
        return DeploymentConfig(
            name=self.name, model=self.model, engine=self.engine, replicas=replicas, options=self.options
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model,
            "engine": self.engine,
            "options": self.options,
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_concurrency": self.target_concurrency,
            "scale_to_zero": self.scale_to_zero,
            "autoscale": self.autoscale,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
        }


class DeploymentStore:
    """The ``deployments`` table: add, list, get, set a rolled-out model, delete. Synchronous (call it
    from a worker thread)."""

    def __init__(self, store: Store, clock: Clock = utcnow) -> None:
        self._store = store
        self._clock = clock

    def add(self, d: StoredDeployment) -> StoredDeployment:
        """Store ``d``; ConflictError when a deployment of that name is stored already."""
        now = self._clock()
        values = {
            "name": d.name,
            "model": d.model,
            "engine": d.engine,
            "options": d.options,
            "min_replicas": d.min_replicas,
            "max_replicas": d.max_replicas,
            "target_concurrency": d.target_concurrency,
            "scale_to_zero": d.scale_to_zero,
            "autoscale": d.autoscale,
            "created_at": now,
            "updated_at": now,
        }
        try:
            with self._store.begin() as conn:
                conn.execute(insert(deployments).values(**values))
        except (IntegrityError, ConflictError) as exc:  # the store maps a duplicate key to ConflictError
            raise ConflictError(
                f"a deployment named {d.name!r} exists already; `lamina undeploy {d.name}` first or choose "
                "another name with --name"
            ) from exc
        return _record(values)

    def list(self) -> builtins.list[StoredDeployment]:
        """Every stored deployment, by name."""
        with self._store.begin() as conn:
            return [
                _record(row._mapping)
                for row in conn.execute(select(deployments).order_by(deployments.c.name))
            ]

    def get(self, name: str) -> StoredDeployment | None:
        with self._store.begin() as conn:
            row = conn.execute(select(deployments).where(deployments.c.name == name)).first()
        return None if row is None else _record(row._mapping)

    def set_model(self, name: str, model: str, options: dict[str, dict[str, Any]]) -> None:
        """A finished rollout moved ``name`` to ``model`` and ``options``: a restart serves them."""
        values = {"model": model, "options": options, "updated_at": self._clock()}
        with self._store.begin() as conn:
            conn.execute(update(deployments).where(deployments.c.name == name).values(**values))

    def delete(self, name: str) -> bool:
        """Forget ``name``; False when it was not stored."""
        with self._store.begin() as conn:
            done = conn.execute(delete(deployments).where(deployments.c.name == name))
        return bool(done.rowcount)


def _record(values: Any) -> StoredDeployment:
    return StoredDeployment(
        name=values["name"],
        model=values["model"],
        engine=values["engine"],
        options=dict(values["options"] or {}),
        min_replicas=int(values["min_replicas"]),
        max_replicas=int(values["max_replicas"]),
        target_concurrency=float(values["target_concurrency"]),
        autoscale={k: float(v) for k, v in dict(values["autoscale"] or {}).items()},
        created_at=values["created_at"],
        updated_at=values["updated_at"],
    )
