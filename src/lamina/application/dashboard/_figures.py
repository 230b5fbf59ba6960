"""The key figures of a running gateway, read from its Prometheus exposition.

Both the dashboard (its own registry, rendered) and ``lamina top`` (a remote ``/metrics``) read the same
text, so the two always agree. Counters only grow: a rate or a latency "now" is the difference between two
samples, which :class:`FigureHistory` keeps (a ring of the last few minutes).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

_REQUESTS = "lamina_requests_total"
_DURATION = "lamina_request_duration_seconds_bucket"
_IN_FLIGHT = "lamina_requests_in_flight"
_GUARDS = "lamina_guard_decisions_total"
#: the response cache's lookups by result (hit, miss, bypass: not looked up)
_CACHE = "lamina_cache_requests_total"
#: requests routed and not yet dispatched (the gateway's own, under vLLM's name), and vLLM's
_WAITING = ("lamina_num_requests_waiting", "vllm:num_requests_waiting")
_MEM_FREE = "lamina_device_memory_available_bytes"
_MEM_TOTAL = "lamina_device_memory_total_bytes"
_CPU_BUSY = "lamina_device_cpu_utilization_percent"


@dataclass(frozen=True)
class Sample:
    """Cumulative counts of one scrape."""

    at: float
    requests: float = 0.0
    errors: float = 0.0
    refused: float = 0.0
    #: upper bound (s) -> cumulative count, over every endpoint and model
    buckets: Mapping[float, float] = field(default_factory=dict)
    in_flight: float = 0.0
    waiting: float | None = None
    cache_hits: float | None = None
    cache_lookups: float | None = None
    guard_actions: Mapping[str, float] = field(default_factory=dict)
    memory_free: float | None = None
    memory_total: float | None = None
    #: the nodes' CPU busy percent over their last device sample period (mean over the nodes)
    cpu_busy: float | None = None


@dataclass(frozen=True)
class Figures:
    """What the dashboard's live panel and ``lamina top`` show; None: not known (yet)."""

    requests_per_s: float | None
    error_ratio: float | None
    p50_ms: float | None
    p95_ms: float | None
    requests: int
    errors: int
    refused: int
    in_flight: int
    waiting: int | None
    cache_hit_ratio: float | None
    guard_actions: Mapping[str, int]
    window_s: float
    #: the share of the machines' memory in use (device telemetry), None before the first sample
    memory_used_ratio: float | None = None
    #: the share of the machines' CPU time busy over the last device sample period, None before it
    cpu_busy_ratio: float | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "requests_per_s": self.requests_per_s,
            "error_ratio": self.error_ratio,
            "p50_ms": self.p50_ms,
            "p95_ms": self.p95_ms,
            "requests": self.requests,
            "errors": self.errors,
            "refused": self.refused,
            "in_flight": self.in_flight,
            "waiting": self.waiting,
            "cache_hit_ratio": self.cache_hit_ratio,
            "guard_actions": dict(self.guard_actions),
            "window_s": self.window_s,
            "memory_used_ratio": self.memory_used_ratio,
            "cpu_busy_ratio": self.cpu_busy_ratio,
        }


