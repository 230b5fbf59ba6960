"""Keys: the store keeps hashes only; the authenticator answers from memory and sees revocations within its
TTL; access checks name what a key may use; the site guard refuses other sites' requests; the CLI."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import typer
from sqlalchemy import event, select
from starlette.requests import Request
from typer.testing import CliRunner

from lamina.application import (
    ANONYMOUS,
    GatewayDeps,
    KeyAuthenticator,
    KeySpec,
    KeyStore,
    Principal,
    create_app,
    gateway_hosts,
)
from lamina.cli._app import app as cli
from lamina.cli._keys import refuse_open_bind
from lamina.config import LaminaConfig, ServerConfig
from lamina.errors import (
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
)
from lamina.observability import Telemetry
from lamina.stack import open_store
from lamina.store import Store, api_keys
from tests.support import CHAT, EMBED, T0, FakeClock, ReplayDispatcher, StaticCatalog

# --- the key store ----------------------------------------------------------------------------------------


def test_a_key_is_created_listed_rotated_and_revoked(store: Store) -> None:
    clock = FakeClock()
    keys = KeyStore(store, clock=clock)
    spec = KeySpec(
        name="alice",
        models=["chat-model", "chat-model"],
        datasets=["docs"],
        rpm=60,
        tpm=1000,
        budget_usd=5.0,
        budget_period="day",
        expires_at=T0 + timedelta(days=30),
    )
    record, secret = keys.create(spec)
    assert secret.startswith("lam-") and len(secret) == 4 + 43
    assert record.id.startswith("key_") and len(record.id) == 4 + 12
    assert secret.startswith(record.prefix) and len(record.prefix) == 10
    assert (record.models, record.datasets) == (("chat-model",), ("docs",))
    assert keys.get("alice") == keys.get(record.id) == record
    admin, _ = keys.create(KeySpec(name="root", scope="admin"))
    assert [k.name for k in keys.list()] == ["alice", "root"]
    assert admin.principal() == Principal(key_id=admin.id, name="root", scope="admin")

    rotated, new_secret = keys.rotate("alice")
    assert new_secret != secret and rotated.prefix == new_secret[:10]
    assert (rotated.id, rotated.name, rotated.rpm, rotated.models) == (
        record.id,
        "alice",
        60,
        ("chat-model",),
    )
    assert keys.by_secret_hash(hashlib.sha256(secret.encode()).hexdigest()) is None
    assert keys.by_secret_hash(hashlib.sha256(new_secret.encode()).hexdigest()) == rotated

    clock.advance(60)
    revoked = keys.revoke(record.id)
    assert revoked.revoked_at == T0 + timedelta(seconds=60) and revoked.status(clock.now) == "revoked"
    assert keys.revoke("alice") == revoked  # again: nothing changes
    with pytest.raises(ConflictError, match="is revoked; create a new one"):
        keys.rotate("alice")
    with pytest.raises(ConflictError, match="a key named 'alice' exists"):
        keys.create(KeySpec(name="alice"))
    with pytest.raises(NotFoundError, match="`lamina keys list` shows the keys"):
        keys.get("bob")
    assert keys.get("root").status(T0 + timedelta(days=400)) == "active"
    assert keys.get(record.id).to_json(clock.now)["status"] == "revoked"


def test_only_the_secrets_hash_is_stored(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'lamina.db'}")
    store.migrate()
    record, secret = KeyStore(store).create(KeySpec(name="alice"))
    with store.begin() as conn:
        [row] = conn.execute(select(api_keys)).mappings().all()
    assert row["secret_hash"] == hashlib.sha256(secret.encode()).hexdigest()
    assert all(secret not in str(value) for value in row.values())
    store.close()
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("lamina.db*"))
    assert record.id.encode() in stored and secret.encode() not in stored


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (KeySpec(name="Alice"), "is not valid; use 1 to 100 lowercase"),
        (KeySpec(name="key_x"), "marks key ids"),
        (KeySpec(name="a", scope="root"), "is not admin or user"),  # type: ignore[arg-type]
        (KeySpec(name="a", rpm=0), "rpm must be at least 1"),
        (KeySpec(name="a", budget_usd=5.0), "needs both an amount and a period"),
        (KeySpec(name="a", budget_usd=-1.0, budget_period="day"), "more than 0 USD"),
        (KeySpec(name="a", budget_usd=float("inf"), budget_period="day"), "more than 0 USD, finite"),
        (KeySpec(name="a", budget_usd=1.0, budget_period="year"), "not day, week or month"),  # type: ignore[arg-type]
        (KeySpec(name="a", expires_at=T0 - timedelta(seconds=1)), "is in the past"),
    ],
)
def test_a_bad_key_spec_says_what_to_give(tmp_path: Path, spec: KeySpec, match: str) -> None:
    store = Store(f"sqlite:///{tmp_path / 'lamina.db'}")
    store.migrate()
    with pytest.raises(InvalidRequestError, match=match):
        KeyStore(store, clock=FakeClock()).create(spec)
    store.close()


# --- the authenticator --------------------------------------------------------------------------------------


@dataclass
class Auth:
    store: Store
    keys: KeyStore
    clock: FakeClock
    queries: list[str]

    def authenticator(self, static: tuple[str, ...] = ()) -> KeyAuthenticator:
        return KeyAuthenticator(
            self.keys, static, ttl_s=2.0, monotonic=self.clock.monotonic, clock=self.clock
        )


@pytest.fixture
def auth(tmp_path: Path) -> Iterator[Auth]:
    store = Store(f"sqlite:///{tmp_path / 'lamina.db'}")
    store.migrate()
    queries: list[str] = []
    event.listen(store.engine, "before_cursor_execute", lambda *a: queries.append(a[2]))
    clock = FakeClock()
    yield Auth(store, KeyStore(store, clock=clock), clock, queries)
    store.close()


def request(secret: str | None) -> Request:
    headers = [] if secret is None else [(b"authorization", f"Bearer {secret}".encode())]
    return Request({"type": "http", "method": "GET", "path": "/v1/models", "headers": headers})


@pytest.mark.anyio
async def test_without_any_key_every_request_is_anonymous_until_one_is_created(auth: Auth) -> None:
    authenticate = auth.authenticator()
    assert await authenticate(request(None)) is ANONYMOUS
    assert await authenticate(request("anything")) is ANONYMOUS
    _, secret = auth.keys.create(KeySpec(name="alice"))
    assert await authenticate(request(None)) is ANONYMOUS  # remembered for the TTL
    auth.clock.advance(2.1)
    with pytest.raises(AuthenticationError, match=r"missing API key.*lamina keys create"):
        await authenticate(request(None))
    assert (await authenticate(request(secret))).name == "alice"


@pytest.mark.anyio
async def test_a_valid_key_is_its_principal_and_the_steady_state_asks_no_database(auth: Auth) -> None:
    record, secret = auth.keys.create(
        KeySpec(
            name="alice",
            models=["chat-model"],
            datasets=["docs"],
            rpm=5,
            budget_usd=2.0,
            budget_period="week",
        )
    )
    authenticate = auth.authenticator()
    auth.queries.clear()
    principal = await authenticate(request(secret))
    assert principal == Principal(
        key_id=record.id,
        name="alice",
        scope="user",
        models=frozenset({"chat-model"}),
        datasets=frozenset({"docs"}),
        rpm=5,
        budget_usd=2.0,
        budget_period="week",
    )
    assert len(auth.queries) == 2  # does any key exist, and this secret's key
    for _ in range(1000):
        auth.clock.advance(0.001)
        assert await authenticate(request(secret)) is principal
    assert len(auth.queries) == 2
    auth.clock.advance(1.0)
    await authenticate(request(secret))
    assert len(auth.queries) == 3  # the TTL ran out: looked up once more


@pytest.mark.anyio
async def test_concurrent_requests_of_a_new_secret_share_one_lookup(auth: Auth) -> None:
    _, secret = auth.keys.create(KeySpec(name="alice"))
    authenticate = auth.authenticator()
    auth.queries.clear()
    names: list[str] = []

    async def one() -> None:
        names.append((await authenticate(request(secret))).name)

    async with anyio.create_task_group() as tasks:
        for _ in range(20):
            tasks.start_soon(one)
    assert names == ["alice"] * 20
    assert len([q for q in auth.queries if "secret_hash" in q]) == 1


@pytest.mark.anyio
async def test_revoked_rotated_expired_and_unknown_keys_are_refused_after_the_ttl(auth: Auth) -> None:
    _, alice = auth.keys.create(KeySpec(name="alice"))
    _, bob = auth.keys.create(KeySpec(name="bob"))
    _, carol = auth.keys.create(KeySpec(name="carol", expires_at=T0 + timedelta(hours=1)))
    authenticate = auth.authenticator()
    for secret in (alice, bob, carol):
        await authenticate(request(secret))
    auth.keys.revoke("alice")
    _, bob2 = auth.keys.rotate("bob")
    assert (await authenticate(request(alice))).name == "alice"  # still within the TTL
    auth.clock.advance(2.1)
    with pytest.raises(AuthenticationError, match=r"'alice' was revoked at .* ask an admin for a new key"):
        await authenticate(request(alice))
    with pytest.raises(AuthenticationError, match="invalid API key; check the secret"):
        await authenticate(request(bob))
    assert (await authenticate(request(bob2))).name == "bob"
    auth.clock.advance(hours=1)
    with pytest.raises(AuthenticationError, match="'carol' expired at"):
        await authenticate(request(carol))
    with pytest.raises(AuthenticationError, match="invalid API key"):
        await authenticate(request("lam-" + "x" * 43))


@pytest.mark.anyio
async def test_server_api_keys_stay_admins_beside_stored_keys(auth: Auth) -> None:
    authenticate = auth.authenticator(("static-secret",))
    assert (await authenticate(request("static-secret"))).is_admin
    with pytest.raises(AuthenticationError, match="missing API key"):
        await authenticate(request(None))  # static keys close the door even with no stored key
    _, secret = auth.keys.create(KeySpec(name="alice"))
    assert (await authenticate(request(secret))).scope == "user"
    with pytest.raises(AuthenticationError, match="invalid API key"):
        await authenticate(request("static-secreT"))


# --- access over the gateway ------------------------------------------------------------------------------


@dataclass
class Site:
    client: httpx.AsyncClient
    keys: KeyStore


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    store = Store(f"sqlite:///{tmp_path / 'lamina.db'}")
    store.migrate()
    keys = KeyStore(store)
    telemetry = Telemetry(service_name="keys-test")
    deps = GatewayDeps(
        StaticCatalog(),
        ReplayDispatcher(),
        lambda: {},
        telemetry,
        authenticator=KeyAuthenticator(keys),
        allowed_hosts=gateway_hosts("127.0.0.1", ["*.example.com"]),
        allowed_origins=["https://app.example.org"],
    )
    transport = httpx.ASGITransport(app=create_app(deps))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as client:
        yield Site(client, keys)
    telemetry.shutdown()
    store.close()


def chat(model: str = CHAT) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.anyio
async def test_a_user_key_reaches_only_its_models(site: Site) -> None:
    _, secret = site.keys.create(KeySpec(name="alice", models=[CHAT]))
    bearer = {"authorization": f"Bearer {secret}"}
    ok = await site.client.post("/v1/chat/completions", json=chat(f"{CHAT}@1"), headers=bearer)
    assert ok.status_code == 200, ok.text
    refused = await site.client.post("/v1/embeddings", json={"model": EMBED, "input": "x"}, headers=bearer)
    assert refused.status_code == 403
    error = refused.json()["error"]
    assert (error["code"], error["param"]) == ("permission_denied", "model")
    assert f"may not use the model '{EMBED}'; it may use: {CHAT}" in error["message"]
    listed = await site.client.get("/v1/models", headers=bearer)
    assert [m["id"] for m in listed.json()["data"]] == [CHAT]
    assert (await site.client.get(f"/v1/models/{EMBED}", headers=bearer)).status_code == 403
    assert (await site.client.get(f"/v1/models/{CHAT}@1", headers=bearer)).status_code == 200


JSON = {"content-type": "application/json"}
BODY = json.dumps(chat())


@pytest.mark.parametrize(
    ("method", "headers", "status", "says"),
    [
        ("POST", {"content-type": "application/json; charset=utf-8"}, 200, ""),
        ("POST", {"content-type": "application/x-www-form-urlencoded"}, 415, "must be JSON"),
        ("POST", {"content-type": "text/plain"}, 415, "Content-Type 'text/plain'"),
        ("POST", {}, 415, "got no Content-Type"),
        ("POST", {**JSON, "host": "evil.example"}, 403, "does not answer to the host 'evil.example'"),
        ("POST", {**JSON, "host": "localhost:9"}, 200, ""),
        ("POST", {**JSON, "host": "[::1]:8000"}, 200, ""),
        ("POST", {**JSON, "host": "api.example.com"}, 200, ""),
        ("POST", {**JSON, "host": "example.com.evil.example"}, 403, "server.allowed_hosts"),
        ("POST", {**JSON, "origin": "https://evil.example"}, 403, "web origin 'https://evil.example'"),
        ("POST", {**JSON, "origin": "null"}, 403, "server.allowed_origins"),
        ("POST", {**JSON, "origin": "http://localhost:3000"}, 200, ""),
        ("POST", {**JSON, "origin": "http://127.0.0.1:8000"}, 200, ""),
        ("POST", {**JSON, "origin": "https://app.example.org/"}, 200, ""),
        ("GET", {"origin": "https://evil.example"}, 403, "are refused"),
    ],
)
@pytest.mark.anyio
async def test_the_site_guard(
    site: Site, method: str, headers: dict[str, str], status: int, says: str
) -> None:
    path, content = ("/v1/chat/completions", BODY) if method == "POST" else ("/v1/models", None)
    r = await site.client.request(method, path, headers=headers, content=content)
    assert r.status_code == status, r.text
    if status != 200:
        error = r.json()["error"]
        assert says in error["message"] and error["type"] in ("permission_error", "invalid_request_error")


@pytest.mark.anyio
async def test_a_body_less_post_needs_no_content_type(site: Site) -> None:
    r = await site.client.post("/v1/chat/completions")
    assert r.status_code == 400 and r.json()["error"]["code"] != "unsupported_media_type"


def test_gateway_hosts() -> None:
    assert gateway_hosts("127.0.0.1") == ["localhost", "127.0.0.1", "[::1]"]
    assert gateway_hosts("::1", ["API.example.com."]) == [
        "localhost",
        "127.0.0.1",
        "[::1]",
        "api.example.com",
    ]
    assert gateway_hosts("10.0.0.5")[-1] == "10.0.0.5"
    everywhere = gateway_hosts("0.0.0.0")
    assert "127.0.0.1" in everywhere and len(everywhere) > 3  # the machine's name and addresses


# --- the CLI ----------------------------------------------------------------------------------------------


def test_the_cli_creates_lists_rotates_and_revokes(tmp_path: Path) -> None:
    runner = CliRunner()
    sd = ["--state-dir", str(tmp_path / "state")]

    def run(*args: str, code: int = 0) -> Any:
        result = runner.invoke(cli, ["keys", *args, *sd])
        assert result.exit_code == code, result.output
        return json.loads(result.stdout) if "--json" in args else result.output

    made = run(
        "create",
        "--name",
        "alice",
        "--models",
        "chat-model,embed",
        "--rpm",
        "10",
        "--budget",
        "5/day",
        "--expires",
        "30d",
        "--json",
    )
    assert made["secret"].startswith(made["prefix"]) and made["models"] == ["chat-model", "embed"]
    assert (made["budget_usd"], made["budget_period"], made["rpm"]) == (5.0, "day", 10)
    [listed] = run("list", "--json")
    assert "secret" not in listed and listed["status"] == "active" and listed["id"] == made["id"]
    assert made["secret"] not in run("list")
    rotated = run("rotate", "alice", "--json")
    assert rotated["id"] == made["id"] and rotated["secret"] != made["secret"]
    assert "revoked key alice" in run("revoke", made["id"])
    assert run("list", "--json")[0]["status"] == "revoked"
    run("create", "--name", "bob", "--expires", "2001-01-01", code=2)
    run("create", "--name", "bob", "--budget", "5/year", code=2)
    run("revoke", "nobody", code=1)


def test_up_refuses_a_public_address_only_while_no_key_exists(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.5"):
        refuse_open_bind(LaminaConfig(), state_dir, host, insecure_no_auth=False)
    refuse_open_bind(LaminaConfig(), state_dir, "0.0.0.0", insecure_no_auth=True)
    refuse_open_bind(
        LaminaConfig(server=ServerConfig(api_keys=["k"])), state_dir, "10.0.0.1", insecure_no_auth=False
    )
    for host in ("0.0.0.0", "10.0.0.1", "gpu-box.example.com"):
        with pytest.raises(typer.Exit) as refused:
            refuse_open_bind(LaminaConfig(), state_dir, host, insecure_no_auth=False)
        assert refused.value.exit_code == 2
    store = open_store(LaminaConfig(), state_dir)
    KeyStore(store).create(KeySpec(name="admin", scope="admin"))
    store.close()
    refuse_open_bind(LaminaConfig(), state_dir, "0.0.0.0", insecure_no_auth=False)


def test_creating_a_key_for_names_the_stack_does_not_know_warns(tmp_path: Path) -> None:
    """A typo in --models or --datasets would show only as a 403 on the key's first call: the key is
    created (a model may be deployed, a dataset ingested, later) and each unknown name is a warning that
    says what is known."""
    from lamina.config import BUNDLED_CHAT_MODEL

    args = ["keys", "create", "--state-dir", str(tmp_path / "state"), "--json", "--name"]
    known = f"{BUNDLED_CHAT_MODEL},lamina-docs"
    quiet = CliRunner().invoke(cli, [*args, "a", "--models", known, "--datasets", "lamina-docs@2"])
    assert quiet.exit_code == 0 and "warning" not in quiet.stderr, quiet.output
    typos = ["--models", f"{BUNDLED_CHAT_MODEL},chta", "--datasets", "dcos"]
    typo = CliRunner().invoke(cli, [*args, "b", *typos])
    assert typo.exit_code == 0, typo.output
    assert sorted(json.loads(typo.stdout)["models"]) == sorted([BUNDLED_CHAT_MODEL, "chta"])
    warnings = [line for line in typo.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, typo.stderr
    assert "no model is named 'chta'" in warnings[0] and BUNDLED_CHAT_MODEL in warnings[0]
    assert "no dataset is named 'dcos'" in warnings[1] and "lamina-docs" in warnings[1]
