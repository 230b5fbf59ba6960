"""Rate limits: requests and tokens per minute, per key, per model and for the whole gateway.

How the counting stays exact across gateway processes sharing Redis:

- **Fixed one-minute windows, aligned to the clock.** Each limit has one counter per window in the
  storage of the `limits` library (``memory://`` in this process, or Redis shared by every gateway). A
  counter only ever changes through the storage's atomic ``incr`` (in Redis one Lua script: INCRBY, and
  EXPIRE on creation), which returns the new value. Admission adds its cost first and compares after
  (1 for rpm, ``Call.reserved_tokens`` for tpm), so under a limit of N exactly the first N increments of a
  window fit, however many gateways race: nobody reads a count and writes it back later. This is what
  ``limits``' ``FixedWindowRateLimiter.hit`` does, done here on its storage because ``hit`` neither returns
  the count (wanted for ``x-ratelimit-remaining-*``) nor takes back a cost it refused.
- **Giving back.** ``limits`` cannot refund; an ``incr`` by a negative amount does, atomically the same
  way. It is used when a limit refuses (the call's cost comes off that counter and off every counter
  taken before it, exactly, so a refusal by one limit takes nothing from the others) and at settlement
  (the unused part of the token reservation; all of it when the call failed or was abandoned, while the
  request still counts for rpm; a call that used more than it reserved is charged the rest).
- **The window's number is part of the counter's name**, so a give-back lands in the window it was taken
  from. With one counter per limit whose expiry starts each window (``limits``' own keys), a refund that
  arrives after the window ended would credit the next window with a negative count and let it overshoot.
  Counters live for two windows, so a gateway whose clock lags by seconds still finds the old one.
- **Rejected:** the moving window (exact rolling counts, atomic, but nothing can be given back, and it
  keeps one Redis list entry per unit of cost: one 100k-token call pushes 100k entries) and the sliding
  window counter (weights the previous window, so it is approximate by design). LiteLLM's users see
  overshoot where counters are read before being incremented later, read from process memory while
  written to Redis, or counted only when calls finish; none of those happen here.
- **Known properties:** a fixed window may admit N at the end of one minute and N more at the start of
  the next; while a call refused by a later limit gives back what it took, a concurrent call may find an
  earlier counter full for that moment (a spurious refusal, never an overshoot); gateways' clocks must
  agree (NTP) for their windows to agree.

When the storage cannot be reached the policy fails closed (503 naming the store) unless ``fail_open``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.errors import StorageError
from redis.asyncio import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from lamina.application._policy import Call, Principal, Usage
from lamina.config import RateLimitsConfig, redact_url
from lamina.errors import ConfigError, PayloadTooLargeError, RateLimitError, UnavailableError

log = logging.getLogger("lamina.ratelimit")

Unit = Literal["rpm", "tpm"]
Scope = Literal["key", "model", "global"]
WINDOW_S = 60
#: counters outlive their window, so gateways whose clocks differ by seconds share the same counter
_COUNTER_TTL_S = 2 * WINDOW_S
#: a Redis call is sub-millisecond when Redis is up; past these, it is down for our purposes
_REDIS_TIMEOUT_S = 1.0
#: connections to Redis per gateway process, and how long a call waits for one before it is a 503
_REDIS_CONNECTIONS = 64
_REDIS_POOL_WAIT_S = 5.0
_HEADER_UNIT = {"rpm": "requests", "tpm": "tokens"}


@dataclass(frozen=True)
class Limit:
    """One limit that applies to a call: whose (``scope``/``subject``), of what, how much per minute."""

    scope: Scope
    subject: str
    unit: Unit
    value: int
    #: how messages name it: "the key 'alice' (key_x)", "the model 'chat'", "the gateway"
    label: str

    def counter(self, window: int) -> str:
        return f"{self.scope}/{self.subject}/{self.unit}/{window}"

    def describe(self) -> str:
        what = _HEADER_UNIT[self.unit]
        return f"{self.label} allows {self.value} {what} per minute ({self.scope} {self.unit})"


@dataclass(frozen=True)
class Window:
    """The clock minute a call is counted in."""

    number: int
    #: seconds until it ends and every counter starts again from zero
    resets_in: float

    @staticmethod
    def at(now: float) -> Window:
        number = int(now // WINDOW_S)
        return Window(number, (number + 1) * WINDOW_S - now)


@dataclass(frozen=True)
class Count:
    """A limit's counter after this call added ``cost`` to it."""

    limit: Limit
    cost: int
    value: int

    @property
    def remaining(self) -> int:
        return max(0, self.limit.value - self.value)


