"""``/admin/v1/traces`` and ``/admin/v1/doctor`` over ASGI: admin keys only, bad input refused, the JSON."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from lamina.application import GatewayDeps, KeyAuthenticator, KeySpec, KeyStore, create_app
from lamina.observability import DoctorInputs, Telemetry, Verdict, diagnose
from lamina.store import Store
from tests.support import CHAT, ReplayDispatcher, StaticCatalog

pytestmark = pytest.mark.anyio


@dataclass
class Admin:
    client: httpx.AsyncClient
    telemetry: Telemetry
    admin: dict[str, str]
    user: dict[str, str]
    windows: list[str]


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[Admin]:
    store = Store(f"sqlite:///{tmp_path / 'lamina.db'}")
    store.migrate()
    keys = KeyStore(store)
    _, admin_secret = keys.create(KeySpec(name="ops", scope="admin"))
    _, user_secret = keys.create(KeySpec(name="app"))
    telemetry = Telemetry(service_name="admin-test", store=store, otlp_endpoint=None)
    windows: list[str] = []

    async def doctor(window: str) -> Verdict:
        windows.append(window)
        return diagnose(DoctorInputs(window=window))

    deps = GatewayDeps(
        StaticCatalog(),
        ReplayDispatcher(),
        lambda: {CHAT: True},
        telemetry,
        authenticator=KeyAuthenticator(keys),
        traces_store=store,
        doctor=doctor,
    )
    transport = httpx.ASGITransport(app=create_app(deps))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        yield Admin(
            client,
            telemetry,
            {"Authorization": f"Bearer {admin_secret}"},
            {"Authorization": f"Bearer {user_secret}"},
            windows,
        )
    telemetry.shutdown()
    store.close()


@pytest.mark.parametrize("path", ["/admin/v1/traces", f"/admin/v1/traces/{'a' * 32}", "/admin/v1/doctor"])
async def test_only_admin_keys_may_read_traces_and_the_doctor(admin: Admin, path: str) -> None:
    assert (await admin.client.get(path)).status_code == 401
    assert (await admin.client.get(path, headers=admin.user)).status_code == 403


async def test_a_traced_call_is_listed_and_opens_as_a_tree(admin: Admin) -> None:
    body = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}]}
    answer = await admin.client.post("/v1/chat/completions", json=body, headers=admin.user)
    assert answer.status_code == 200, answer.text
    trace_id = answer.headers["x-lamina-trace-id"]
    assert admin.telemetry.force_flush()
    listed = (await admin.client.get("/admin/v1/traces?since=5m&limit=5", headers=admin.admin)).json()
    assert [t["trace_id"] for t in listed["traces"]] == [trace_id]
    one = (await admin.client.get(f"/admin/v1/traces/{trace_id.upper()}", headers=admin.admin)).json()
    assert one["trace_id"] == trace_id and one["spans"][0]["depth"] == 0
    assert {s["name"] for s in one["spans"]} >= {"dispatch", "engine"}


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("/admin/v1/traces?limit=0", "limit"),
        ("/admin/v1/traces?since=later", "since"),
        ("/admin/v1/traces/xyz", "trace_id"),
    ],
)
async def test_bad_input_is_a_400_naming_the_parameter(admin: Admin, query: str, param: str) -> None:
    r = await admin.client.get(query, headers=admin.admin)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


async def test_the_doctor_answers_for_the_window_asked(admin: Admin) -> None:
    r = await admin.client.get("/admin/v1/doctor?window=2h", headers=admin.admin)
    assert r.status_code == 200
    assert r.json()["window"] == "2h" and r.json()["bottleneck"] is None
    since = await admin.client.get("/admin/v1/doctor?window=2026-01-31T12:00:00Z", headers=admin.admin)
    assert since.status_code == 200 and "since 2026-01-31T12:00:00Z" in since.json()["evidence"][0]
    bad = await admin.client.get("/admin/v1/doctor?window=soon", headers=admin.admin)
    assert bad.status_code == 400 and "15m" in bad.json()["error"]["message"]
    assert admin.windows == ["2h", "2026-01-31T12:00:00Z"]  # a bad window never reaches the doctor
