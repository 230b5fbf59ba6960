"""Cost: what each model call costs, reported on its answer, charged to budgets and written to the ledger.

A model with a token price (``costs.models``: a remote upstream, or a self-hosted model billed per token)
costs its prompt and completion tokens at those prices (basis ``tokens``). Any other model costs the
compute it used (basis ``compute``): the replica's busy time for the call (``Usage.engine_s``, its share
of the batches the call rode in) times the hourly price of one replica's devices, which the composition
root works out per deployment from its cores and GPUs (:func:`replica_hourly_usd`).

At admission :class:`CostPolicy` reserves an upper bound of the cost against the key's budget and the
gateway's: the request's prompt (as estimated) and max_tokens at the token prices, or for compute that
many tokens at a conservative tokens per second of the deployment. Settling replaces the reservation
with the actual cost (see ``_budgets``). Holds come out of this process's lease of each budget
(``_budget_leases``), so most admissions touch no database; with no budget in play none does. The store is
written by one :class:`LedgerWriter` thread per policy, in batches; an answer never waits for it, and a
call waits at admission only while the writer is 10,000 changes behind (the store slower than the calls),
at most 10 s before a 503.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from lamina.application._budget_leases import BudgetLeases
from lamina.application._budgets import (
    NANO,
    Budget,
    CostLedger,
    Hold,
    LedgerEntry,
    usd_text,
    usd_to_nano,
)
from lamina.application._ledger_writer import LedgerWriter
from lamina.application._policy import Call, Principal, Usage
from lamina.clock import Clock, utcnow
from lamina.config import CostsConfig
from lamina.errors import ConfigError
from lamina.observability import OpenTrace
from lamina.store import Store

log = logging.getLogger("lamina.costs")

Basis = Literal["compute", "tokens"]
PERIODS = ("day", "week", "month")
COST_HEADER = "x-lamina-cost-usd"
WARNING_HEADER = "x-lamina-budget-warning"


@dataclass(frozen=True)
class TokenPrice:
    input_per_million: float
    output_per_million: float

    def usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_million + completion_tokens * self.output_per_million) / 1e6


@dataclass(frozen=True)
class Cost:
    """What one call cost, as its answer reports it (``usage.cost``)."""

    usd: float
    basis: Basis
    #: the replica's compute seconds for the call; None when it did not report them
    engine_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"usd": round(self.usd, 12), "basis": self.basis, "engine_s": self.engine_s}

    def header(self) -> str:
        """The USD as plain decimals (no exponent), to the pico-dollar: ``0.004``, ``0.000000154793``."""
        text = f"{self.usd:.12f}".rstrip("0")
        return text + "0" if text.endswith(".") else text


def gpu_hour_usd(config: CostsConfig, gpu_name: str) -> float | None:
    """The configured hourly price of a GPU by the name NVML gives it: the exact key, else the longest key
    the name contains (case-insensitive: ``H100`` prices ``NVIDIA H100 80GB HBM3``); None if none fits."""
    if gpu_name in config.gpu_hour_usd:
        return config.gpu_hour_usd[gpu_name]
    fits = [key for key in config.gpu_hour_usd if key.lower() in gpu_name.lower()]
    return config.gpu_hour_usd[max(fits, key=len)] if fits else None


def replica_hourly_usd(config: CostsConfig, cpus: float, gpu_prices: Sequence[float] = ()) -> float:
    """USD per hour of one replica's devices: its CPU cores (llama.cpp threads) and its GPUs."""
    return cpus * config.cpu_core_hour_usd + sum(gpu_prices)


class Prices:
    """The price of calls to each deployment: ``config`` and the hourly USD of one replica of each
    deployment (one CPU core's price for a deployment not in ``hourly_usd``)."""

    def __init__(self, config: CostsConfig, hourly_usd: Mapping[str, float]) -> None:
        self._config = config
        self._hourly = dict(hourly_usd)
        self._tokens = {
            name: TokenPrice(p.input_per_million, p.output_per_million) for name, p in config.models.items()
        }

    def token_price(self, call: Call) -> TokenPrice | None:
        """The token price of the deployment, else of the model name asked for (without ``@version``)."""
        price = self._tokens.get(call.deployment)
        return price if price is not None else self._tokens.get(call.model.partition("@")[0])

    def hourly_usd(self, deployment: str) -> float:
        return self._hourly.get(deployment, self._config.cpu_core_hour_usd)

    def tokens_per_second(self, deployment: str) -> float:
        return self._config.tokens_per_second.get(deployment, self._config.default_tokens_per_second)

    def estimate(self, call: Call) -> float:
        """An upper bound of the call's cost in USD, before it runs."""
        price = self.token_price(call)
        if price is not None:
            return price.usd(call.prompt_tokens, call.completion_tokens)
        seconds = call.reserved_tokens / self.tokens_per_second(call.deployment)
        return seconds * self.hourly_usd(call.deployment) / 3600

    def cost(self, call: Call, usage: Usage) -> Cost:
        """What the call cost, from what its replica reported; compute time the replica did not report is
        estimated from the tokens it did, at the deployment's conservative rate."""
        price = self.token_price(call)
        if price is not None:
            return Cost(price.usd(usage.prompt_tokens, usage.completion_tokens), "tokens", usage.engine_s)
        seconds = usage.engine_s
        if seconds is None:
            seconds = usage.total_tokens / self.tokens_per_second(call.deployment)
        return Cost(seconds * self.hourly_usd(call.deployment) / 3600, "compute", usage.engine_s)


