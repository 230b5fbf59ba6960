"""Budget leases: a gateway process holds a slice of each large budget it charges, so that most calls are
admitted in memory and the metadata store sees one transaction per slice instead of one per call.

A lease is reserved in the store exactly as a call's hold is (``budget_spend.reserved_nusd``, by the same
conditional UPDATE), so every process's leases and holds together never pass a limit: exactness does not
depend on leases. In memory, a call's hold comes out of its process's lease, refilled from the store when it
runs short, and its settlement charges the lease (the spend grows, the lease shrinks by what the call cost).

Leases pay only where a budget is large next to one call. While the store said, at the last refill, that the
budget has room for at least ``LEASE_ROOM`` calls like this one, a refill takes up to ``LEASE_CALLS`` calls'
worth beyond what is short (never more than an eighth of the room); nearer the limit a call takes exactly what
it needs, and what is left of a lease goes back as its calls settle, so an idle slice in one process cannot
keep another process's call out. A lease no call holds goes back after ``idle_s``; at shutdown every unused
slice does. A process that dies keeps its lease reserved until the period ends, as it keeps the holds of its
calls in flight: at most ``LEASE_CALLS`` calls' worth per budget.

Everything here runs on the event loop's thread (no locks besides the refill's ``asyncio.Lock``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from lamina.application._budgets import Budget, Hold, LedgerEntry, period_window, usd_to_nano
from lamina.application._ledger_writer import LedgerWriter

#: a refill takes up to this many calls' worth beyond what is short ...
LEASE_CALLS = 64
#: ... while the budget has room for at least this many such calls
LEASE_ROOM = 256


@dataclass
class _Lease:
    """This process's slice of one budget in one period, and the budget as last seen."""

    budget: Budget
    period_start: datetime
    resets: datetime
    #: reserved in the store for this process and not yet charged
    granted: int = 0
    #: of which calls in flight hold (never more than ``granted``)
    held: int = 0
    #: the budget's spend as last seen: the store's at the last refill, plus what settled here since
    spent: int = 0
    #: reserved by others (calls and leases of other processes) at the last refill
    others: int = 0
    #: limit - spend - reservations at the last refill; None before the first
    room: int | None = None
    refill: asyncio.Lock = field(default_factory=asyncio.Lock)
    idle: asyncio.TimerHandle | None = None

    @property
    def key(self) -> tuple[str, datetime]:
        return (self.budget.scope, self.period_start)

    @property
    def free(self) -> int:
        return self.granted - self.held

    def hold(self, nusd: int) -> Hold:
        """``nusd`` of the lease for one call; the hold carries the budget's use as this process sees it."""
        self.held += nusd
        return Hold(self.budget, self.period_start, self.resets, nusd, self.spent, self.others + self.held)

    def spare(self, nusd: int) -> int:
        """What a refill takes beyond what is short, for calls of ``nusd``: 0 near the limit."""
        room = self.room if self.room is not None else usd_to_nano(self.budget.limit_usd)
        if nusd <= 0 or room < LEASE_ROOM * nusd:
            return 0
        return min(LEASE_CALLS * nusd, room // 8)


class BudgetLeases:
    """Holds and settlements of calls against budgets, through per-process leases (see the module)."""

    def __init__(self, writer: LedgerWriter, idle_s: float = 1.0) -> None:
        self._writer = writer
        self._idle_s = idle_s
        self._leases: dict[tuple[str, datetime], _Lease] = {}

    async def take(self, budgets: Sequence[Budget], nusd: int, now: datetime) -> list[Hold]:
        """Hold ``nusd`` against every budget, all or none: BudgetExceededError names the first it would
        pass."""
        holds: list[Hold] = []
        try:
            for budget in budgets:
                holds.append(await self._take(budget, nusd, now))
        except BaseException:
            self.settle(holds, None, None)
            raise
        return holds

    async def _take(self, budget: Budget, nusd: int, now: datetime) -> Hold:
        lease = self._lease(budget, now)
        if lease.idle is not None:
            lease.idle.cancel()
            lease.idle = None
        if lease.free >= nusd and not lease.refill.locked():
            return lease.hold(nusd)
        async with lease.refill:
            mine = min(lease.free, nusd)
            lease.held += mine  # what this call counts on stays its own while it waits for the store
            try:
                await self._refill(lease, nusd - mine, lease.spare(nusd), now)
            finally:
                lease.held -= mine
            return lease.hold(nusd)

    async def _refill(self, lease: _Lease, short: int, spare: int, now: datetime) -> None:
        if short <= 0:
            return
        for amount in (short + spare, short) if spare else (short,):
            unused = {lease.budget.scope: lease.free}
            try:
                [got] = await self._writer.reserve([lease.budget], amount, now, unused)
            except Exception:
                if amount == short:
                    raise
                continue  # the spare slice does not fit: ask for what is short alone
            lease.granted += amount
            lease.spent, lease.others = got.spent_nusd, max(0, got.reserved_nusd - lease.granted)
            lease.room = usd_to_nano(lease.budget.limit_usd) - got.spent_nusd - got.reserved_nusd
            return

    def settle(self, holds: Sequence[Hold], cost_nusd: int | None, entry: LedgerEntry | None) -> None:
        """Charge ``cost_nusd`` for a call in place of its holds and write its ledger row (None: the call
        cost nothing, its holds go back to the leases)."""
        changes: list[Hold] = []
        for hold in holds:
            lease = self._leases.get((hold.budget.scope, hold.period_start))
            if lease is None:  # the lease went back already (shutdown): charge the store as held
                changes.append(hold)
                continue
            lease.held -= hold.nusd
            taken = 0
            if cost_nusd is not None:
                taken = min(cost_nusd, lease.granted)
                lease.granted -= taken
                lease.spent += cost_nusd
            if lease.spare(hold.nusd) == 0:  # near the limit: an unused slice goes back at once
                taken += lease.free
                lease.granted = lease.held
            if taken or cost_nusd is not None:
                changes.append(replace(hold, nusd=taken))
            if lease.held == 0:
                self._when_idle(lease)
        if changes or entry is not None:
            self._writer.settle(changes, cost_nusd or 0, entry)

    def give_back(self) -> None:
        """Every lease's unused slice back to the store now (at shutdown; a flush before reading spend)."""
        for lease in list(self._leases.values()):
            self._give_back(lease)

    def _lease(self, budget: Budget, now: datetime) -> _Lease:
        start, resets = period_window(budget.period, now)
        lease = self._leases.get((budget.scope, start))
        if lease is None or lease.budget != budget:
            if lease is not None:  # the budget changed (a key's limit): the old slice goes back
                self._give_back(lease)
            lease = self._leases[(budget.scope, start)] = _Lease(budget, start, resets)
        return lease

    def _when_idle(self, lease: _Lease) -> None:
        with contextlib.suppress(RuntimeError):  # no running loop: the next flush gives it back
            loop = asyncio.get_running_loop()
            if lease.idle is not None:
                lease.idle.cancel()
            lease.idle = loop.call_later(self._idle_s, self._give_back_if_idle, lease)

    def _give_back_if_idle(self, lease: _Lease) -> None:
        lease.idle = None
        if lease.held == 0 and not lease.refill.locked():
            self._give_back(lease)

    def _give_back(self, lease: _Lease) -> None:
        if lease.refill.locked():
            return  # a refill is under way: what it brings is for the call that asked
        unused, lease.granted = lease.free, lease.held
        if unused:
            self._writer.settle([Hold(lease.budget, lease.period_start, lease.resets, unused, 0, 0)], 0, None)
        if lease.held == 0 and self._leases.get(lease.key) is lease:
            del self._leases[lease.key]
