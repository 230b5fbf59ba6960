"""Rollouts in progress, kept over a restart: a rollout that a restart interrupts begins again after it.

What a rollout was asked to do is kept in the ``rollouts_in_progress`` table from its start until it
finishes or is rolled back: the deployment, the target as asked, the strategy, the canary's weight, the
automatic rollback's settings, the engine options, and for a deployment of the config file the model the
config named then. A canary promoted (by command or by its judge) is kept as a rolling rollout, the steps
that promotion runs; one rolling back is dropped at once, since a restart serves the stable version anyway.

At the next start, once the deployments serve again, each kept rollout begins again from the stable
version: a canary runs beside it again (its judge's window starts empty), a rolling rollout replaces the
stable replicas one at a time. A kept rollout is dropped, with a line in the log, when its deployment is
gone, when the config now names another model for its config deployment (the edit is the newer decision),
or when it cannot begin (its target was deleted from the registry); the stable version serves then.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from lamina.clock import Clock, utcnow
from lamina.errors import LaminaError
from lamina.orchestration import Rollout, RolloutPhase, RolloutStrategy
from lamina.stack._named_rows import NamedRows
from lamina.store import Store, rollouts_in_progress

log = logging.getLogger("lamina.deployments")


@dataclass(frozen=True)
class PendingRollout:
    """A rollout to begin again after a restart, as it was asked for."""

    name: str
    model: str
    strategy: str
    weight: int
    policy: dict[str, float] | None
    options: dict[str, dict[str, Any]] | None
    #: the model the config file named for the deployment at the start (None: a run-time deployment)
    config_model: str | None

    def resumed_as(self, rollout: Rollout) -> PendingRollout | None:
        """What to keep of this rollout in its current phase: a canary promoted goes on as a rolling
        rollout; one finished, or rolling back, is not begun again (None)."""
        if rollout.phase is RolloutPhase.CANARY:
            return self
        if rollout.phase is RolloutPhase.ROLLING:
            return replace(self, strategy=RolloutStrategy.ROLLING.value)
        return None


class PendingRollouts:
    """The ``rollouts_in_progress`` table. Synchronous: call it from a worker thread on an event loop."""

    def __init__(self, store: Store, clock: Clock = utcnow) -> None:
        self._rows = NamedRows(store, rollouts_in_progress, clock)

    def save(self, p: PendingRollout) -> None:
        """Keep ``p``, replacing what was kept of the deployment's rollout."""
        self._rows.put(
            p.name,
            model=p.model,
            strategy=p.strategy,
            weight=p.weight,
            policy=p.policy,
            options=p.options,
            config_model=p.config_model,
        )

    def drop(self, name: str) -> None:
        self._rows.drop([name])

    def list(self) -> builtins.list[PendingRollout]:
        return [
            PendingRollout(
                r.name,
                r.model,
                r.strategy,
                r.weight,
                dict(r.policy) if r.policy is not None else None,
                dict(r.options) if r.options is not None else None,
                r.config_model,
            )
            for r in self._rows.rows()
        ]


class KeptRollouts:
    """The rollouts in progress of one stack as the store keeps them (no store: none kept). A failure to
    write is logged and the rollout goes on; it is then only not begun again after a restart."""

    def __init__(self, store: Store | None) -> None:
        self._table = None if store is None else PendingRollouts(store)
        #: what is kept now, by deployment
        self._kept: dict[str, PendingRollout] = {}
        #: kept rollouts waiting at a start for their deployment to be ready, by deployment
        self.waiting: dict[str, PendingRollout] = {}

    def begin(self, pending: PendingRollout) -> None:
        self._write(pending.name, pending)

    def follow(self, name: str, rollout: Rollout) -> None:
        """The deployment's rollout is now ``rollout``: keep what a restart would begin again."""
        kept = self._kept.get(name)
        if kept is None:
            return
        now = kept.resumed_as(rollout)
        if now != kept:
            self._write(name, now)

    def forget(self, name: str, kept: PendingRollout | None = None) -> None:
        """Keep nothing of the deployment's rollout (gone, or one that cannot begin again); with ``kept``,
        only if no other rollout of it has begun since."""
        if kept is None or self._kept.get(name) in (None, kept):
            self._write(name, None)

    def waiting_json(self, name: str, stable: str | None) -> dict[str, Any] | None:
        """A rollout that waits to begin again, as the admin API shows a rollout (phase ``waiting``)."""
        p = self.waiting.get(name)
        if p is None:
            return None
        return {
            "stable": stable,
            "target": p.model,
            "strategy": p.strategy,
            "phase": "waiting",
            "started_at": None,
            "weight": p.weight,
            "reason": "interrupted by a restart; begins again once the deployment is ready",
        }

    def kept(self) -> builtins.list[PendingRollout]:
        return [] if self._table is None else self._table.list()

    def _write(self, name: str, pending: PendingRollout | None) -> None:
        self._kept.pop(name, None)
        if pending is not None:
            self._kept[name] = pending
        if self._table is None:
            return
        try:
            if pending is None:
                self._table.drop(name)
            else:
                self._table.save(pending)
        except LaminaError as exc:
            log.error("could not keep the rollout of %r over a restart: %s", name, exc.message)


async def resume(
    kept: KeptRollouts,
    start: Callable[[PendingRollout], Awaitable[object]],
    config_models: Mapping[str, str],
) -> builtins.list[str]:
    """Begin again every rollout a restart interrupted, each on its own (``start`` begins one, once its
    deployment is ready); ``config_models`` is the model the config file names for each of its
    deployments. Returns the deployments whose rollout runs again."""
    pending = await asyncio.to_thread(kept.kept)
    begun = await asyncio.gather(*(_resume(kept, p, start, config_models.get(p.name)) for p in pending))
    return [p.name for p, ok in zip(pending, begun, strict=True) if ok]


async def _resume(
    kept: KeptRollouts,
    pending: PendingRollout,
    start: Callable[[PendingRollout], Awaitable[object]],
    named: str | None,
) -> bool:
    if pending.config_model is not None and named != pending.config_model:
        log.warning(
            "deployment %r: not resuming its rollout to %s: the config now names %s, not %s as then",
            pending.name,
            pending.model,
            named or "no such deployment",
            pending.config_model,
        )
    else:
        log.info("deployment %r: rollout to %s begins again once it is ready", pending.name, pending.model)
        kept.waiting[pending.name] = pending
        try:
            await start(pending)
        except LaminaError as exc:
            log.error(
                "deployment %r: could not resume its rollout to %s (%s); the stable version serves",
                pending.name,
                pending.model,
                exc.message,
            )
        else:
            log.info("deployment %r: rollout to %s begun again", pending.name, pending.model)
            return True
        finally:
            kept.waiting.pop(pending.name, None)
    await asyncio.to_thread(kept.forget, pending.name, pending)
    return False
