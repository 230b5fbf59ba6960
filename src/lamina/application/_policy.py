"""Policies: what the gateway checks and accounts for around each model call.

Who is calling is a :class:`Principal` (from the authenticator: a key with its scope, the models and
datasets it may use, its limits and budget). A call, once parsed and routed, is a :class:`Call`. Each
configured :class:`Policy` admits it before it is dispatched (raising a LaminaError refuses it: a 429 with
Retry-After, a 403, a 400...) and returns a :class:`Ticket`, or None when it has nothing to settle. Every
ticket is settled exactly once: with the :class:`Usage` the replica reported, or with None when the call
failed or the client left (reservations are released, nothing is charged). When a policy refuses, the
tickets taken before it are settled with None at once.

A settling ticket may add response headers and ``usage`` fields through the call (``x-lamina-cost-usd``
and ``usage.cost``); plain answers get both, a stream gets the usage fields in its final usage chunk.
Policies are built by the composition root and run in the order it gives (authentication is not one:
it runs first, for every route).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from opentelemetry import trace

log = logging.getLogger("lamina.policy")

Scope = Literal["admin", "user"]
#: completion tokens reserved at admission when the request names no max_tokens
DEFAULT_COMPLETION_RESERVE = 512


@dataclass(frozen=True)
class Principal:
    """Who a request comes from, as its key says."""

    #: the key's public id; None for an unauthenticated local gateway (no keys configured)
    key_id: str | None
    name: str
    scope: Scope
    #: public model names the key may call; None: all
    models: frozenset[str] | None = None
    #: datasets the key may retrieve from (``/v1/retrieve`` and RAG); None: all
    datasets: frozenset[str] | None = None
    #: requests and tokens per minute for this key; None: no per-key limit
    rpm: int | None = None
    tpm: int | None = None
    #: spend allowed per budget period, in USD, and the period (``day``, ``week``, ``month``...)
    budget_usd: float | None = None
    budget_period: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.scope == "admin"


#: the caller when the gateway has no keys (local use): may do everything
ANONYMOUS = Principal(key_id=None, name="anonymous", scope="admin")


@dataclass
class Call:
    """One model call as the policies see it: parsed, routed, not yet dispatched."""

    principal: Principal
    #: ``gen_ai.operation.name``: chat, text_completion, embeddings
    operation: str
    #: the model name the client asked for, and where it was routed
    model: str
    deployment: str
    model_version: str | None
    #: the JSON the replica will get (a policy may rewrite it, e.g. redact an input)
    body: dict[str, Any]
    stream: bool
    #: estimated before dispatch (the gateway has no tokenizer): an upper bound for ordinary text
    prompt_tokens: int
    #: completion tokens reserved: the request's max_tokens, else DEFAULT_COMPLETION_RESERVE (0 for
    #: embeddings)
    completion_tokens: int
    #: the request's root span: policies record their decisions on it
    span: trace.Span = field(default_factory=trace.get_current_span)
    #: headers the response gets (x-ratelimit-*, x-lamina-cost-usd); filled by admit and settle
    headers: dict[str, str] = field(default_factory=dict)
    #: fields added to the response's ``usage`` (e.g. ``cost``); filled by settle
    usage_extra: dict[str, Any] = field(default_factory=dict)
    #: the prompt template the body was rendered from, ``name@version`` (not in ``body``: an OpenAI
    #: upstream refuses unknown fields); None: the request named none
    template: str | None = None
    #: the replica's plain answer (with the gateway's ``citations``), set just before the tickets settle;
    #: None for streams and failed calls (the replay recorder keeps a summary of it)
    answer: dict[str, Any] | None = None
    #: the gateway's steps for this call so far, ``(step, start_ns, end_ns)``: each policy's admission
    #: under its class's ``step`` name (the trace's application spans: limits, budgets, guards, ...)
    timings: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def reserved_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Usage:
    """What a completed call used, as its replica reported it."""

    prompt_tokens: int
    completion_tokens: int
    #: the replica that answered, and the engine time attributable to this request (its share of the
    #: batches it rode in when the replica reports one, else its wall time in the engine); None: unknown
    replica: str | None = None
    engine_s: float | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @staticmethod
    def of(usage: Any, ext: Any, replica: str | None) -> Usage:
        """From a response's ``usage`` object and the replica's ``lamina`` extension."""
        usage = usage if isinstance(usage, dict) else {}
        ext = ext if isinstance(ext, dict) else {}
        compute = ext.get("compute_ms", ext.get("engine_ms"))
        return Usage(
            prompt_tokens=_count(usage.get("prompt_tokens")),
            completion_tokens=_count(usage.get("completion_tokens")),
            replica=replica,
            engine_s=compute / 1000
            if isinstance(compute, int | float) and not isinstance(compute, bool)
            else None,
        )


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


class Ticket(Protocol):
    """What a policy keeps of an admitted call until it is over."""

    async def settle(self, call: Call, usage: Usage | None) -> None:
        """The call is over: ``usage`` is what it used, None when it failed or was abandoned."""
        ...


class Policy(Protocol):
    """One check or account around model calls (rate limits, budgets and cost, guards...); a class
    attribute ``step`` names its span in the request's trace (``limits``, ``budgets``, ``guards``)."""

    async def admit(self, call: Call) -> Ticket | None:
        """Admit ``call`` (raise a LaminaError to refuse it); a ticket to settle later, or None."""
        ...


