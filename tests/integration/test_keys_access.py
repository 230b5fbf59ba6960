"""Keys and access over real HTTP (uvicorn on 127.0.0.1): keys made by the CLI, a gateway reading them from
the same SQLite file, the openai client, a revocation from another process, cross-site requests.

The gateway routes to the fake catalog and dispatcher of ``tests.support`` and retrieves with a retriever
that answers for any dataset: what is under test is who may reach what, not the models.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from typer.testing import CliRunner

from lamina.application import (
    GatewayDeps,
    IngestSettings,
    KeyAuthenticator,
    KeySpec,
    KeyStore,
    RagOptions,
    create_app,
    gateway_hosts,
)
from lamina.cli._app import app as cli
from lamina.clock import utcnow
from lamina.config import LaminaConfig
from lamina.data import PinnedVersion, Retrieval, Scalar, SearchMode
from lamina.observability import Telemetry
from lamina.stack import open_store
from lamina.store import Store
from tests.support import CHAT, EMBED, ReplayDispatcher, StaticCatalog

TTL_S = 0.5


class AnyDataset:
    """Implements the gateway's Retriever port: an empty answer from version 1 of any dataset."""

    async def retrieve(
        self,
        ref: str,
        query: str,
        *,
        k: int = 10,
        mode: SearchMode = "hybrid",
        filters: Mapping[str, Scalar] | None = None,
    ) -> Retrieval:
        version = PinnedVersion(ref.partition("@")[0], "v" * 64, 1, frozenset())
        return Retrieval(query=query, mode=mode, version=version, citations=[])


class NoIngest:
    """Implements the admin API's IngestService port: lists one dataset, starts nothing."""

    def start(self, dataset: str, patterns: Sequence[str], options: IngestSettings) -> str:
        raise AssertionError("no test ingests")

    def status(self, run_id: str) -> dict[str, Any]:
        return {}

    def datasets(self) -> list[dict[str, Any]]:
        return [{"name": "docs"}]


@dataclass
class Gateway:
    url: str
    state_dir: Path
    store: Store
    #: secrets by key name, made with `lamina keys create`
    secrets: dict[str, str]

    def client(self, key: str) -> httpx.Client:
        bearer = {"authorization": f"Bearer {self.secrets[key]}"}
        return httpx.Client(base_url=self.url, headers=bearer, timeout=10)


