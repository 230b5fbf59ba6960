"""The run-time deployments' repository over a real (SQLite) metadata store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.errors import ConfigError, ConflictError
from lamina.stack._deployment_store import DeploymentStore, StoredDeployment
from lamina.store import Store
from tests.support.clock import T0, FakeClock


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'lamina.db'}")
    s.migrate()
    yield s
    s.close()


def test_add_list_get_delete_round_trip(store: Store) -> None:
    repo = DeploymentStore(store, clock=FakeClock())
    asked = StoredDeployment(
        name="chat",
        model="qwen@prod",
        engine="gguf",
        options={"gguf": {"n_ctx": 4096}},
        min_replicas=0,
        max_replicas=3,
        target_concurrency=1.5,
        autoscale={"upscale_delay_s": 2.0, "idle_delay_s": 60.0},
    )
    added = repo.add(asked)
    assert added.created_at == T0 and added.updated_at == T0
    repo.add(StoredDeployment(name="embed", model="minilm"))
    assert [d.name for d in repo.list()] == ["chat", "embed"]
    got = repo.get("chat")
    assert got == added
    assert got.scale_to_zero and got.autoscaled
    assert repo.delete("chat") is True
    assert repo.delete("chat") is False
    assert repo.get("chat") is None
    assert [d.name for d in DeploymentStore(store).list()] == ["embed"]  # it is in the database


def test_a_name_is_stored_once(store: Store) -> None:
    repo = DeploymentStore(store)
    repo.add(StoredDeployment(name="chat", model="a"))
    with pytest.raises(ConflictError, match="lamina undeploy chat"):
        repo.add(StoredDeployment(name="chat", model="b"))
    assert repo.get("chat") is not None and repo.get("chat").model == "a"  # type: ignore[union-attr]


def test_the_policy_and_deployment_of_a_stored_row() -> None:
    fixed = StoredDeployment(name="f", model="m", min_replicas=2, max_replicas=2)
    assert fixed.policy() is None and fixed.deployment_config().replicas == 2
    ranged = StoredDeployment(
        name="r", model="m@1", min_replicas=0, max_replicas=4, autoscale={"cold_start_budget_s": 9.0}
    )
    policy = ranged.policy()
    assert policy is not None and policy.cold_start_budget_s == 9.0 and policy.max_replicas == 4
    assert ranged.deployment_config().replicas == 1  # one replica to start with, then the autoscaler
    assert ranged.deployment_config().model_ref == "m@1"
    with pytest.raises(ConfigError, match="max_replicas"):
        StoredDeployment(name="x", model="m", min_replicas=3, max_replicas=1).policy()
