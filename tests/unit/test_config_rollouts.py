"""The versions rollouts moved the config's deployments to: kept, applied at start while the config still
names what it named at the rollout, dropped once it names something else or no longer has the deployment.
On SQLite and PostgreSQL (the ``store`` fixture)."""

from __future__ import annotations

import logging

import pytest

from lamina.config import DeploymentConfig, LaminaConfig
from lamina.stack._config_rollouts import ConfigRollout, ConfigRollouts
from lamina.store import Store


def config(*deployments: DeploymentConfig) -> LaminaConfig:
    return LaminaConfig(register_bundled=False, deployments=list(deployments))


def test_a_rollout_applies_while_the_config_names_the_same_model(store: Store) -> None:
    rollouts = ConfigRollouts(store)
    rollouts.save(ConfigRollout("emb", "minilm", "minilm@3", {"onnx": {"batch_size": 8}}))
    rollouts.save(ConfigRollout("emb", "minilm", "minilm@4", {}))  # a later rollout replaces it
    given = config(DeploymentConfig(name="emb", model="minilm"), DeploymentConfig(name="chat"))
    applied, named = rollouts.apply(given)
    assert [(d.name, d.model_ref, d.options) for d in applied.deployments] == [
        ("emb", "minilm@4", {}),
        ("chat", "chat", {}),
    ]
    assert named == {"emb": "minilm", "chat": "chat"}
    assert given.deployments[0].model == "minilm"  # the config itself is left as it was
    assert rollouts.list() == [ConfigRollout("emb", "minilm", "minilm@4", {})]


def test_a_config_that_moved_on_wins_and_the_rollout_is_dropped(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    rollouts = ConfigRollouts(store)
    rollouts.save(ConfigRollout("emb", "minilm", "minilm@3", {}))
    rollouts.save(ConfigRollout("gone", "x", "x@2", {}))
    with caplog.at_level(logging.WARNING, logger="lamina.deployments"):
        applied, _ = rollouts.apply(config(DeploymentConfig(name="emb", model="minilm@5")))
    assert applied.deployments[0].model_ref == "minilm@5"
    assert "now names minilm@5, not minilm" in caplog.text
    assert rollouts.list() == []