def create_key(state_dir: Path, *args: str) -> dict[str, Any]:
    result = CliRunner().invoke(cli, ["keys", "create", *args, "--json", "--state-dir", str(state_dir)])
    assert result.exit_code == 0, result.output
    made: dict[str, Any] = json.loads(result.stdout)
    return made


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    state_dir = tmp_path_factory.mktemp("keys") / "state"
    secrets = {
        "root": create_key(state_dir, "--name", "root", "--scope", "admin")["secret"],
        "alice": create_key(
            state_dir, "--name", "alice", "--models", f"{CHAT},docs-chat", "--datasets", "docs"
        )["secret"],
        "bob": create_key(state_dir, "--name", "bob", "--datasets", "private")["secret"],
        "carol": create_key(state_dir, "--name", "carol")["secret"],
    }
    store = open_store(LaminaConfig(), state_dir)
    telemetry = Telemetry(service_name="keys-access-test")
    deps = GatewayDeps(
        StaticCatalog(),
        ReplayDispatcher(),
        lambda: {},
        telemetry,
        authenticator=KeyAuthenticator(KeyStore(store), ttl_s=TTL_S),
        allowed_hosts=gateway_hosts("127.0.0.1"),
        retriever=AnyDataset(),
        rag_aliases={"docs-chat": (CHAT, RagOptions(dataset="private@1"))},
        ingest=NoIngest(),
    )
    server = uvicorn.Server(
        uvicorn.Config(create_app(deps), host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield Gateway(f"http://127.0.0.1:{port}", state_dir, store, secrets)
    server.should_exit = True
    thread.join(10)
    telemetry.shutdown()
    store.close()


def chat(model: str = CHAT, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def test_the_openai_client_works_with_a_user_key_within_its_models(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=gateway.secrets["alice"], max_retries=0)
    answer = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "Hello world"
    assert [m.id for m in client.models.list()] == [CHAT]
    with pytest.raises(openai.PermissionDeniedError, match=f"may not use the model '{EMBED}'"):
        client.embeddings.create(model=EMBED, input="x")
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="lam-wrong", max_retries=0).models.list()


def test_only_an_admin_key_reaches_the_admin_api(gateway: Gateway) -> None:
    with gateway.client("alice") as alice, gateway.client("root") as root:
        refused = alice.get("/admin/v1/datasets")
        assert refused.status_code == 403
        assert "lamina keys create --scope admin" in refused.json()["error"]["message"]
        assert root.get("/admin/v1/datasets").json() == [{"name": "docs"}]
        assert root.post("/v1/embeddings", json={"model": EMBED, "input": "x"}).status_code == 200


def test_a_key_reads_only_its_datasets(gateway: Gateway) -> None:
    with gateway.client("alice") as alice, gateway.client("bob") as bob:
        assert alice.post("/v1/retrieve", json={"dataset": "docs@1", "query": "q"}).status_code == 200
        refused = alice.post("/v1/retrieve", json={"dataset": "private", "query": "q"})
        assert refused.status_code == 403
        assert "may not read the dataset 'private'; it may read: docs" in refused.json()["error"]["message"]
        assert bob.post("/v1/retrieve", json={"dataset": "private", "query": "q"}).status_code == 200
        rag = alice.post("/v1/chat/completions", json=chat(rag={"dataset": "private"}))
        assert rag.status_code == 403 and rag.json()["error"]["param"] == "dataset"
        alias = alice.post("/v1/chat/completions", json=chat("docs-chat"))
        assert alias.status_code == 403
        assert "which the model 'docs-chat' answers from" in alias.json()["error"]["message"]
        assert bob.post("/v1/chat/completions", json=chat("docs-chat")).status_code == 200


def test_a_key_revoked_by_another_process_is_refused_within_the_ttl(gateway: Gateway) -> None:
    with gateway.client("carol") as carol:
        assert carol.get("/v1/models").status_code == 200
        revoke = [
            sys.executable,
            "-m",
            "lamina.cli",
            "keys",
            "revoke",
            "carol",
            "--state-dir",
            str(gateway.state_dir),
        ]
        done = subprocess.run(revoke, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        revoked_at = time.monotonic()
        while (r := carol.get("/v1/models")).status_code == 200:
            assert time.monotonic() - revoked_at < TTL_S + 1.0, "the revocation did not take effect"
            time.sleep(0.05)  # polling another process's write, not waiting out a policy
        assert r.status_code == 401 and "'carol' was revoked" in r.json()["error"]["message"]


def test_an_expired_key_is_refused(gateway: Gateway) -> None:
    long_ago = utcnow() - timedelta(days=2)
    made_then = KeyStore(gateway.store, clock=lambda: long_ago)
    _, secret = made_then.create(KeySpec(name="dave", expires_at=long_ago + timedelta(days=1)))
    r = httpx.get(f"{gateway.url}/v1/models", headers={"authorization": f"Bearer {secret}"})
    assert r.status_code == 401 and "'dave' expired at" in r.json()["error"]["message"]


def test_cross_site_requests_are_refused(gateway: Gateway) -> None:
    with gateway.client("root") as root:
        form = root.post(
            "/v1/chat/completions",
            content="model=chat-model",
            headers={"content-type": "application/x-www-form-urlencoded", "origin": "https://evil.example"},
        )
        assert form.status_code == 403 and form.json()["error"]["code"] == "permission_denied"
        plain = root.post("/v1/chat/completions", content="{}", headers={"content-type": "text/plain"})
        assert plain.status_code == 415 and plain.json()["error"]["code"] == "unsupported_media_type"
        rebound = root.get("/v1/models", headers={"host": "evil.example"})
        assert rebound.status_code == 403 and "server.allowed_hosts" in rebound.json()["error"]["message"]
        assert root.get("/v1/models", headers={"host": "localhost"}).status_code == 200


def test_lamina_up_refuses_a_public_address_without_keys(tmp_path: Path) -> None:
    up = [sys.executable, "-m", "lamina.cli", "up", "--host", "0.0.0.0", "--state-dir", str(tmp_path / "s")]
    done = subprocess.run(up, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    message = " ".join(done.stderr.split())
    assert (
        "without API keys" in message and "lamina keys create" in message and "--insecure-no-auth" in message
    )