def limits_for(principal: Principal, model: str, deployment: str, config: RateLimitsConfig) -> list[Limit]:
    """Every limit that applies to a call, in the order they are counted: key, model, global."""
    found: list[Limit] = []
    if principal.key_id is not None:
        label = f"the key {principal.name!r} ({principal.key_id})"
        rpm = principal.rpm if principal.rpm is not None else config.key_rpm
        tpm = principal.tpm if principal.tpm is not None else config.key_tpm
        _add(found, "key", principal.key_id, label, rpm, tpm)
    for name in dict.fromkeys((model, deployment)):
        per_model = config.per_model.get(name)
        if per_model is not None:
            _add(found, "model", name, f"the model {name!r}", per_model.rpm, per_model.tpm)
    _add(found, "global", "*", "the gateway", config.rpm, config.tpm)
    return found


def _add(
    found: list[Limit], scope: Scope, subject: str, label: str, rpm: int | None, tpm: int | None
) -> None:
    if rpm is not None:
        found.append(Limit(scope, subject, "rpm", rpm, label))
    if tpm is not None:
        found.append(Limit(scope, subject, "tpm", tpm, label))


def cost_of(limit: Limit, call: Call) -> int:
    return 1 if limit.unit == "rpm" else call.reserved_tokens


def never_fits(limits: Sequence[Limit], call: Call) -> PayloadTooLargeError | None:
    """A call whose token reservation alone is over a tpm limit can never be admitted: say so (413)."""
    for limit in limits:
        if limit.unit == "tpm" and call.reserved_tokens > limit.value:
            return PayloadTooLargeError(
                f"this call reserves {call.reserved_tokens} tokens (about {call.prompt_tokens} for its input "
                f"plus {call.completion_tokens} for its answer: max_tokens, or 512 when not given) but "
                f"{limit.describe()}; lower max_tokens or shorten the input",
                param="max_tokens",
            )
    return None


def reset_text(seconds: float) -> str:
    """A duration as OpenAI writes it in ``x-ratelimit-reset-*``: ``250ms``, ``12.5s``, ``1m0s``."""
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest}s"


def headers_for(counts: Sequence[Count], window: Window, refused: Count | None = None) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers for the tightest limit of each unit (the one refusing, if any)."""
    headers: dict[str, str] = {}
    for unit, word in _HEADER_UNIT.items():
        mine = [c for c in counts if c.limit.unit == unit]
        if refused is not None and refused.limit.unit == unit:
            tightest = refused
        elif mine:
            tightest = min(mine, key=lambda c: (c.remaining, c.limit.value))
        else:
            continue
        headers[f"x-ratelimit-limit-{word}"] = str(tightest.limit.value)
        headers[f"x-ratelimit-remaining-{word}"] = str(tightest.remaining)
        headers[f"x-ratelimit-reset-{word}"] = reset_text(window.resets_in)
    return headers


def refusal(counts: Sequence[Count], refused: Count, window: Window) -> RateLimitError:
    """The 429 for a call that ``refused`` (its counter before this call) had no room for."""
    retry_after = max(1, math.ceil(window.resets_in))
    used = min(refused.value, refused.limit.value)
    if refused.limit.unit == "rpm":
        state = f"and {used} requests were made in this minute"
    else:
        state = (
            f"{used} are taken in this minute (answered and in-flight calls), and this call reserves "
            f"{refused.cost} (its input plus max_tokens)"
        )
    return RateLimitError(
        f"rate limit exceeded: {refused.limit.describe()}, {state}; retry after {retry_after} s "
        "(the Retry-After header), or ask the gateway's operator for a higher limit",
        headers={**headers_for(counts, window, refused), "retry-after": str(retry_after)},
        limit=f"{refused.limit.scope} {refused.limit.unit}",
    )


class Counters:
    """Per-window counters in a `limits` storage: ``memory://`` or ``redis://host:port/db``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._pool: BlockingConnectionPool | None = None
        self._storage: Storage
        if url == "memory://":
            self._storage = MemoryStorage(wrap_exceptions=True)
            return
        # our own pool, to close it, with short timeouts and one quick retry (redis-py's default backs off
        # for seconds); a blocking pool queues calls for a connection where the default pool fails past
        # 100 at once
        self._pool = BlockingConnectionPool.from_url(
            url,
            max_connections=_REDIS_CONNECTIONS,
            timeout=_REDIS_POOL_WAIT_S,
            socket_connect_timeout=_REDIS_TIMEOUT_S,
            socket_timeout=_REDIS_TIMEOUT_S,
            retry=Retry(NoBackoff(), 1),
        )
        options: dict[str, Any] = {"connection_pool": self._pool}
        self._storage = RedisStorage(
            f"async+{url}",
            wrap_exceptions=True,
            implementation="redispy",
            key_prefix="lamina:ratelimit",
            **options,
        )

    async def add(self, counter: str, amount: int) -> int:
        """Add ``amount`` (negative: give back) to ``counter`` atomically; its new value."""
        return await self._storage.incr(counter, _COUNTER_TTL_S, amount)

    async def value(self, counter: str) -> int:
        return await self._storage.get(counter)

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()