@dataclass(frozen=True)
class _CostTicket:
    policy: CostPolicy
    holds: Sequence[Hold]

    async def settle(self, call: Call, usage: Usage | None) -> None:
        await self.policy.settle(call, usage, self.holds)


class CostPolicy:
    """Prices every call, holds its expected cost against the budgets that apply (refusing it with a 429
    ``insufficient_quota`` when a budget would be passed), reports its cost (``x-lamina-cost-usd`` and
    ``usage.cost``) and writes it to the ledger."""

    #: its span in the request's trace
    step = "budgets"

    def __init__(
        self,
        store: Store,
        config: CostsConfig,
        hourly_usd: Mapping[str, float],
        clock: Clock = utcnow,
    ) -> None:
        self.prices = Prices(config, hourly_usd)
        self.ledger = CostLedger(store)
        self.writer = LedgerWriter(self.ledger)
        self.leases = BudgetLeases(self.writer)
        self._soft = config.soft_fraction
        self._clock = clock
        self._global = (
            None
            if config.budget_usd is None
            else Budget("global", "the gateway's budget", config.budget_usd, config.budget_period)
        )
        #: budget scope -> the period it was last logged as over its soft limit (once per period)
        self._warned: dict[str, datetime] = {}

    def budgets(self, principal: Principal) -> list[Budget]:
        """The budgets a call of ``principal`` is charged to: its key's, then the gateway's."""
        budgets = [] if self._global is None else [self._global]
        if principal.budget_usd is None:
            return budgets
        period = principal.budget_period or "month"
        if period not in PERIODS:
            raise ConfigError(
                f"the key {principal.name!r} has the budget period {period!r}; set day, week or month "
                "(`lamina keys`)"
            )
        scope = f"key:{principal.key_id or principal.name}"
        key = Budget(scope, f"the budget of key {principal.name!r}", principal.budget_usd, period)
        return [key, *budgets]

    async def admit(self, call: Call) -> _CostTicket:
        await self.writer.room()  # every call writes a ledger row: none is let in past the writer's backlog
        budgets = self.budgets(call.principal)
        if not budgets:
            return _CostTicket(self, ())
        need = usd_to_nano(self.prices.estimate(call), up=True)
        holds = await self.leases.take(budgets, need, self._clock())
        warnings = [self._warning(h) for h in holds if h.used_fraction >= self._soft]
        if warnings:
            call.headers[WARNING_HEADER] = "; ".join(warnings)
        return _CostTicket(self, holds)

    def _warning(self, hold: Hold) -> str:
        budget = hold.budget
        text = (
            f"{budget.label} is {hold.used_fraction:.0%} used ({usd_text(hold.spent_nusd)} spent, "
            f"{usd_text(hold.reserved_nusd)} reserved, of {usd_text(usd_to_nano(budget.limit_usd))} per "
            f"{budget.period}); "
            f"it resets at {hold.resets:%Y-%m-%dT%H:%M:%SZ}"
        )
        if self._warned.get(budget.scope) != hold.period_start:
            self._warned[budget.scope] = hold.period_start
            log.warning("%s", text)
        return text.encode("ascii", "backslashreplace").decode()  # header values are Latin-1

    async def settle(self, call: Call, usage: Usage | None, holds: Sequence[Hold]) -> None:
        """Charge ``usage``'s cost in place of the holds and write the ledger row; None releases the holds."""
        if usage is None:
            self.leases.settle(holds, None, None)
            return
        cost = self.prices.cost(call, usage)
        call.headers[COST_HEADER] = cost.header()
        call.usage_extra["cost"] = cost.to_json()
        charged = usd_to_nano(cost.usd)
        if any(charged > h.nusd for h in holds):
            log.warning(
                "a call to %s cost $%.9f, more than the $%.9f reserved for it; lower "
                "costs.tokens_per_second[%r] so that budgets hold",
                call.deployment,
                cost.usd,
                min(h.nusd for h in holds) / NANO,
                call.deployment,
            )
        self.leases.settle(holds, charged, self._entry(call, usage, cost))

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Give back the unused leases and wait until every reservation and settlement so far is in the
        store (on the event loop's thread, or once it stopped)."""
        self.leases.give_back()
        return self.writer.flush(timeout_s)

    def close(self) -> None:
        """Give back the unused leases, write what is queued and stop the writer thread."""
        self.leases.give_back()
        self.writer.close()

    async def aclose(self) -> None:
        """``close``, the writer's part off the event loop (the composition root calls it at shutdown)."""
        self.leases.give_back()
        await asyncio.to_thread(self.writer.close)

    def _entry(self, call: Call, usage: Usage, cost: Cost) -> LedgerEntry:
        return LedgerEntry(
            ts=self._clock(),
            trace_id=_trace_id(call.span),
            key_id=call.principal.key_id,
            key_name=call.principal.name,
            operation=call.operation,
            model=call.model,
            deployment=call.deployment,
            model_version=call.model_version,
            replica=usage.replica,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            engine_s=usage.engine_s,
            cost_usd=cost.usd,
            basis=cost.basis,
        )


def _trace_id(span: Any) -> str | None:
    """The trace id of ``span`` in hex, None for an invalid span; a recorded span's from its trace (no
    ``SpanContext`` made for it)."""
    opened = getattr(span, "trace", None)
    if isinstance(opened, OpenTrace):
        trace_id: int = opened.trace_id
    else:
        context = span.get_span_context()
        trace_id = context.trace_id if context.is_valid else 0
    return format(trace_id, "032x") if trace_id else None
