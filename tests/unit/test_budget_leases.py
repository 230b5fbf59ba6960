"""Budget leases: most holds come out of the process's lease (few store transactions), two processes
sharing a budget never spend past it, and an idle lease goes back to the store."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest

from lamina.application._budget_leases import LEASE_CALLS, BudgetLeases
from lamina.application._budgets import Budget, CostLedger, Hold
from lamina.application._ledger_writer import LedgerWriter
from lamina.errors import BudgetExceededError
from lamina.store import Store

NOW = datetime(2025, 1, 1, 12, tzinfo=UTC)
NANO = 1_000_000_000


class CountingWriter(LedgerWriter):
    """The real writer, counting the reservations that reach the store."""

    reservations = 0

    async def reserve(self, *args: object, **kwargs: object) -> list[Hold]:
        self.reservations += 1
        return await super().reserve(*args, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'lamina.db'}")
    store.migrate()
    return store


def _leases(store: Store, idle_s: float = 30.0) -> tuple[BudgetLeases, CountingWriter, CostLedger]:
    ledger = CostLedger(store)
    writer = CountingWriter(ledger)
    return BudgetLeases(writer, idle_s=idle_s), writer, ledger


@pytest.mark.anyio
async def test_a_large_budget_is_held_from_the_lease_with_few_store_transactions(store: Store) -> None:
    budget = Budget("global", "the gateway's budget", 1000.0, "day")
    leases, writer, ledger = _leases(store)
    try:
        for _ in range(200):  # each holds 1 micro-USD and costs half of it
            [hold] = await leases.take([budget], 1000, NOW)
            leases.settle([hold], 500, None)
        assert writer.reservations <= 200 // LEASE_CALLS + 1
        leases.give_back()
        assert writer.flush()
        spent, reserved = ledger.spend(budget, NOW)
        assert (round(spent * NANO), reserved) == (200 * 500, 0.0)
    finally:
        writer.close()
        store.close()


@pytest.mark.anyio
async def test_two_processes_with_leases_never_spend_past_the_budget(store: Store) -> None:
    """1,200 concurrent calls through two lease holders (two store handles, two writer threads) on a budget
    with room for 1,000: every admitted call is paid within it, and no more than a few slices are left out."""
    budget = Budget("global", "the gateway's budget", 1000 * 1000 / NANO, "day")
    second = Store(store.url)
    pairs = [_leases(store), _leases(second)]

    async def one(i: int) -> bool:
        leases = pairs[i % 2][0]
        try:
            holds = await leases.take([budget], 1000, NOW)
        except BudgetExceededError:
            return False
        await asyncio.sleep(0.001 * (i % 7))
        leases.settle(holds, 1000, None)
        return True

    try:
        admitted = sum(await asyncio.gather(*(one(i) for i in range(1200))))
        for leases, writer, _ in pairs:
            leases.give_back()
            assert writer.flush()
        spent, reserved = pairs[0][2].spend(budget, NOW)
        assert round(spent * NANO) == admitted * 1000 <= 1000 * 1000
        assert reserved == 0.0
        assert admitted >= 1000 - 2  # near the limit calls take exactly what they need: little is stranded
    finally:
        for _, writer, _ in pairs:
            writer.close()
        second.close()
        store.close()


@pytest.mark.anyio
async def test_an_idle_lease_goes_back_and_a_refused_call_names_what_others_hold(store: Store) -> None:
    budget = Budget("key:k", "the budget of key 'k'", 1.0, "day")
    leases, writer, ledger = _leases(store, idle_s=0.05)
    try:
        [hold] = await leases.take([budget], 1000, NOW)
        leases.settle([hold], 1000, None)
        assert writer.flush()
        assert ledger.spend(budget, NOW)[1] > 0  # the rest of the slice is still leased
        await asyncio.sleep(0.2)
        assert writer.flush()
        spent, reserved = ledger.spend(budget, NOW)
        assert (round(spent * NANO), reserved) == (1000, 0.0)
        counted_out = r"spent \$0\.0000010, reserved by calls in flight \$0\.00,"
        with pytest.raises(BudgetExceededError, match=counted_out):
            await leases.take([budget], NANO, NOW)  # more than the budget: refused, the lease counted out
    finally:
        writer.close()
        store.close()