def for_cached_answers(policies: Sequence[Policy]) -> list[Policy]:
    """The policies that also admit an answer served from the response cache (as one request of no
    tokens): those whose class says ``applies_to_cached = True`` (rate limits). Costs and guards do not:
    a cached answer costs nothing and was checked when it was stored."""
    return [p for p in policies if getattr(type(p), "applies_to_cached", False)]


@runtime_checkable
class Closing(Protocol):
    """A policy that holds resources (a connection pool, a writer thread) and releases them at shutdown."""

    async def aclose(self) -> None: ...


async def close_policies(policies: Sequence[Policy]) -> None:
    """Release what each policy holds (at the gateway's shutdown); a failure is logged, the rest close."""
    for policy in policies:
        if isinstance(policy, Closing):
            try:
                await policy.aclose()
            except Exception:
                log.exception("closing %s failed", type(policy).__name__)


class Admission:
    """The tickets of one call, settled together exactly once."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self._tickets: list[Ticket] = []
        self._settled = False

    @staticmethod
    async def of(call: Call, policies: Sequence[Policy]) -> Admission:
        """Admit ``call`` under every policy in order; a refusal releases what was taken before it."""
        admission = Admission(call)
        timings = call.timings
        try:
            for policy in policies:
                began = time.time_ns()
                ticket = await policy.admit(call)
                timings.append((getattr(policy, "step", "policy"), began, time.time_ns()))
                if ticket is not None:
                    admission._tickets.append(ticket)
        except BaseException:
            await admission.settle(None)
            raise
        return admission

    async def settle(self, usage: Usage | None) -> None:
        """Settle every ticket (once; later calls do nothing). A failing ticket is logged, not raised:
        the answer is already computed, and the other tickets still settle."""
        if self._settled:
            return
        self._settled = True
        for ticket in reversed(self._tickets):
            try:
                await ticket.settle(self.call, usage)
            except Exception:
                log.exception("settling %s for %s failed", type(ticket).__name__, self.call.deployment)


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """An upper bound for the tokens of a request's input, from its text (no tokenizer at the gateway):
    one token per 3 bytes of UTF-8, plus a few per message for the chat template."""
    parts: list[Any] = []
    if isinstance(body.get("messages"), list):
        parts = body["messages"]
        overhead = 8 * len(parts)
    else:
        parts = [body.get("prompt", body.get("input", ""))]
        overhead = 0
    size = len(json.dumps(parts, ensure_ascii=False).encode())
    return overhead + -(-size // 3)
