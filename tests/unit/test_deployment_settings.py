"""A deployment's replica settings (micro-batching, the engine watchdog) travel from lamina.yaml through
the WorkerSpec file named in the replica's argv to the WorkerApp the worker process builds."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from lamina.config import BatchingConfig, DeploymentConfig, LaminaConfig, load_config
from lamina.errors import ConfigError
from lamina.models import _worker
from lamina.models._deploy import WorkerSpec, worker_workload
from lamina.models._microbatch import DEFAULT_MAX_TEXTS, DEFAULT_WINDOW_S, BatchPolicy
from lamina.models._worker_app import Replica, WorkerApp


def _config(tmp_path: Path, deployment: str) -> LaminaConfig:
    path = tmp_path / "lamina.yaml"
    path.write_text(f"register_bundled: false\ndeployments:\n  - {deployment}\n", encoding="utf-8")
    return load_config(path)


def test_the_config_defaults_are_the_replicas_defaults() -> None:
    batching, deployment = BatchingConfig(), DeploymentConfig(name="m")
    assert batching.window_ms / 1000.0 == DEFAULT_WINDOW_S
    assert batching.max_texts == DEFAULT_MAX_TEXTS
    assert deployment.batching == batching and deployment.watchdog_s == 60.0


def test_a_deployment_sets_its_batching_and_watchdog(tmp_path: Path) -> None:
    cfg = _config(
        tmp_path,
        "{name: e, engine: fake, batching: {window_ms: 2.5, max_texts: 8, gather_ms: 0}, watchdog_s: 30}",
    )
    deployment = cfg.deployments[0]
    assert deployment.batching == BatchingConfig(window_ms=2.5, max_texts=8, gather_ms=0)
    assert deployment.watchdog_s == 30.0
    assert deployment.options == {}, "the batching block is a field, not an engine's options"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ("batching: {window_ms: -1}", "field `deployments.0.batching.window_ms`"),
        ("batching: {window_ms: 5000}", "field `deployments.0.batching.window_ms`"),
        ("batching: {window_ms: .inf}", "field `deployments.0.batching.window_ms`"),
        ("batching: {max_texts: 0}", "field `deployments.0.batching.max_texts`"),
        ("batching: {gather_ms: -2}", "field `deployments.0.batching.gather_ms`"),
        ("batching: {window: 5}", "unknown field `deployments.0.batching.window`"),
        ("watchdog_s: 0.5", "field `deployments.0.watchdog_s`"),
    ],
)
def test_bad_settings_name_the_field(tmp_path: Path, fields: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        _config(tmp_path, f"{{name: e, engine: fake, {fields}}}")


def test_the_schema_documents_the_settings() -> None:
    schema = LaminaConfig.model_json_schema()
    batching = schema["$defs"]["BatchingConfig"]["properties"]
    assert "Milliseconds" in batching["window_ms"]["description"]
    assert "Texts per engine call" in batching["max_texts"]["description"]
    watchdog = schema["$defs"]["DeploymentConfig"]["properties"]["watchdog_s"]
    assert watchdog["minimum"] == 1 and "stuck" in watchdog["description"]


def _spec_of(argv: tuple[str, ...]) -> WorkerSpec:
    """What the worker process reads: the WorkerSpec file its argv names."""
    assert argv[1:3] == ("-m", "lamina.models._worker")
    return WorkerSpec.read(Path(argv[argv.index("--spec") + 1]))


def test_the_settings_reach_the_worker_spec_through_argv(tmp_path: Path) -> None:
    deployment = DeploymentConfig(
        name="e", engine="fake", batching=BatchingConfig(window_ms=5.0, max_texts=8), watchdog_s=12.0
    )
    workload = worker_workload(
        deployment=deployment,
        engine="fake",
        path=None,
        sha256=None,
        extra_files={},
        model_version=None,
        run_dir=tmp_path,
        ready_timeout_s=30.0,
    )
    spec = _spec_of(workload.argv)
    assert spec.batching == BatchingConfig(window_ms=5.0, max_texts=8)
    assert spec.watchdog_s == 12.0
    assert _worker.batch_policy(spec) == BatchPolicy(window_s=0.005, max_texts=8)


def test_an_older_spec_file_gets_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "old.json"
    path.write_text('{"served_name": "e", "engine": "fake"}', encoding="utf-8")
    spec = WorkerSpec.read(path)
    assert _worker.batch_policy(spec) == BatchPolicy()
    assert spec.watchdog_s == 60.0


@pytest.fixture
def built_with(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The keyword arguments the worker builds its (real) WorkerApp with, once it has."""
    seen: dict[str, Any] = {}

    class Spy(WorkerApp):
        def __init__(self, replica: Replica, **kw: Any) -> None:
            seen.update(kw)
            super().__init__(replica, **kw)

    monkeypatch.setattr(_worker, "WorkerApp", Spy)
    return seen


def test_the_worker_builds_its_app_with_the_deployments_settings(built_with: dict[str, Any]) -> None:
    spec = WorkerSpec(
        served_name="e", engine="fake", batching=BatchingConfig(window_ms=5.0, max_texts=8), watchdog_s=12.0
    )
    worker = _worker.Worker(spec, _worker.listen("127.0.0.1", 0), secret="s3cret")
    try:
        assert built_with == {"batching": BatchPolicy(window_s=0.005, max_texts=8), "watchdog_s": 12.0}
        assert worker.app.batcher.policy == BatchPolicy(window_s=0.005, max_texts=8)
    finally:
        worker.sock.close()
        assert worker.replica.runner.close(5)