def parse_sample(text: str, at: float) -> Sample:
    """The counts the figures need from one Prometheus exposition (unknown series are ignored)."""
    requests = errors = refused = in_flight = 0.0
    waiting: float | None = None
    hits: float | None = None
    lookups: float | None = None
    buckets: dict[float, float] = {}
    guards: dict[str, float] = {}
    memory: dict[str, float] = {}
    busy: list[float] = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == _REQUESTS:
                requests += s.value
                status = s.labels.get("status", "")
                if status.startswith("5"):
                    errors += s.value
                elif status.startswith("4"):
                    refused += s.value
            elif s.name == _DURATION:
                bound = float(s.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + s.value
            elif s.name == _IN_FLIGHT:
                in_flight += s.value
            elif s.name in _WAITING:
                waiting = (waiting or 0.0) + s.value
            elif s.name == _CACHE and s.labels.get("result") in ("hit", "miss"):
                lookups = (lookups or 0.0) + s.value
                if s.labels["result"] == "hit":
                    hits = (hits or 0.0) + s.value
            elif s.name == _GUARDS:
                action = s.labels.get("action", "?")
                guards[action] = guards.get(action, 0.0) + s.value
            elif s.name in (_MEM_FREE, _MEM_TOTAL):
                memory[s.name] = memory.get(s.name, 0.0) + s.value
            elif s.name == _CPU_BUSY:
                busy.append(s.value)
    if lookups is not None and hits is None:
        hits = 0.0
    return Sample(
        at,
        requests,
        errors,
        refused,
        buckets,
        in_flight,
        waiting,
        hits,
        lookups,
        guards,
        memory.get(_MEM_FREE),
        memory.get(_MEM_TOTAL),
        sum(busy) / len(busy) if busy else None,
    )


def quantile(buckets: Mapping[float, float], q: float) -> float | None:
    """The ``q`` quantile (s) of cumulative histogram buckets, interpolated linearly inside its bucket as
    Prometheus's ``histogram_quantile`` does; None without observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower  # beyond the last finite bucket: its bound is the best known
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, count
    return lower


def _minus(new: Mapping[float, float], old: Mapping[float, float]) -> dict[float, float]:
    return {b: max(0.0, v - old.get(b, 0.0)) for b, v in new.items()}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def figures(new: Sample, old: Sample | None) -> Figures:
    """The figures of ``new``; rates and latencies over the time since ``old`` (None: since the start,
    with no rate)."""
    span = new.at - old.at if old is not None else 0.0
    base = old if old is not None and span > 0 else Sample(new.at)
    requests = new.requests - base.requests
    ratio = (new.errors - base.errors) / requests if requests > 0 else None
    window = _minus(new.buckets, base.buckets)
    if not any(window.values()):
        window = dict(new.buckets)  # no request in the window: the latency since the start
    hit_ratio = None
    if new.cache_lookups:
        hit_ratio = (new.cache_hits or 0.0) / new.cache_lookups
    memory = None
    if new.memory_free is not None and new.memory_total:
        memory = round(1 - new.memory_free / new.memory_total, 3)
    return Figures(
        requests_per_s=requests / span if span > 0 else None,
        error_ratio=ratio,
        p50_ms=_ms(quantile(window, 0.5)),
        p95_ms=_ms(quantile(window, 0.95)),
        requests=int(new.requests),
        errors=int(new.errors),
        refused=int(new.refused),
        in_flight=int(new.in_flight),
        waiting=None if new.waiting is None else int(new.waiting),
        cache_hit_ratio=hit_ratio,
        guard_actions={k: int(v) for k, v in sorted(new.guard_actions.items())},
        window_s=round(span, 1),
        memory_used_ratio=memory,
        cpu_busy_ratio=None if new.cpu_busy is None else round(new.cpu_busy / 100, 3),
    )


class FigureHistory:
    """Samples of the last ``keep_s`` seconds; figures over (at least) the last ``window_s`` of them."""

    def __init__(
        self,
        read: Callable[[], str],
        *,
        window_s: float = 10.0,
        keep_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self._window = window_s
        self._keep = keep_s
        self._clock = clock
        self._samples: deque[Sample] = deque()

    def sample(self) -> Figures:
        """Scrape now and return the figures against the newest sample at least ``window_s`` old (else
        the oldest kept)."""
        now = self._clock()
        new = parse_sample(self._read(), now)
        while self._samples and now - self._samples[0].at > self._keep:
            self._samples.popleft()
        old = _reference(self._samples, now - self._window)
        self._samples.append(new)
        return figures(new, old)


def _reference(samples: Iterable[Sample], before: float) -> Sample | None:
    chosen: Sample | None = None
    for s in samples:
        if chosen is None or s.at <= before:
            chosen = s
    return chosen
