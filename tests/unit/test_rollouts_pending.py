"""Rollouts in progress kept over a restart: kept from their start, followed through their phases (a
promoted canary goes on as rolling; rolled back or done, nothing is kept), and begun again at the next
start unless the config moved on or the rollout cannot begin. On SQLite and PostgreSQL (the ``store``
fixture); `tests/integration/test_rollouts.py` restarts a real stack in the middle of a canary."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import pytest

from lamina.errors import LaminaError, ModelNotFoundError
from lamina.orchestration import Rollout, RolloutPhase, RolloutStrategy
from lamina.stack._rollouts_pending import KeptRollouts, PendingRollout, PendingRollouts, resume
from lamina.store import Store

CANARY = PendingRollout(
    "echo", "echo@3", "canary", 25, {"window_s": 30.0}, {"fake": {"tokens": ["v3"]}}, None
)


def canary() -> Rollout:
    return Rollout.begin("echo@2", "echo@3", RolloutStrategy.CANARY, 0.0, 25)


def test_a_rollout_is_kept_until_it_is_rolled_back(store: Store) -> None:
    kept = KeptRollouts(store)
    kept.begin(CANARY)
    assert PendingRollouts(store).list() == [CANARY]
    kept.follow("echo", canary())  # no change: nothing written
    kept.follow("echo", canary().promote())
    promoted = PendingRollouts(store).list()
    assert [(p.strategy, p.model, p.options) for p in promoted] == [("rolling", "echo@3", CANARY.options)]
    kept.follow("echo", canary().promote().rollback())  # rolling back: a restart serves the stable version
    assert PendingRollouts(store).list() == []
    assert KeptRollouts(store).kept() == []


def test_a_finished_rollout_is_not_kept(store: Store) -> None:
    kept = KeptRollouts(store)
    rolling = PendingRollout("chat", "chat@2", "rolling", 100, None, None, "chat")
    kept.begin(rolling)
    kept.begin(CANARY)
    rolled = Rollout.begin("chat@1", "chat@2", RolloutStrategy.ROLLING, 0.0)
    kept.follow("chat", rolled)  # rolling, as kept: nothing written
    kept.follow("chat", replace(rolled, phase=RolloutPhase.DONE))
    assert kept.kept() == [CANARY]  # the other deployment's rollout is untouched


def test_the_rollouts_begin_again_unless_the_config_moved_on_or_they_cannot(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    kept = KeptRollouts(store)
    kept.begin(CANARY)  # a run-time deployment: begins again
    kept.begin(PendingRollout("base", "base@3", "rolling", 100, None, None, "base"))  # the config names base
    kept.begin(PendingRollout("moved", "m@3", "canary", 10, None, None, "m@1"))  # the config names m@2 now
    kept.begin(PendingRollout("gone", "g@2", "canary", 10, None, None, None))  # its model was deleted
    started: list[PendingRollout] = []

    async def start(pending: PendingRollout) -> object:
        shown = kept_now.waiting_json(pending.name, "stable@1")  # what the admin API shows meanwhile
        assert shown is not None and (shown["phase"], shown["target"]) == ("waiting", pending.model)
        if pending.name == "gone":
            raise ModelNotFoundError("no model named 'g@2' in the registry")
        started.append(pending)
        return None

    with caplog.at_level(logging.INFO, logger="lamina.deployments"):
        kept_now = KeptRollouts(store)
        resumed = asyncio.run(resume(kept_now, start, {"base": "base", "moved": "m@2"}))
    assert sorted(resumed) == ["base", "echo"] and {p.name for p in started} == {"base", "echo"}
    assert kept_now.waiting == {} and kept_now.waiting_json("echo", "echo@2") is None  # begun, or dropped
    assert next(p for p in started if p.name == "echo") == CANARY  # as it was asked for
    assert "the config now names m@2, not m@1 as then" in caplog.text
    assert "could not resume its rollout to g@2" in caplog.text and "the stable version serves" in caplog.text
    # those dropped are not tried again at the next start; those begun are kept until they finish
    assert [p.name for p in PendingRollouts(store).list()] == ["base", "echo"]


def test_a_rollout_begun_while_the_old_one_waited_is_kept(store: Store) -> None:
    """A client starts another rollout of the deployment before the kept one could begin again: the kept
    one fails (a rollout is running) and is dropped, and the new one stays kept."""
    KeptRollouts(store).begin(CANARY)
    kept = KeptRollouts(store)
    newer = PendingRollout("echo", "echo@4", "rolling", 100, None, None, None)

    async def start(pending: PendingRollout) -> object:
        kept.begin(newer)  # meanwhile, through the admin API
        raise LaminaError("'echo' is rolling out echo@4 already; promote it or roll it back first")

    assert asyncio.run(resume(kept, start, {})) == []
    assert PendingRollouts(store).list() == [newer]


def test_a_store_that_fails_is_logged_and_the_rollout_goes_on(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_: object) -> None:
        raise LaminaError("the metadata store is unreachable")

    monkeypatch.setattr(PendingRollouts, "save", broken)
    with caplog.at_level(logging.ERROR, logger="lamina.deployments"):
        KeptRollouts(store).begin(CANARY)
    assert "could not keep the rollout of 'echo' over a restart" in caplog.text
    assert KeptRollouts(None).kept() == []  # without a store, nothing is kept
