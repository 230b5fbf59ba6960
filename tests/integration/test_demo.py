"""The demo dataset of Lamina's own documentation: ingested once, in the background, unless turned off.

The "on" case with a cited answer through a real `lamina up` is in test_dashboard_browser.py (its stack
runs the demo, and the playground and an HTTP client ask it); here: off means no dataset and no alias, an
existing dataset is never ingested again, and the default follows the bundled models.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lamina.application.dashboard import Link
from lamina.config import DemoConfig, DeploymentConfig, LaminaConfig, OrchestrationConfig
from lamina.stack._dashboard import datasets_table, deployment_views, lineage_table, models_table
from lamina.stack._demo import DemoIngest, demo_alias, demo_docs
from lamina.stack.gateway import Stack, build_stack, create_gateway

pytestmark = pytest.mark.anyio


def config(enabled: bool | None, *, bundled: bool = False) -> LaminaConfig:
    return LaminaConfig(
        register_bundled=bundled,
        deployments=[DeploymentConfig(name="chat", engine="fake", replicas=1)],
        orchestration=OrchestrationConfig(ready_timeout_s=60, health_interval_s=0.2),
        demo=DemoConfig(enabled=enabled),
    )


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, dict[str, object]]]:
    """A stack (not started) whose demo ingest ran once to its end, and that run's status."""
    stack = build_stack(config(True), tmp_path_factory.mktemp("demo") / "state")
    first = DemoIngest(stack.config, stack.data)
    run = first.start()
    assert run is not None
    deadline = time.monotonic() + 120
    while first.status(run)["state"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    status = first.status(run)
    first.close()
    yield stack, status
    stack.telemetry.shutdown()
    stack.data.close()
    stack.store.close()


def test_the_demo_follows_the_bundled_models_unless_set() -> None:
    assert DemoConfig().on(register_bundled=True)
    assert not DemoConfig().on(register_bundled=False)
    assert DemoConfig(enabled=True).on(register_bundled=False)
    assert not DemoConfig(enabled=False).on(register_bundled=True)
    assert {p.name for p in demo_docs().glob("*.md")} >= {"quickstart.md", "layers.md"}


def test_an_existing_demo_dataset_is_not_ingested_again(ingested: tuple[Stack, dict[str, object]]) -> None:
    stack, status = ingested
    assert status["state"] == "completed", status
    alias = demo_alias(stack.config, stack.catalog)
    assert alias is not None and (alias.name, alias.model) == ("lamina-docs", "chat")
    again = DemoIngest(stack.config, stack.data)
    assert again.start() is None
    again.close()
    versions = stack.data.catalog.log("lamina-docs")
    assert len(versions) == 1
    files = {Path(s.uri).name for s in stack.data.catalog.sources(versions[0])}
    assert "quickstart.md" in files


def test_the_dashboards_tables_read_the_stacks_records(ingested: tuple[Stack, dict[str, object]]) -> None:
    stack, _ = ingested
    datasets = datasets_table(stack.data.catalog)
    assert [(r[0], r[1]) for r in datasets.rows] == [
        ("lamina-docs", Link("@1", "/ui/datasets/lamina-docs@1"))
    ]
    lineage = lineage_table(stack.data.catalog, "lamina-docs@1")
    assert any(str(r[0]).endswith("quickstart.md") and int(str(r[-1])) > 0 for r in lineage.rows)
    models = models_table(stack.registry, stack.catalog)
    assert any(str(r[0]).startswith("minilm-l6-v2@") for r in models.rows)  # the embedder the ingest used
    assert deployment_views(stack.controller) == []  # nothing started in this test


async def test_with_the_demo_off_there_is_no_dataset_and_no_alias(tmp_path: Path) -> None:
    stack = build_stack(config(False), tmp_path / "state")
    assert DemoIngest(stack.config, stack.data).start() is None
    assert demo_alias(stack.config, stack.catalog) is None
    app = create_gateway(stack)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            body = {"model": "lamina-docs", "messages": [{"role": "user", "content": "hi"}]}
            reply = await client.post("/v1/chat/completions", json=body)
            assert reply.status_code == 404, reply.text  # the model name resolves before any replica
            assert "lamina-docs" in reply.json()["error"]["message"]
            assert stack.data.catalog.names() == []