class RateLimitPolicy:
    """The gateway policy counting every call against the limits that apply to it (see the module doc)."""

    #: its span in the request's trace
    step = "limits"

    #: a cached answer still counts as a request (with no tokens): see ``for_cached_answers``
    applies_to_cached = True

    def __init__(
        self,
        config: RateLimitsConfig,
        *,
        known_models: Collection[str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        unknown = sorted(set(config.per_model) - set(known_models)) if known_models is not None else []
        if unknown:
            raise ConfigError(
                f"rate_limits.per_model names models that are not served: {', '.join(unknown)}; use a "
                f"deployment or RAG alias name ({', '.join(sorted(known_models or ())) or 'none'})"
            )
        self.config = config
        self.counters = Counters(config.storage_url)
        self.clock = clock

    async def admit(self, call: Call) -> Reservation | None:
        limits = limits_for(call.principal, call.model, call.deployment, self.config)
        if not limits:
            return None
        too_large = never_fits(limits, call)
        if too_large is not None:
            raise too_large
        window = Window.at(self.clock())
        counts: list[Count] = []
        try:
            for limit in limits:
                cost = cost_of(limit, call)
                count = Count(limit, cost, await self.counters.add(limit.counter(window.number), cost))
                counts.append(count)
                if count.value > limit.value:
                    break
        except StorageError as exc:
            await self._give_back(counts, window)
            self._unreachable(exc)
            return None
        last = counts[-1]
        if last.value > last.limit.value:
            await self._give_back(counts, window)
            before = [Count(c.limit, c.cost, c.value - c.cost) for c in counts]
            call.span.set_attribute("lamina.rate_limited", f"{last.limit.scope} {last.limit.unit}")
            raise refusal(before[:-1], before[-1], window)
        call.headers.update(headers_for(counts, window))
        tokens = [c for c in counts if c.limit.unit == "tpm"]
        return Reservation(self, window, tokens, call.reserved_tokens) if tokens else None

    async def _give_back(self, counts: Sequence[Count], window: Window) -> None:
        for count in counts:
            try:
                await self.counters.add(count.limit.counter(window.number), -count.cost)
            except StorageError as exc:
                log.warning("could not give back %d to %s: %s", count.cost, count.limit.describe(), exc)

    def _unreachable(self, exc: StorageError) -> None:
        """Fail open (log and admit) or closed (503), as configured."""
        where = redact_url(self.config.storage_url)
        cause = exc.storage_error
        if self.config.fail_open:
            log.warning("rate limits not applied: %s is unreachable (%s)", where, cause)
            return
        raise UnavailableError(
            f"the rate-limit store {where} (Redis) is unreachable ({cause}); start Redis there, or set "
            "rate_limits.fail_open: true to admit calls without rate limits while it is down",
            headers={"retry-after": "1"},
        )

    async def aclose(self) -> None:
        await self.counters.aclose()


class Reservation:
    """The tokens an admitted call holds under each tpm limit, until it is settled with its usage."""

    def __init__(self, policy: RateLimitPolicy, window: Window, tokens: list[Count], reserved: int) -> None:
        self._policy = policy
        self._window = window
        self._tokens = tokens
        self._reserved = reserved

    async def settle(self, call: Call, usage: Usage | None) -> None:
        """Give back the unused part (all of it without usage), in the window it was reserved in."""
        delta = (usage.total_tokens if usage is not None else 0) - self._reserved
        if delta == 0:
            return
        settled: list[Count] = []
        for count in self._tokens:
            try:
                value = await self._policy.counters.add(count.limit.counter(self._window.number), delta)
            except StorageError as exc:
                log.warning("could not settle %d tokens with %s: %s", delta, count.limit.describe(), exc)
                return
            settled.append(Count(count.limit, count.cost + delta, value))
        window = Window.at(self._policy.clock())
        if usage is not None and window.number == self._window.number:
            call.headers.update(headers_for(settled, window))
