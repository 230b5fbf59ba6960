"""Which finished traces are kept: a decision made when a trace's root span ends (tail-aware).

A trace is always kept when it failed (any span has status ERROR) or was slow (its root took at least
``slow_ms``); a refusal of the client's request (an HTTP 4xx) is kept too, but at most
``CLIENT_ERRORS_PER_S`` times ``per_s`` a second, so a client hammering a rate limit cannot fill the
store. A trace whose caller sampled it (its request's ``traceparent``, ``_caller.py``) is kept as
OpenTelemetry's parent-based samplers would, up to ``CALLER_SAMPLED_PER_S`` times ``per_s`` a second, then
as an ordinary one. Any other trace is kept with probability ``rate``, and the ones the rate lets through
are capped by a token bucket of ``per_s`` traces a second (bursts of ten seconds' worth pass): at light
load every request is kept, under sustained load only a few a second, so the store grows by a bounded amount
whatever the traffic, and the traces worth reading (errors, slow ones) are never lost.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

#: how many seconds' worth of ``per_s`` may pass in one burst
BURST_S = 10.0
#: client errors (HTTP 4xx) kept a second, as a multiple of ``per_s`` (at least 10 a second)
CLIENT_ERRORS_PER_S = 10.0
#: traces their caller sampled (``traceparent`` flag 01) kept a second beyond the ordinary ones, as a
#: multiple of ``per_s`` (at least 10 a second): a caller cannot make the gateway keep every request
CALLER_SAMPLED_PER_S = 10.0


class Kept(StrEnum):
    """Why a trace was stored (the ``kept`` column of the ``traces`` table)."""

    ERROR = "error"
    SLOW = "slow"
    SAMPLED = "sampled"


@dataclass(frozen=True)
class SamplingPolicy:
    """``rate`` in [0, 1]; ``per_s`` >= 0 (0: ordinary traces are never kept); ``slow_ms`` > 0."""

    rate: float = 1.0
    per_s: float = 2.0
    slow_ms: float = 5000.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"sample rate must be within 0 and 1, not {self.rate}")
        if self.per_s < 0 or self.slow_ms <= 0:
            raise ValueError("sampled_per_s must be at least 0 and slow_ms above 0")


class TraceSampler:
    """Thread-safe: roots end on the event loop and in worker threads alike."""

    def __init__(
        self,
        policy: SamplingPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.policy = policy
        self._clock = clock
        self._rng = rng
        self._lock = threading.Lock()
        self._sampled = _Bucket(policy.per_s, clock())
        self._client_errors = _Bucket(max(policy.per_s * CLIENT_ERRORS_PER_S, 10.0), clock())
        self._callers = _Bucket(max(policy.per_s * CALLER_SAMPLED_PER_S, 10.0), clock())

    def decide(
        self, *, error: bool, duration_ms: float, client_error: bool = False, caller_sampled: bool = False
    ) -> Kept | None:
        """Why the trace is kept, or None when it is dropped. ``client_error``: it failed only by refusing
        the client's request (HTTP 4xx), kept as an error within its own cap. ``caller_sampled``: the
        request's ``traceparent`` said its caller samples the trace, kept within a cap of its own."""
        if error:
            return Kept.ERROR
        if duration_ms >= self.policy.slow_ms:
            return Kept.SLOW
        if client_error:
            return Kept.ERROR if self._take(self._client_errors) else None
        if caller_sampled and self._take(self._callers):
            return Kept.SAMPLED
        return self._by_rate()

    def ordinary(self, duration_ms: float) -> Kept | None:
        """:meth:`decide` for a trace that neither failed nor came sampled by its caller (most of them),
        without the keywords: kept if slow, else by the rate and within ``per_s``."""
        if duration_ms >= self.policy.slow_ms:
            return Kept.SLOW
        return self._by_rate()

    def _by_rate(self) -> Kept | None:
        if self.policy.rate < 1.0 and self._rng() >= self.policy.rate:
            return None
        return Kept.SAMPLED if self._take(self._sampled) else None

    def _take(self, bucket: _Bucket) -> bool:
        now = self._clock()
        if bucket.tokens + (now - bucket.last) * bucket.per_s < 1.0:
            return False  # empty (read without the lock: a stale read only makes a take wait a little)
        with self._lock:
            return bucket.take(now)


class _Bucket:
    """A token bucket: ``per_s`` tokens a second, up to :data:`BURST_S` seconds' worth (at least one)."""

    def __init__(self, per_s: float, now: float) -> None:
        self.per_s = per_s
        self.capacity = max(per_s * BURST_S, 1.0) if per_s > 0 else 0.0
        self.tokens = self.capacity
        self.last = now

    def take(self, now: float) -> bool:
        if self.capacity <= 0:
            return False
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.per_s)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
