"""Finished requests counted into the metrics in batches, not one series update at a time.

A chat request updates about twenty series (its outcome and duration, tokens, the engine's queue, prefill
and decode times, the time per layer, the cache and rate-limit outcomes). Done as each request finishes,
that is twenty small calls, each meeting cold caches between the rest of the request's work; here the
request path appends one tuple, and :meth:`RequestFold.fold` counts a batch: before every scrape (the
registry's collect) and every :data:`BATCH` requests, so the memory it holds is bounded. A batch is first
tallied per series (one pass of plain list appends and additions, no call per update), then each series
takes its tally at once: a counter one addition, a histogram its values in one loop. The live gauges
(requests in flight, waiting, running) are still updated as they change.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lamina.observability._breakdown import LAYERS

if TYPE_CHECKING:
    from lamina.observability._metrics import GatewayMetrics

#: finished requests held before they are counted without a scrape
BATCH = 1024

#: one finished request: (deployment or "", endpoint or None, status, seconds, its replies as
#: (usage, the replica's ``lamina`` extension), whole microseconds per layer (in the order of LAYERS) or
#: None, the cache outcome, the rate limit)
Finished = tuple[
    str,
    str | None,
    int,
    float,
    Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]],
    Sequence[int] | None,
    str | None,
    str | None,
]

#: the JSON numbers a replica's figures may be (bool is neither)
_NUMBERS = frozenset({int, float})


class RequestFold:
    """The finished requests of one :class:`~lamina.observability._metrics.GatewayMetrics` not counted yet."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics
        self.pending: list[Finished] = []
        self._lock = threading.Lock()

    def add(self, finished: Finished) -> None:
        """Called on the event loop as each request ends: one append (a fold every :data:`BATCH`)."""
        pending = self.pending
        pending.append(finished)
        if len(pending) >= BATCH:
            self.fold()

    def fold(self) -> None:
        """Count every pending request now (before a scrape reads the series)."""
        with self._lock:
            batch, self.pending = self.pending, []
            if batch:
                _count(self._metrics, batch)


class _ModelTally:
    """What a batch adds to one deployment's series."""

    __slots__ = ("decode", "e2e", "hits", "inter_token", "prefill", "queries", "queue", "tokens", "tps")

    def __init__(self) -> None:
        self.e2e: list[float] = []
        self.queue: list[float] = []
        self.prefill: list[float] = []
        self.decode: list[float] = []
        self.inter_token: list[float] = []
        self.tps: list[float] = []
        #: prompt and generated tokens, prefix-cache queries and hits
        self.tokens = [0, 0]
        self.queries = self.hits = 0

    def reply(self, usage: Mapping[str, Any], ext: Mapping[str, Any]) -> None:
        """One reply's tokens and the engine's timings as its replica reported them."""
        numbers = _NUMBERS
        tokens_in: Any = usage.get("prompt_tokens")  # Any: checked by type below, None when no number
        tokens_out: Any = usage.get("completion_tokens")
        if type(tokens_in) not in numbers:
            tokens_in = None
        elif tokens_in > 0:
            self.tokens[0] += int(tokens_in)
        if type(tokens_out) not in numbers:
            tokens_out = None
        elif tokens_out > 0:
            self.tokens[1] += int(tokens_out)
        engine_ms: Any = ext.get("engine_ms")
        queue_ms: Any = ext.get("queue_ms")
        ttft_ms: Any = ext.get("ttft_ms")
        if type(engine_ms) not in numbers:
            engine_ms = None
        elif tokens_out and tokens_out > 0 and engine_ms > 0:
            self.tps.append(tokens_out / (engine_ms / 1000))
        if type(queue_ms) not in numbers:
            queue_ms = None
        elif queue_ms >= 0:
            self.queue.append(queue_ms / 1000)
        if queue_ms is not None and type(ttft_ms) in numbers and tokens_out is not None:
            prefill_ms = max(ttft_ms - queue_ms, 0.0)
            self.prefill.append(prefill_ms / 1000)
            if engine_ms is not None:
                decode_ms = max(engine_ms - prefill_ms, 0.0)
                self.decode.append(decode_ms / 1000)
                if tokens_out > 1:
                    self.inter_token.append(decode_ms / 1000 / (tokens_out - 1))
        details = usage.get("prompt_tokens_details")
        if tokens_in is not None and isinstance(details, dict):
            cached: Any = details.get("cached_tokens")
            if type(cached) in numbers:
                self.queries += max(int(tokens_in), 0)
                self.hits += max(min(int(cached), int(tokens_in)), 0)

    def into(self, series: Any) -> None:
        series.e2e.observe_many(self.e2e)
        series.input_tokens.inc(self.tokens[0])
        series.output_tokens.inc(self.tokens[1])
        series.tokens_per_second.observe_many(self.tps)
        series.queue.observe_many(self.queue)
        series.prefill.observe_many(self.prefill)
        series.decode.observe_many(self.decode)
        series.inter_token.observe_many(self.inter_token)
        if self.queries or self.hits:
            series.prefix_queries.inc(self.queries)
            series.prefix_hits.inc(self.hits)


def _count(metrics: GatewayMetrics, batch: list[Finished]) -> None:
    """Tally ``batch`` per series, then hand each series its tally."""
    requests: dict[tuple[str, str, int], list[float]] = {}
    models: dict[str, _ModelTally] = {}
    rows: list[Sequence[int]] = []
    cache: dict[str, int] = {}
    limited: dict[str, int] = {}
    for model, endpoint, status, seconds, replies, layers, cached, limit in batch:
        if endpoint is not None:
            durations = requests.get((endpoint, model, status))
            if durations is None:
                requests[endpoint, model, status] = [seconds]
            else:
                durations.append(seconds)
        if model:  # a request never routed has no model series
            tally = models.get(model)
            if tally is None:
                tally = models[model] = _ModelTally()
            if endpoint is not None:
                tally.e2e.append(seconds)
            for usage, ext in replies:
                tally.reply(usage, ext)
        if layers is not None:
            rows.append(layers)
        if cached is not None:
            cache[cached] = cache.get(cached, 0) + 1
        if limit is not None:
            limited[limit] = limited.get(limit, 0) + 1
    for (endpoint, model, status), durations in requests.items():
        metrics.observe_requests(endpoint=endpoint, model=model, status=status, seconds=durations)
    for model, tally in models.items():
        tally.into(metrics.model(model))
    child, traffic = metrics.child, metrics.traffic
    if rows:
        for name, total in zip(LAYERS, [sum(column) for column in zip(*rows, strict=True)], strict=True):
            if total > 0:
                child(traffic.layer_seconds, name).inc(total / 1e6)
        led = [0] * len(LAYERS)
        for row in rows:
            most = max(row)  # the first of equals, in the order of LAYERS
            if most > 0:
                led[row.index(most)] += 1
        for name, count in zip(LAYERS, led, strict=True):
            if count:
                child(traffic.bottleneck, name).inc(count)
    for outcome, count in cache.items():
        child(traffic.cache, outcome).inc(count)
    for limit, count in limited.items():
        child(traffic.rate_limited, limit).inc(count)
