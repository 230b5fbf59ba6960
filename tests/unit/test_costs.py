"""Cost and budgets: the pricing math, and the gateway on the replica fakes with a real CostPolicy on a real
SQLite store (the cost on plain and streamed answers, the ledger rows, the soft warning, the refusal and
the release of what a failed call reserved)."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy
from sqlalchemy import select
from starlette.requests import Request

from lamina.application import (
    ANONYMOUS,
    Budget,
    Call,
    CostLedger,
    CostPolicy,
    GatewayDeps,
    LedgerEntry,
    Prices,
    Principal,
    Usage,
    create_app,
    gpu_hour_usd,
    replica_hourly_usd,
)
from lamina.application._budgets import Settlement, usd_text
from lamina.application._ledger_writer import LedgerWriter
from lamina.config import CostsConfig, ModelPriceConfig
from lamina.data.drift import since_of
from lamina.errors import InvalidRequestError, NoReadyReplicaError, UnavailableError
from lamina.observability import Telemetry
from lamina.store import Store, cost_ledger
from tests.support import (
    CHAT,
    EMBED,
    PLAIN,
    T0,
    FakeClock,
    ReplayDispatcher,
    StaticCatalog,
    events_of,
)

# a CHAT replica has 4 cores at $0.09: $0.36 an hour; PLAIN is priced by tokens
HOURLY = {CHAT: 0.36, EMBED: 0.09}
CONFIG = CostsConfig(
    cpu_core_hour_usd=0.09,
    models={PLAIN: ModelPriceConfig(input_per_million=1000.0, output_per_million=2000.0)},
    tokens_per_second={CHAT: 10.0},
)
#: the replica fakes report engine_ms 40, 9 prompt and 2 completion tokens
CHAT_COST = 0.04 * 0.36 / 3600
PLAIN_COST = (9 * 1000.0 + 2 * 2000.0) / 1e6
#: PLAIN with max_tokens 2: the gateway estimates 20 prompt tokens for one "hi" message
PLAIN_RESERVE = (20 * 1000.0 + 2 * 2000.0) / 1e6


def call(model: str = CHAT, prompt: int = 100, completion: int = 50) -> Call:
    return Call(ANONYMOUS, "chat", model, model, None, {}, False, prompt, completion)


# --- pricing -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usage", "usd", "basis"),
    [
        (Usage(9, 2, "r", 0.04), CHAT_COST, "compute"),  # engine time x the replica's hourly price
        (Usage(9, 2, "r", 0.0), 0.0, "compute"),
        (Usage(30, 20, "r", None), 50 / 10.0 * 0.36 / 3600, "compute"),  # no time reported: from tokens
    ],
)
def test_compute_pricing(usage: Usage, usd: float, basis: str) -> None:
    got = Prices(CONFIG, HOURLY).cost(call(), usage)
    assert got.usd == pytest.approx(usd)
    assert (got.basis, got.engine_s) == (basis, usage.engine_s)


def test_token_pricing_by_deployment_or_asked_name() -> None:
    prices = Prices(CONFIG, HOURLY)
    got = prices.cost(call(PLAIN), Usage(9, 2, "r", 5.0))  # engine time does not matter
    assert got.usd == pytest.approx(PLAIN_COST) and got.basis == "tokens"
    assert got.to_json() == {"usd": 0.013, "basis": "tokens", "engine_s": 5.0}
    assert got.header() == "0.013"  # plain decimals, to the pico-dollar
    assert prices.cost(call(), Usage(9, 2, "r", 0.0043)).header() == "0.00000043"
    assert prices.cost(call(), Usage(9, 2, "r", 0.0)).header() == "0.0"
    aliased = Call(ANONYMOUS, "chat", f"{PLAIN}@1", "elsewhere", None, {}, False, 1, 1)
    assert prices.token_price(aliased) is not None


def test_the_estimate_at_admission_is_an_upper_bound() -> None:
    prices = Prices(CONFIG, HOURLY)
    # tokens: prompt and max_tokens at the prices; compute: those tokens at the conservative tokens/s
    assert prices.estimate(call(PLAIN, 100, 50)) == pytest.approx((100 * 1000 + 50 * 2000) / 1e6)
    assert prices.estimate(call(CHAT, 100, 50)) == pytest.approx(150 / 10.0 * 0.36 / 3600)
    # an unknown deployment: one core's price at the default 20 tokens/s
    assert prices.estimate(call("other", 100, 50)) == pytest.approx(150 / 20.0 * 0.09 / 3600)
    assert prices.estimate(call(CHAT, 9, 2)) >= prices.cost(call(CHAT), Usage(9, 2, "r", None)).usd


def test_device_prices() -> None:
    config = CostsConfig(cpu_core_hour_usd=0.05, gpu_hour_usd={"H100": 2.5, "H100 NVL": 3.0, "L4": 0.7})
    assert gpu_hour_usd(config, "NVIDIA H100 80GB HBM3") == 2.5
    assert gpu_hour_usd(config, "NVIDIA H100 NVL") == 3.0  # the longest key that fits
    assert gpu_hour_usd(config, "L4") == 0.7
    assert gpu_hour_usd(config, "Tesla T4") is None
    assert replica_hourly_usd(config, 8.0) == pytest.approx(0.4)
    assert replica_hourly_usd(config, 2.0, [2.5, 2.5]) == pytest.approx(5.1)


def test_bad_costs_config_names_the_values() -> None:
    with pytest.raises(ValueError, match=re.escape("tokens_per_second rates > 0: {'x': 0.0}")):
        CostsConfig(tokens_per_second={"x": 0.0})
    with pytest.raises(ValueError, match=re.escape("'A100': -1.0")):
        CostsConfig(gpu_hour_usd={"A100": -1.0})


# --- the gateway with a CostPolicy ---------------------------------------------------------------------


@dataclass
class FixedKey:
    """An authenticator for one principal."""

    principal: Principal

    async def __call__(self, request: Request) -> Principal:
        return self.principal


@dataclass
class Gateway:
    client: httpx.AsyncClient
    dispatcher: ReplayDispatcher
    policy: CostPolicy
    store: Store
    auth: FixedKey
    clock: FakeClock = field(default_factory=FakeClock)

    async def chat(self, model: str = CHAT, **extra: Any) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
        return await self.client.post("/v1/chat/completions", json=body)

    def spend(self, budget: Budget, now: datetime) -> tuple[float, float]:
        assert self.policy.flush()  # settlements are written behind the answers
        return self.policy.ledger.spend(budget, now)

    def ledger(self) -> list[dict[str, Any]]:
        assert self.policy.flush()
        with self.store.begin() as conn:
            return [dict(r._mapping) for r in conn.execute(select(cost_ledger).order_by(cost_ledger.c.id))]


@pytest.fixture
async def gw(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Gateway]:
    config = getattr(request, "param", CONFIG)
    store = Store(f"sqlite:///{tmp_path / 'lamina.db'}")
    store.migrate()
    telemetry = Telemetry(service_name="costs-test", store=None, otlp_endpoint=None)
    clock = FakeClock()
    policy = CostPolicy(store, config, HOURLY, clock=clock)
    dispatcher, auth = ReplayDispatcher(), FixedKey(ANONYMOUS)
    deps = GatewayDeps(StaticCatalog(), dispatcher, dict, telemetry, authenticator=auth, policies=[policy])
    transport = httpx.ASGITransport(app=create_app(deps))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        yield Gateway(client, dispatcher, policy, store, auth, clock)
    policy.close()
    telemetry.shutdown()
    store.close()


TEAM = Principal(key_id="key_team", name="team-a", scope="user", budget_usd=0.05, budget_period="day")


@pytest.mark.anyio
async def test_a_plain_answer_reports_its_cost_and_is_in_the_ledger(gw: Gateway) -> None:
    r = await gw.chat(f"{CHAT}@1", max_tokens=5)
    assert r.status_code == 200, r.text
    assert float(r.headers["x-lamina-cost-usd"]) == pytest.approx(CHAT_COST, abs=1e-9)
    cost = r.json()["usage"]["cost"]
    assert cost == {"usd": pytest.approx(CHAT_COST), "basis": "compute", "engine_s": 0.04}
    assert r.json()["usage"]["completion_tokens"] == 2
    [row] = gw.ledger()
    assert row["trace_id"] == r.headers["x-lamina-trace-id"]
    assert (row["key_id"], row["key_name"], row["operation"]) == (None, "anonymous", "chat")
    assert (row["model"], row["deployment"], row["model_version"]) == (f"{CHAT}@1", CHAT, f"{CHAT}@1")
    assert (row["replica"], row["prompt_tokens"], row["completion_tokens"]) == ("chat-model-0", 9, 2)
    assert (row["engine_s"], row["basis"]) == (0.04, "compute")
    assert row["cost_usd"] == pytest.approx(CHAT_COST)
    assert row["ts"] == T0.replace(tzinfo=UTC)


@pytest.mark.anyio
async def test_token_priced_and_embedding_answers(gw: Gateway) -> None:
    r = await gw.chat(PLAIN)
    assert r.json()["usage"]["cost"] == {"usd": 0.013, "basis": "tokens", "engine_s": 0.04}
    assert r.headers["x-lamina-cost-usd"] == "0.013"
    e = await gw.client.post("/v1/embeddings", json={"model": EMBED, "input": "hi"})
    assert e.json()["usage"]["cost"]["usd"] == pytest.approx(0.04 * 0.09 / 3600)
    assert [row["operation"] for row in gw.ledger()] == ["chat", "embeddings"]


@pytest.mark.anyio
async def test_a_stream_reports_its_cost_in_the_usage_chunk(gw: Gateway) -> None:
    r = await gw.chat(stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200
    # the headers went out before the replica said what it used: the cost is in the usage chunk only
    assert "x-lamina-cost-usd" not in r.headers
    events = events_of(r.text)
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    assert usage["cost"] == {"usd": pytest.approx(CHAT_COST), "basis": "compute", "engine_s": 0.04}
    quiet = await gw.chat(stream=True)  # no usage chunk asked for: still priced and in the ledger
    assert "cost" not in quiet.text
    assert len(gw.ledger()) == 2


@pytest.mark.anyio
async def test_a_key_budget_warns_then_refuses_naming_spend_reserve_and_reset(
    gw: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    gw.auth.principal = TEAM
    budget = gw.policy.budgets(TEAM)[0]
    statuses, warnings = [], []
    for _ in range(4):  # each reserves $0.024 and spends $0.013 of the $0.05 a day
        r = await gw.chat(PLAIN, max_tokens=2)
        statuses.append(r.status_code)
        warnings.append(r.headers.get("x-lamina-budget-warning"))
    assert statuses == [200, 200, 200, 429]
    assert warnings[:2] == [None, None]  # 48% and 74% used or reserved
    assert warnings[2] == (
        "the budget of key 'team-a' is 100% used ($0.0260 spent, $0.0240 reserved, of $0.05 per day); "
        "it resets at 2025-01-02T00:00:00Z"
    )
    logged = [r.getMessage() for r in caplog.records if r.name == "lamina.costs"]
    assert logged == [warnings[2]]  # once per budget and period
    error = r.json()["error"]
    assert error["code"] == "insufficient_quota" and error["type"] == "insufficient_quota"
    assert error["message"].startswith(
        "the budget of key 'team-a' of $0.05 per day would be exceeded: spent $0.0390, reserved by "
        "calls in flight $0.00, this call needs up to $0.0240; it resets at 2025-01-02T00:00:00Z."
    )
    assert r.headers["x-lamina-budget-reset"] == "2025-01-02T00:00:00Z"
    assert len(gw.ledger()) == 3
    assert gw.spend(budget, gw.clock()) == pytest.approx((3 * PLAIN_COST, 0.0))
    gw.clock.advance(days=1)  # a new period
    assert (await gw.chat(PLAIN, max_tokens=2)).status_code == 200


@pytest.mark.anyio
@pytest.mark.parametrize(
    "gw", [CONFIG.model_copy(update={"budget_usd": 0.03, "budget_period": "month"})], indirect=True
)
async def test_the_gateway_budget_applies_to_every_key(gw: Gateway) -> None:
    assert (await gw.chat(PLAIN, max_tokens=2)).status_code == 200
    gw.auth.principal = TEAM  # another key: charged to its own budget and to the gateway's
    r = await gw.chat(PLAIN, max_tokens=2)
    assert r.status_code == 429
    assert r.json()["error"]["message"].startswith("the gateway's budget of $0.03 per month")
    assert "resets at 2025-02-01T00:00:00Z" in r.json()["error"]["message"]
    # the key's hold, taken first, went back with the refusal
    assert gw.spend(gw.policy.budgets(TEAM)[0], gw.clock()) == (0.0, 0.0)


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
async def test_a_failed_call_releases_its_reservation_and_costs_nothing(gw: Gateway, stream: bool) -> None:
    gw.auth.principal = TEAM
    budget = gw.policy.budgets(TEAM)[0]
    gw.dispatcher.error = NoReadyReplicaError("no replica of no-stream-model is ready; wait for it")
    r = await gw.chat(CHAT, stream=stream)
    assert r.status_code == 503
    gw.dispatcher.error = None
    gw.dispatcher.reply = lambda _path, _body: httpx.Response(
        500, json={"error": {"message": "boom", "type": "server_error", "code": "engine_error"}}
    )
    assert (await gw.chat(CHAT, stream=stream)).status_code == 500
    assert gw.spend(budget, gw.clock()) == (0.0, 0.0)
    assert gw.ledger() == []


def test_a_key_with_an_unknown_period_is_a_clear_error() -> None:
    policy = CostPolicy(Store("sqlite://"), CONFIG, HOURLY)
    odd = Principal(key_id="k", name="odd", scope="user", budget_usd=1.0, budget_period="fortnight")
    with pytest.raises(Exception, match="budget period 'fortnight'; set day, week or month"):
        policy.budgets(odd)


@pytest.mark.parametrize(
    ("period", "now", "start", "end"),
    [
        ("day", datetime(2025, 3, 9, 23, 59, tzinfo=UTC), datetime(2025, 3, 9), datetime(2025, 3, 10)),
        ("week", datetime(2025, 3, 9, 12, tzinfo=UTC), datetime(2025, 3, 3), datetime(2025, 3, 10)),
        ("month", datetime(2025, 12, 31, 23, tzinfo=UTC), datetime(2025, 12, 1), datetime(2026, 1, 1)),
        ("month", datetime(2024, 2, 29, tzinfo=UTC), datetime(2024, 2, 1), datetime(2024, 3, 1)),
    ],
)
def test_budget_periods_are_utc_days_weeks_from_monday_and_months(
    tmp_path: Path, period: str, now: datetime, start: datetime, end: datetime
) -> None:
    store = Store(f"sqlite:///{tmp_path / 'lamina.db'}")
    store.migrate()
    [hold] = CostLedger(store).reserve([Budget("global", "the gateway's budget", 1.0, period)], 5, now)
    assert (hold.period_start, hold.resets) == (start.replace(tzinfo=UTC), end.replace(tzinfo=UTC))
    assert (hold.spent_nusd, hold.reserved_nusd) == (0, 5)
    store.close()


@pytest.mark.anyio
@pytest.mark.parametrize("when", ["queued", "being-written"])
async def test_a_call_that_leaves_while_its_hold_is_taken_gives_it_back(tmp_path: Path, when: str) -> None:
    store = Store(f"sqlite:///{tmp_path / 'lamina.db'}")
    store.migrate()
    policy = CostPolicy(store, CONFIG, HOURLY, clock=FakeClock())
    leaving = Call(TEAM, "chat", PLAIN, PLAIN, None, {}, False, 20, 2)
    blocker = sqlite3.connect(tmp_path / "lamina.db", isolation_level=None)
    try:
        if when == "being-written":  # the writer's transaction waits for this one's lock
            blocker.execute("BEGIN IMMEDIATE")
        admitting = asyncio.ensure_future(policy.admit(leaving))
        await asyncio.sleep(0.3 if when == "being-written" else 0)
        admitting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await admitting
        if blocker.in_transaction:
            blocker.execute("ROLLBACK")
        assert policy.flush() and policy.flush()  # the give-back is submitted when the late hold comes in
        assert policy.ledger.spend(policy.budgets(TEAM)[0], T0) == (0.0, 0.0)
    finally:
        blocker.close()
        policy.close()
        store.close()


def test_costs_since_takes_a_duration_or_an_iso_time() -> None:
    assert since_of("7d", T0) == T0 - timedelta(days=7)
    assert since_of("2024-12-31", T0) == datetime(2024, 12, 31, tzinfo=UTC)
    assert since_of("2024-12-31T12:00:00+02:00", T0) == datetime(2024, 12, 31, 10, tzinfo=UTC)
    with pytest.raises(InvalidRequestError, match="cannot read --since 'last week': give a duration such as"):
        since_of("last week", T0, "--since")


def test_a_batch_of_settlements_writes_its_ledger_rows_in_a_few_statements(tmp_path: Path) -> None:
    """Row by row, each INSERT let go of the GIL and waited for it again: a busy gateway's writer fell
    behind and its queue grew without end. 300 rows are 256 + 32 + 8 + 4: four statements."""
    store = Store(f"sqlite:///{tmp_path / 'lamina.db'}")
    store.migrate()
    ledger = CostLedger(store)
    budget = Budget("global", "the gateway's budget", 1.0, "day")
    holds = [ledger.reserve([budget], 10, T0)[0] for _ in range(300)]
    entry = LedgerEntry(T0, None, None, "team", "chat", PLAIN, PLAIN, None, None, 9, 2, None, 7e-9, "tokens")
    inserts: list[bool] = []  # executemany or not, per INSERT into the ledger

    def seen(_c: object, _cur: object, sql: str, _p: object, _ctx: object, many: bool) -> None:
        if sql.startswith('INSERT INTO "cost_ledger"'):
            inserts.append(many)

    sqlalchemy.event.listen(store.engine, "before_cursor_execute", seen)
    ledger.apply([Settlement([hold], 7, entry) for hold in holds])
    assert inserts == [False] * 4
    assert ledger.spend(budget, T0) == (300 * 7 / 1e9, 0.0)
    with store.engine.connect() as conn:
        assert conn.execute(select(sqlalchemy.func.count()).select_from(cost_ledger)).scalar() == 300
    store.close()


@pytest.mark.anyio
async def test_admission_waits_while_the_ledger_writer_is_too_far_behind(tmp_path: Path) -> None:
    """A store slower than the calls holds calls back at admission; nothing queued is lost."""
    store = Store(f"sqlite:///{tmp_path / 'lamina.db'}")
    store.migrate()
    writer = LedgerWriter(CostLedger(store), linger_s=0.0, max_backlog=3)
    entry = LedgerEntry(T0, None, None, "team", "chat", PLAIN, PLAIN, None, None, 9, 2, None, 7e-9, "tokens")
    blocker = sqlite3.connect(tmp_path / "lamina.db", isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # the writer's first batch waits for this lock
        for _ in range(5):
            writer.settle([], 0, entry)
        assert writer.backlog == 5
        with pytest.raises(UnavailableError, match="5 changes behind") as refused:
            await writer.room(wait_s=0.2)  # a store that does not come back: a 503, not a hang
        assert refused.value.headers["Retry-After"] == "5"
        waiting = asyncio.ensure_future(writer.room())
        await asyncio.sleep(0.3)
        assert not waiting.done()
        blocker.execute("ROLLBACK")
        await asyncio.wait_for(waiting, 30)
        assert writer.flush() and writer.backlog == 0
        with store.engine.connect() as conn:
            assert conn.execute(select(sqlalchemy.func.count()).select_from(cost_ledger)).scalar() == 5
    finally:
        blocker.close()
        writer.close()
        store.close()


@pytest.mark.parametrize(
    ("nusd", "text"),
    [
        (0, "$0.00"),
        (44_910, "$0.000045"),  # a self-hosted call: two significant digits, never $0.0000
        (1_000, "$0.0000010"),
        (1_000_000, "$0.0010"),
        (50_000_000, "$0.05"),  # whole cents, as budgets are set
        (1_234_567_890, "$1.2346"),
        (12_345_000_000, "$12.35"),
    ],
)
def test_money_in_messages_shows_what_a_small_amount_is(nusd: int, text: str) -> None:
    assert usd_text(nusd) == text
