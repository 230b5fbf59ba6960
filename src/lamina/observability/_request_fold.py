"""Finished requests counted into the metrics in batches, not one series update at a time.

A chat request updates about twenty series (its outcome and duration, tokens, the engine's queue, prefill
and decode times, the time per layer, the cache and rate-limit outcomes). Done as each request finishes,
that is twenty small calls, each meeting cold caches between the rest of the request's work; here the
request path appends one tuple, and :meth:`RequestFold.fold` counts a batch in one tight loop: before
every scrape (the registry's collect) and every :data:`BATCH` requests, so the memory it holds is bounded.
The live gauges (requests in flight, waiting, running) are still updated as they change.
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


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


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
            metrics = self._metrics
            child, traffic, model_of = metrics.child, metrics.traffic, metrics.model
            for model, endpoint, status, seconds, replies, layers, cache, limited in batch:
                series = model_of(model) if model else None  # a request never routed has no model series
                if endpoint is not None:
                    metrics.observe_request(endpoint=endpoint, model=model, status=status, seconds=seconds)
                    if series is not None:
                        series.e2e.observe(seconds)
                if series is not None:
                    for usage, ext in replies:
                        _reply(series, usage, ext)
                if layers is not None:
                    best, most = None, 0
                    for name, us in zip(LAYERS, layers, strict=True):
                        if us > 0:
                            child(traffic.layer_seconds, name).inc(us / 1e6)
                            if us > most:
                                best, most = name, us
                    if best is not None:
                        child(traffic.bottleneck, best).inc()
                if cache is not None:
                    child(traffic.cache, cache).inc()
                if limited is not None:
                    child(traffic.rate_limited, limited).inc()


def _reply(series: Any, usage: Mapping[str, Any], ext: Mapping[str, Any]) -> None:
    """One reply's tokens and the engine's timings as its replica reported them."""
    tokens_in, tokens_out = _number(usage.get("prompt_tokens")), _number(usage.get("completion_tokens"))
    engine_ms = _number(ext.get("engine_ms"))
    series.input_tokens.inc(max(int(tokens_in or 0), 0))
    series.output_tokens.inc(max(int(tokens_out or 0), 0))
    if tokens_out and tokens_out > 0 and engine_ms and engine_ms > 0:
        series.tokens_per_second.observe(tokens_out / (engine_ms / 1000))
    queue_ms, ttft_ms = _number(ext.get("queue_ms")), _number(ext.get("ttft_ms"))
    prefill_ms = None if ttft_ms is None or queue_ms is None else max(ttft_ms - queue_ms, 0.0)
    if queue_ms is not None and queue_ms >= 0:
        series.queue.observe(queue_ms / 1000)
    if prefill_ms is not None and tokens_out is not None:
        series.prefill.observe(prefill_ms / 1000)
    if engine_ms is not None and prefill_ms is not None and tokens_out is not None:
        decode_ms = max(engine_ms - prefill_ms, 0.0)
        series.decode.observe(decode_ms / 1000)
        if tokens_out > 1:
            series.inter_token.observe(decode_ms / 1000 / (tokens_out - 1))
    details = usage.get("prompt_tokens_details")
    cached = _number(details.get("cached_tokens")) if isinstance(details, dict) else None
    if cached is not None and tokens_in is not None:
        series.prefix_queries.inc(max(int(tokens_in), 0))
        series.prefix_hits.inc(max(min(int(cached), int(tokens_in)), 0))
