"""Finished requests counted into the metrics in batches, not one series update at a time.

A chat request updates about twenty series (its outcome and duration, tokens, the engine's queue, prefill
and decode times, the time per layer, the cache and rate-limit outcomes). Done as each request finishes,
that is twenty small calls, each meeting cold caches between the rest of the request's work; here the
request path appends one tuple, and :meth:`RequestFold.fold` counts a batch: before every scrape (the
registry's collect) and every :data:`BATCH` requests, so the memory it holds is bounded. A batch is first
grouped per series (one pass of plain list appends), then counted a column at a time with numpy: the
replies' tokens and the engine's timings of a deployment as arrays, each histogram's values bisected and
tallied at once, the layers' microseconds as one matrix (about a fifth of the instructions a loop over the
requests took). The live gauges (requests in flight, waiting, running) are still updated as they change.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from itertools import chain
from typing import TYPE_CHECKING, Any

import numpy as np

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


def _column(values: list[Any]) -> np.ndarray:
    """``values`` as floats, NaN for what is no number (None, a bool, a string: a replica's odd figure)."""
    if _NUMBERS.issuperset(map(type, values)):
        return np.fromiter(values, dtype=np.float64, count=len(values))
    return np.array([v if type(v) in _NUMBERS else np.nan for v in values], dtype=np.float64)


def _replies_into(series: Any, replies: list[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> None:
    """The replies of one deployment in a batch: their tokens and the engine's timings as each replica
    reported them, tallied column by column (a reply's figures that are no numbers count as absent)."""
    usages = [usage for usage, _ in replies]
    exts = [ext for _, ext in replies]
    tokens_in = _column([u.get("prompt_tokens") for u in usages])
    tokens_out = _column([u.get("completion_tokens") for u in usages])
    engine = _column([e.get("engine_ms") for e in exts])
    queue = _column([e.get("queue_ms") for e in exts])
    ttft = _column([e.get("ttft_ms") for e in exts])
    # NaN compares False: each mask holds the replies whose figures it needs
    series.input_tokens.inc(int(np.trunc(tokens_in[tokens_in > 0]).sum()))
    series.output_tokens.inc(int(np.trunc(tokens_out[tokens_out > 0]).sum()))
    fast = (tokens_out > 0) & (engine > 0)
    series.tokens_per_second.observe_many(tokens_out[fast] / (engine[fast] / 1000))
    series.queue.observe_many(queue[queue >= 0] / 1000)
    prefill_ms = np.maximum(ttft - queue, 0.0)  # NaN where a figure is missing: masked below
    timed = ~(np.isnan(prefill_ms) | np.isnan(tokens_out))  # a prefill: queue and first token
    series.prefill.observe_many(prefill_ms[timed] / 1000)
    decoded = timed & ~np.isnan(engine)  # a decode: the engine's time too
    decode_s = np.maximum(engine[decoded] - prefill_ms[decoded], 0.0) / 1000
    series.decode.observe_many(decode_s)
    more = tokens_out[decoded] > 1
    series.inter_token.observe_many(decode_s[more] / (tokens_out[decoded][more] - 1))
    detailed = [u.get("prompt_tokens_details") for u in usages]
    if not any(detailed):
        return
    queries = hits = 0
    for details, tokens in zip(detailed, tokens_in.tolist(), strict=True):
        if isinstance(details, dict) and tokens == tokens:  # not NaN: the prompt's tokens are a number
            cached: Any = details.get("cached_tokens")
            if type(cached) in _NUMBERS:
                queries += max(int(tokens), 0)
                hits += max(min(int(cached), int(tokens)), 0)
    if queries or hits:
        series.prefix_queries.inc(queries)
        series.prefix_hits.inc(hits)


def _count(metrics: GatewayMetrics, batch: list[Finished]) -> None:
    """Tally ``batch`` per series, then hand each series its tally."""
    requests: dict[tuple[str, str, int], list[float]] = {}
    e2e: dict[str, list[float]] = {}
    replies: dict[str, list[tuple[Mapping[str, Any], Mapping[str, Any]]]] = {}
    rows: list[Sequence[int]] = []
    cache: dict[str, int] = {}
    limited: dict[str, int] = {}
    for model, endpoint, status, seconds, answered, layers, cached, limit in batch:
        if endpoint is not None:
            durations = requests.get((endpoint, model, status))
            if durations is None:
                requests[endpoint, model, status] = [seconds]
            else:
                durations.append(seconds)
        if model:  # a request never routed has no model series
            if endpoint is not None:
                timed = e2e.get(model)
                if timed is None:
                    e2e[model] = [seconds]
                else:
                    timed.append(seconds)
            if answered:
                held = replies.get(model)
                if held is None:
                    replies[model] = list(answered)
                else:
                    held.extend(answered)
        if layers is not None:
            rows.append(layers)
        if cached is not None:
            cache[cached] = cache.get(cached, 0) + 1
        if limit is not None:
            limited[limit] = limited.get(limit, 0) + 1
    for (endpoint, model, status), durations in requests.items():
        metrics.observe_requests(endpoint=endpoint, model=model, status=status, seconds=durations)
    for model, durations in e2e.items():
        metrics.model(model).e2e.observe_many(durations)
    for model, answers in replies.items():
        _replies_into(metrics.model(model), answers)
    if rows:
        matrix = np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=len(LAYERS) * len(rows))
        _layers_into(metrics, matrix.reshape(len(rows), len(LAYERS)))
    child, traffic = metrics.child, metrics.traffic
    for outcome, count in cache.items():
        child(traffic.cache, outcome).inc(count)
    for limit, count in limited.items():
        child(traffic.rate_limited, limit).inc(count)


def _layers_into(metrics: GatewayMetrics, rows: np.ndarray) -> None:
    """The batch's microseconds per layer (a row per request, in the order of LAYERS): the seconds each
    layer took, and how often each led (the first of equals, in the order of LAYERS)."""
    child, traffic = metrics.child, metrics.traffic
    for name, total in zip(LAYERS, rows.sum(axis=0).tolist(), strict=True):
        if total > 0:
            child(traffic.layer_seconds, name).inc(total / 1e6)
    led = np.bincount(rows.argmax(axis=1)[rows.max(axis=1) > 0], minlength=len(LAYERS))
    for name, count in zip(LAYERS, led.tolist(), strict=True):
        if count:
            child(traffic.bottleneck, name).inc(count)
