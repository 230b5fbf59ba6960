"""Budgets and the cost ledger in the metadata store, exact under concurrency and across gateway processes.

A budget's spend is one row per (scope, period start) of ``budget_spend``: what settled calls spent and
what calls in flight hold, in integer nano-USD (sums of floats drift; integers add exactly). Reserving is
one conditional UPDATE per budget, ``SET reserved = reserved + :n WHERE spent + reserved + :n <= :limit``,
the key's budget and then the gateway's in one transaction. The database serialises the writers of a row
(SQLite: one writer at a time, waiting on ``busy_timeout``; PostgreSQL: the row lock, after which the
WHERE is evaluated again on the row as it now is), so no interleaving of threads, processes or gateways
admits more than a limit. The rejected alternative, reading the spend and deciding in the gateway, lets
two gateways pass the same last dollar.

Settling replaces a call's reservation with its actual cost and writes its ledger row in the same
transaction. A call admitted in one period is charged to that period even if it ends in the next. Many
reservations and settlements go in one transaction (``CostLedger.apply``), in the order they came; on
PostgreSQL the batch first locks the budget rows it touches in one global order, so no two batches can
wait on each other in a cycle.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import ColumnElement, Connection, func, select, text

from lamina.errors import BudgetExceededError
from lamina.store import Store, cost_ledger, insert_rows

#: nano-USD per USD: budgets count in integers of this unit
NANO = 1_000_000_000
GroupBy = Literal["key", "model", "day"]


def usd_to_nano(usd: float, *, up: bool = False) -> int:
    """``usd`` in nano-USD, rounded up (a reservation: never less than the estimate) or to the nearest."""
    return math.ceil(usd * NANO - 1e-6) if up else round(usd * NANO)  # up, but not by float noise


def period_window(period: str, now: datetime) -> tuple[datetime, datetime]:
    """The UTC period (``day``, ``week`` from Monday, or ``month``) holding ``now``: its start and its end."""
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day, day + timedelta(days=1)
    if period == "week":
        start = day - timedelta(days=day.weekday())
        return start, start + timedelta(days=7)
    if period == "month":
        start = day.replace(day=1)
        return start, (start + timedelta(days=32)).replace(day=1)
    raise ValueError(f"unknown budget period {period!r}: use day, week or month")


@dataclass(frozen=True)
class Budget:
    """A spend limit: the gateway's (scope ``global``) or a key's (scope ``key:<id>``)."""

    scope: str
    #: for messages: "the gateway's budget", "the budget of key 'team-a'"
    label: str
    limit_usd: float
    period: str


@dataclass(frozen=True)
class Hold:
    """What one call holds against one budget, until it settles."""

    budget: Budget
    period_start: datetime
    resets: datetime
    nusd: int
    #: the budget's spend and reservations right after this hold was taken (this one included)
    spent_nusd: int
    reserved_nusd: int

    @property
    def used_fraction(self) -> float:
        limit = self.budget.limit_usd
        used = (self.spent_nusd + self.reserved_nusd) / NANO
        return used / limit if limit > 0 else 1.0


@dataclass(frozen=True)
class LedgerEntry:
    """One settled call, as ``cost_ledger`` keeps it."""

    ts: datetime
    trace_id: str | None
    key_id: str | None
    key_name: str
    operation: str
    model: str
    deployment: str
    model_version: str | None
    replica: str | None
    prompt_tokens: int
    completion_tokens: int
    engine_s: float | None
    cost_usd: float
    basis: str


@dataclass(frozen=True)
class CostLine:
    """Spend of one group of the ledger (a key, a model or a day)."""

    group: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    engine_s: float
    cost_usd: float

    def to_json(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "engine_s": round(self.engine_s, 6),
            "cost_usd": round(self.cost_usd, 9),
        }


def _epoch(moment: datetime) -> int:
    return int(moment.timestamp())


def usd_text(nusd: int) -> str:
    """Nano-dollars as money: cents from $10 or for whole cents, else at least 4 decimals and as many as
    show two significant digits (a self-hosted call costs fractions of a cent: $0.000045, not $0.0000)."""
    if nusd >= 10 * NANO or nusd % (NANO // 100) == 0:
        return f"${nusd / NANO:.2f}"
    decimals = min(9, max(4, 1 - math.floor(math.log10(nusd / NANO))))
    return f"${nusd / NANO:.{decimals}f}"


# Written once as SQL that SQLite (3.35+) and PostgreSQL both take: built per call, SQLAlchemy's statements
# cost more CPU than the database does for them.
_KEY = "scope = :scope AND period_start = :start"
_TAKE = text(
    f"UPDATE budget_spend SET reserved_nusd = reserved_nusd + :n WHERE {_KEY} "
    "AND spent_nusd + reserved_nusd + :n <= :limit RETURNING spent_nusd, reserved_nusd"
)
_CREATE = text(
    "INSERT INTO budget_spend (scope, period_start, spent_nusd, reserved_nusd) VALUES (:scope, :start, 0, 0) "
    "ON CONFLICT DO NOTHING"
)
_READ = text(f"SELECT spent_nusd, reserved_nusd FROM budget_spend WHERE {_KEY}")
_LOCK = text(f"SELECT 1 FROM budget_spend WHERE {_KEY} FOR UPDATE")
_CHARGE = text(
    f"UPDATE budget_spend SET spent_nusd = spent_nusd + :cost, reserved_nusd = reserved_nusd - :held "
    f"WHERE {_KEY}"
)


@dataclass(frozen=True)
class Reservation:
    """Hold ``nusd`` against every budget, all or none."""

    budgets: Sequence[Budget]
    nusd: int
    now: datetime
    #: what the asking process holds reserved and unused (its lease) per budget scope: a refusal's message
    #: counts it out of "reserved by calls in flight"
    unused: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Settlement:
    """Replace the holds with ``cost_nusd`` spent (0 and no entry: a release) and write the ledger row."""

    holds: Sequence[Hold]
    cost_nusd: int
    entry: LedgerEntry | None


Outcome = list[Hold] | BudgetExceededError


class CostLedger:
    """Budget reservations and the ledger of one metadata store. Every method blocks on the database: call
    it from a worker thread (the policy's :class:`LedgerWriter`), never on the event loop."""

    def __init__(self, store: Store) -> None:
        self._store = store
        #: budget rows known to exist (rows are never deleted): they need no INSERT ... ON CONFLICT
        self._known: set[tuple[str, int]] = set()

    def reserve(self, budgets: Sequence[Budget], nusd: int, now: datetime) -> list[Hold]:
        """Hold ``nusd`` against every budget, all or none; BudgetExceededError (429) names the first budget
        it would pass, with its spend, what is reserved and when the period resets."""
        [outcome] = self.apply([Reservation(budgets, nusd, now)])
        if isinstance(outcome, BudgetExceededError):
            raise outcome
        return outcome

    def settle(self, holds: Sequence[Hold], cost_nusd: int, entry: LedgerEntry | None) -> None:
        self.apply([Settlement(holds, cost_nusd, entry)])

    def apply(self, ops: Sequence[Reservation | Settlement]) -> list[Outcome]:
        """Apply ``ops`` in order in one transaction; the outcome of each reservation, in order.

        The budget rows the batch touches are created if missing and, on PostgreSQL, locked first, in one
        order (scope, period) that every gateway follows, so two batches never wait on each other in a
        cycle. SQLite has one writer at a time anyway."""
        rows: set[tuple[str, int]] = set()
        for op in ops:
            if isinstance(op, Reservation):
                rows |= {(b.scope, _epoch(period_window(b.period, op.now)[0])) for b in op.budgets}
            else:
                rows |= {(h.budget.scope, _epoch(h.period_start)) for h in op.holds}
        outcomes: list[Outcome] = []
        entries: list[dict[str, Any]] = []
        #: settlements add up per budget row between reservations: row -> [spent +, reserved -]
        charges: dict[tuple[str, int], list[int]] = {}
        with self._store.begin() as conn:
            lock = conn.dialect.name == "postgresql"
            for scope, start in sorted(rows):
                if (scope, start) not in self._known:
                    conn.execute(_CREATE, {"scope": scope, "start": start})
                if lock:
                    conn.execute(_LOCK, {"scope": scope, "start": start})
            for op in ops:
                if isinstance(op, Reservation):
                    self._charge(conn, charges)  # what settled before it is free for it
                    outcomes.append(self._hold_all(conn, op))
                    continue
                for hold in op.holds:
                    charge = charges.setdefault((hold.budget.scope, _epoch(hold.period_start)), [0, 0])
                    charge[0] += op.cost_nusd
                    charge[1] += hold.nusd
                if op.entry is not None:
                    entries.append(vars(op.entry))
            self._charge(conn, charges)
            if entries:
                insert_rows(conn, cost_ledger, entries)  # a few statements, not one per row
        self._known |= rows
        return outcomes

    def _hold_all(self, conn: Connection, op: Reservation) -> Outcome:
        holds: list[Hold] = []
        for budget in op.budgets:
            outcome = self._hold(conn, budget, op.nusd, op.now, op.unused.get(budget.scope, 0))
            if isinstance(outcome, BudgetExceededError):  # give back what this call took before
                self._charge(conn, {(h.budget.scope, _epoch(h.period_start)): [0, h.nusd] for h in holds})
                return outcome
            holds.append(outcome)
        return holds

    @staticmethod
    def _hold(
        conn: Connection, budget: Budget, nusd: int, now: datetime, unused: int = 0
    ) -> Hold | BudgetExceededError:
        start, resets = period_window(budget.period, now)
        limit = usd_to_nano(budget.limit_usd)
        key = {"scope": budget.scope, "start": _epoch(start)}
        row = conn.execute(_TAKE, {**key, "n": nusd, "limit": limit}).first()
        if row is not None:
            return Hold(budget, start, resets, nusd, row.spent_nusd, row.reserved_nusd)
        spent, reserved = conn.execute(_READ, key).one()
        reserved = max(0, reserved - unused)
        reset = f"{resets:%Y-%m-%dT%H:%M:%SZ}"
        return BudgetExceededError(
            f"{budget.label} of {usd_text(limit)} per {budget.period} would be exceeded: spent "
            f"{usd_text(spent)}, reserved by calls in flight {usd_text(reserved)}, this call needs up to "
            f"{usd_text(nusd)}; it resets at {reset}. Ask for a smaller max_tokens, wait for the reset, or "
            "raise the budget",
            headers={"x-lamina-budget-reset": reset},
            budget=budget.scope,
            limit_usd=budget.limit_usd,
            spent_usd=spent / NANO,
            reserved_usd=reserved / NANO,
            requested_usd=nusd / NANO,
            resets_at=reset,
        )

    @staticmethod
    def _charge(conn: Connection, charges: dict[tuple[str, int], list[int]]) -> None:
        for (scope, start), (cost, held) in charges.items():
            conn.execute(_CHARGE, {"scope": scope, "start": start, "cost": cost, "held": held})
        charges.clear()

    def spend(self, budget: Budget, now: datetime) -> tuple[float, float]:
        """(spent, reserved) USD of ``budget`` in the period holding ``now``."""
        start, _ = period_window(budget.period, now)
        with self._store.begin() as conn:
            row = conn.execute(_READ, {"scope": budget.scope, "start": _epoch(start)}).first()
        return (0.0, 0.0) if row is None else (row.spent_nusd / NANO, row.reserved_nusd / NANO)

    def summary(self, by: GroupBy, since: datetime) -> list[CostLine]:
        """Spend since ``since`` per key, model (the deployment that answered) or UTC day, costliest first
        (days: newest first)."""
        c = cost_ledger.c
        with self._store.begin() as conn:
            group: ColumnElement[Any]
            if by == "key":
                group = c.key_name
            elif by == "model":
                group = c.deployment
            elif conn.dialect.name == "postgresql":
                group = func.to_char(func.timezone("UTC", c.ts), "YYYY-MM-DD")
            else:  # SQLite keeps UTC text, 'YYYY-MM-DD HH:MM:SS...'
                group = func.substr(c.ts, 1, 10)
            cost = func.sum(c.cost_usd)
            rows = conn.execute(
                select(
                    group.label("group"),
                    func.count(),
                    func.sum(c.prompt_tokens),
                    func.sum(c.completion_tokens),
                    func.coalesce(func.sum(c.engine_s), 0.0),
                    cost,
                )
                .where(c.ts >= since)
                .group_by(group)
                .order_by(group.desc() if by == "day" else cost.desc(), group)
            ).all()
        return [
            CostLine(str(r[0]), int(r[1]), int(r[2] or 0), int(r[3] or 0), float(r[4]), float(r[5] or 0))
            for r in rows
        ]
