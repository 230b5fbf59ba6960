"""Budgets hold under concurrency: threads racing on one store (SQLite and PostgreSQL), two Store handles
on one SQLite file (as two gateway processes have), and a real `lamina up` taking 100 concurrent requests
against a budget; then `lamina costs` reads what the gateway wrote."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from typer.testing import CliRunner

from lamina.application import ANONYMOUS, Budget, Call, CostLedger, CostPolicy, LedgerEntry, Usage
from lamina.cli._costs import costs
from lamina.config import CostsConfig, ModelPriceConfig
from lamina.errors import BudgetExceededError
from lamina.store import Store
from tests.support import RunningStack, start_stack, stop_stack

NOW = datetime(2025, 6, 15, 12, tzinfo=UTC)
GLOBAL = Budget("global", "the gateway's budget", 1.0, "day")
CALLS = 100


def race(ledgers: list[CostLedger], reserve_nusd: int, spend_nusd: int) -> int:
    """CALLS threads, spread over ``ledgers``, each reserving and then settling one call at once; how many
    were admitted."""
    start = threading.Barrier(CALLS)

    def one(i: int) -> bool:
        ledger = ledgers[i % len(ledgers)]
        start.wait()
        try:
            holds = ledger.reserve([GLOBAL], reserve_nusd, NOW)
        except BudgetExceededError:
            return False
        ledger.settle(holds, spend_nusd, None)
        return True

    with ThreadPoolExecutor(CALLS) as pool:
        return sum(pool.map(one, range(CALLS)))


@pytest.mark.parametrize(
    ("reserve", "spend"),
    [(26_000_000, 26_000_000), (26_000_000, 13_000_000)],
    ids=["spend-as-reserved", "spend-half"],
)
def test_racing_calls_never_spend_past_the_budget(store: Store, reserve: int, spend: int) -> None:
    ledger = CostLedger(store)
    admitted = race([ledger], reserve, spend)
    spent, reserved = ledger.spend(GLOBAL, NOW)
    assert reserved == 0
    assert spent <= GLOBAL.limit_usd
    assert spent == pytest.approx(admitted * spend / 1e9)
    if spend == reserve:  # every call spends what it held: exactly as many as fit
        assert admitted == 38 and spent == pytest.approx(0.988)
    else:  # a hold is half unused: as many fit at least, and what comes back serves later calls
        assert admitted >= 38


def test_two_store_handles_on_one_sqlite_file_share_one_budget(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lamina.db'}"
    first, second = Store(url), Store(url)
    first.migrate()
    try:
        ledgers = [CostLedger(first), CostLedger(second)]
        assert race(ledgers, 26_000_000, 26_000_000) == 38
        for ledger in ledgers:
            assert ledger.spend(GLOBAL, NOW) == pytest.approx((0.988, 0.0))
    finally:
        first.close()
        second.close()


@pytest.mark.anyio
async def test_two_gateways_admit_100_concurrent_calls_within_one_budget(store: Store) -> None:
    """Two policies, each with its own Store handle and writer thread, as two gateway processes have."""
    config = CostsConfig(
        models={"m": ModelPriceConfig(input_per_million=0, output_per_million=1000)},
        budget_usd=0.15,
        budget_period="day",
    )
    second = Store(store.url)
    policies = [CostPolicy(s, config, {}, clock=lambda: NOW) for s in (store, second)]

    async def one(i: int) -> bool:  # holds and spends $0.004: 4 output tokens at $0.001
        policy, call = policies[i % 2], Call(ANONYMOUS, "chat", "m", "m", None, {}, False, 10, 4)
        try:
            ticket = await policy.admit(call)
        except BudgetExceededError:
            return False
        await asyncio.sleep(0.01)  # the replica's work: the holds overlap
        await ticket.settle(call, Usage(10, 4, "r", 0.1))
        return True

    try:
        admitted = sum(await asyncio.gather(*(one(i) for i in range(CALLS))))
        assert all(policy.flush() for policy in policies)
        assert admitted == 37
        budget = policies[0].budgets(ANONYMOUS)[0]
        assert policies[1].ledger.spend(budget, NOW) == pytest.approx((0.148, 0.0))
        assert [line.requests for line in policies[0].ledger.summary("model", NOW)] == [37]
    finally:
        for policy in policies:
            policy.close()
        second.close()


def test_the_ledger_sums_by_key_model_and_day(store: Store) -> None:
    ledger = CostLedger(store)

    def entry(ts: datetime, key: str, deployment: str, usd: float) -> LedgerEntry:
        return LedgerEntry(
            ts, None, f"key_{key}", key, "chat", deployment, deployment, None, "r", 10, 5, 0.5, usd, "compute"
        )

    late = NOW.replace(hour=23, minute=59)  # still the 15th in UTC, whatever the server's zone
    for e in [
        entry(NOW, "a", "m1", 1.0),
        entry(late, "b", "m1", 2.0),
        entry(NOW + timedelta(days=1), "a", "m2", 4.0),
    ]:
        ledger.settle([], 0, e)
    since = NOW - timedelta(days=1)
    by_model = [(line.group, line.requests, line.cost_usd) for line in ledger.summary("model", since)]
    assert by_model == [("m2", 1, 4.0), ("m1", 2, 3.0)]
    by_key = [(line.group, line.prompt_tokens, line.engine_s) for line in ledger.summary("key", since)]
    assert by_key == [("a", 20, 1.0), ("b", 10, 0.5)]
    assert [(line.group, line.cost_usd) for line in ledger.summary("day", since)] == [
        ("2025-06-16", 4.0),
        ("2025-06-15", 3.0),
    ]
    assert ledger.summary("model", NOW + timedelta(hours=12)) == ledger.summary("model", since)[:1]


# --- a real stack ------------------------------------------------------------------------------------

#: `echo` costs $0.001 per output token; a call of max_tokens 4 on a long enough message holds and spends
#: $0.004, so 37 of them fit in $0.15; `metered` is priced by compute (the fake replica's 0.1 core)
CONFIG = """
register_bundled: false
deployments:
  - name: echo
    engine: fake
    fake: {mode: echo, seconds_per_token: 0.005}
  - name: metered
    engine: fake
    fake: {mode: echo, seconds_per_token: 0.02}
