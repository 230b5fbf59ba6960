"""The composition root: the whole stack built in process on fake-engine deployments, and the wiring rules.

``build_stack`` makes every object at once (no object is patched after it is built); the gateway's
lifespan then starts real replica worker processes of the fake engine, and one request walks the stack.
``lamina data`` must not import the web stack at all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from lamina.config import DeploymentConfig, LaminaConfig, OrchestrationConfig
from lamina.data import LanceDBStore
from lamina.models import Catalog
from lamina.stack.gateway import Stack, build_stack, create_gateway
from tests.support import run_python

pytestmark = pytest.mark.anyio


def fake_config() -> LaminaConfig:
    return LaminaConfig(
        register_bundled=False,
        deployments=[
            DeploymentConfig(name="chat", engine="fake", replicas=1),
            DeploymentConfig(name="embed", engine="fake", replicas=1),
        ],
        orchestration=OrchestrationConfig(ready_timeout_s=60, health_interval_s=0.2),
    )


def test_build_stack_makes_every_object_and_starts_nothing(tmp_path: Path) -> None:
    stack = build_stack(fake_config(), tmp_path / "state")
    try:
        assert isinstance(stack, Stack)
        assert isinstance(stack.catalog, Catalog)
        assert [m.id for m in stack.catalog.models()] == ["chat", "embed"]
        assert [w.name for w in stack.workloads] == ["chat", "embed"]
        assert stack.readiness() == {}  # the controller runs nothing until the gateway starts
        assert isinstance(stack.data.vectors, LanceDBStore)
        assert stack.data.store is stack.store  # one metadata store for the whole stack
        assert (tmp_path / "state" / "run" / "chat.json").is_file()
    finally:
        stack.telemetry.shutdown()
        stack.data.close()
        stack.store.close()


async def _client(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    app = create_gateway(stack)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            yield client


async def test_the_stack_serves_a_request_through_real_replica_processes(tmp_path: Path) -> None:
    stack = build_stack(fake_config(), tmp_path / "state")
    async for client in _client(stack):
        assert await stack.controller.wait_ready(60)
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        body = {"model": "chat", "messages": [{"role": "user", "content": "wired whole"}]}
        reply = await client.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == "wired whole"
        assert reply.headers["x-lamina-trace-id"]
        pids = [r.pid for d in stack.controller.status() for r in d.replicas if r.pid is not None]
        assert len(pids) == 2
    # the lifespan's end stopped every replica it started
    assert not [pid for pid in pids if _alive(pid)]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_lancedb_loads_only_when_a_dataset_is_touched(tmp_path: Path) -> None:
    """Importing LanceDB takes 1-2 s: a CLI command that reads no dataset, or a stack that serves none,
    never pays it; the first dataset read does."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "import lamina.cli\n"
        "from lamina.config import LaminaConfig\n"
        "from lamina.stack import open_data_stack\n"
        f"data = open_data_stack(LaminaConfig(register_bundled=False), Path({str(tmp_path)!r}))\n"
        "print('BEFORE', 'lancedb' in sys.modules)\n"
        "print('COUNT', data.vectors.count('docs'))\n"
        "print('AFTER', 'lancedb' in sys.modules)\n"
        "data.close()\n"
    )
    out = run_python(script)
    assert "BEFORE False" in out and "AFTER True" in out, out


def test_lamina_data_never_imports_the_web_stack(tmp_path: Path) -> None:
    """`lamina data` runs without FastAPI, uvicorn or the application layer in the process."""
    script = (
        "import sys\n"
        "from lamina.cli import main\n"
        f"sys.argv = ['lamina', 'data', 'list', '--json', '--state-dir', {str(tmp_path / 'state')!r}]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "web = sorted(m for m in sys.modules if m.split('.')[0] in {'fastapi', 'uvicorn', 'starlette'}\n"
        "             or m.startswith('lamina.application') or m == 'lamina.stack.gateway')\n"
        "print('WEB', web)\n"
    )
    out = run_python(script)
    assert "WEB []" in out, out