costs:
  models:
    echo: {input_per_million: 0, output_per_million: 1000}
  budget_usd: 0.15
  budget_period: day
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    running = start_stack(tmp_path_factory.mktemp("budgets"), CONFIG, timeout_s=120)
    yield running
    assert stop_stack(running) == []


def _chat(base: str, model: str, **extra: object) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "one two three four five six"}]}
    return httpx.post(f"{base}/v1/chat/completions", json={**body, **extra}, timeout=60)


@pytest.mark.slow
def test_100_concurrent_requests_stop_at_the_budget(stack: RunningStack) -> None:
    ask: Callable[[int], httpx.Response] = lambda _i: _chat(stack.base_url, "echo", max_tokens=4)  # noqa: E731
    with ThreadPoolExecutor(CALLS) as pool:
        answers = list(pool.map(ask, range(CALLS)))
    ok = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code != 200]
    assert len(ok) == 37, [r.text for r in refused[:1]]
    assert {r.status_code for r in refused} == {429}
    assert {r.json()["error"]["code"] for r in refused} == {"insufficient_quota"}
    assert "the gateway's budget of $0.15 per day would be exceeded" in refused[0].json()["error"]["message"]
    assert {r.json()["usage"]["cost"]["usd"] for r in ok} == {0.004}
    assert {r.headers["x-lamina-cost-usd"] for r in ok} == {"0.004"}
    warned = [r for r in ok if "x-lamina-budget-warning" in r.headers]
    assert warned and all("the gateway's budget is" in r.headers["x-lamina-budget-warning"] for r in warned)

    [echo] = _until(lambda: [g for g in _costs_json(stack, "--by", "model") if g["group"] == "echo"], 37)
    assert (echo["requests"], echo["completion_tokens"]) == (37, 148)
    assert echo["cost_usd"] == pytest.approx(0.148) and echo["cost_usd"] <= 0.15


@pytest.mark.slow
def test_a_compute_priced_answer_reports_the_replicas_compute_time(stack: RunningStack) -> None:
    r = _chat(stack.base_url, "metered", max_tokens=3)
    assert r.status_code == 200, r.text
    cost = r.json()["usage"]["cost"]
    assert cost["basis"] == "compute"
    assert 0.05 <= cost["engine_s"] < 5  # three tokens at 20 ms each
    # a fake replica holds 0.1 core at the default $0.089 a core-hour
    assert cost["usd"] == pytest.approx(cost["engine_s"] * 0.1 * 0.089 / 3600, rel=1e-3)
    assert float(r.headers["x-lamina-cost-usd"]) == pytest.approx(cost["usd"], abs=1e-9)
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    days = _until(lambda: _costs_json(stack, "--by", "day", "--since", since), 1)
    assert [d["group"] for d in days] == [f"{datetime.now(UTC):%Y-%m-%d}"]
    assert _costs_json(stack, "--by", "key")[0]["group"] == "anonymous"


def _costs_json(stack: RunningStack, *args: str) -> list[dict[str, Any]]:
    app = typer.Typer()
    app.command()(costs)
    result = CliRunner().invoke(app, [*args, "--json", "--state-dir", str(stack.state_dir)])
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert isinstance(body["groups"], list)
    return body["groups"]


def _until(read: Callable[[], list[dict[str, Any]]], requests: int) -> list[dict[str, Any]]:
    """``read()`` once the ledger holds ``requests`` calls: the gateway writes it just behind the answers."""
    deadline = time.monotonic() + 10
    while (not (groups := read()) or groups[0]["requests"] < requests) and time.monotonic() < deadline:
        time.sleep(0.05)
    return groups
