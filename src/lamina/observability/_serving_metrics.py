"""The engine's metrics under the names users know from vLLM, and the gateway's traffic and tracing ones.

vLLM names its series ``vllm:<name>``; colons in Prometheus metric names are reserved for recording rules
by convention, so Lamina uses ``lamina_<name>`` with vLLM's suffixes and the label ``model`` (the
deployment) where vLLM has ``model_name``:

=========================================  ==============================================================
Lamina                                     vLLM
=========================================  ==============================================================
lamina_time_to_first_token_seconds         vllm:time_to_first_token_seconds (gateway-measured, streams)
lamina_inter_token_latency_seconds         vllm:inter_token_latency_seconds (a request's mean gap)
lamina_request_queue_time_seconds          vllm:request_queue_time_seconds (the replica's queue)
lamina_request_prefill_time_seconds        vllm:request_prefill_time_seconds
lamina_request_decode_time_seconds         vllm:request_decode_time_seconds
lamina_e2e_request_latency_seconds         vllm:e2e_request_latency_seconds (gateway, received to sent)
lamina_num_requests_running                vllm:num_requests_running (dispatched to a replica)
lamina_num_requests_waiting                vllm:num_requests_waiting (admitted, not yet dispatched)
lamina_prefix_cache_queries_total          vllm:prefix_cache_queries (prompt tokens)
lamina_prefix_cache_hits_total             vllm:prefix_cache_hits (prompt tokens the engine had cached)
lamina_input_tokens_total                  vllm:prompt_tokens_total
lamina_output_tokens_total                 vllm:generation_tokens_total
=========================================  ==============================================================

The queue, prefill and decode times come from the timings each replica reports with its answer (the
``lamina`` extension: ``queue_ms``, ``ttft_ms``, ``engine_ms``), so they are the engine's own clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Gauge

from lamina.observability._fast_metrics import FastMetrics

if TYPE_CHECKING:
    from lamina.observability._metrics import GatewayMetrics

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
_E2E = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0)


class _NullSeries:
    """A labelled series that counts nothing (``observability.metrics: false``)."""

    def inc(self, amount: float = 1) -> None: ...

    def dec(self, amount: float = 1) -> None: ...

    def set(self, value: float) -> None: ...

    def observe(self, amount: float) -> None: ...

    def observe_many(self, amounts: Sequence[float]) -> None: ...


_NULL = _NullSeries()


class LabelCache:
    """``metric.labels(*values)``, or a series that counts nothing when the metrics are off. Only for
    bounded label values (deployments, endpoints, statuses, layers) of series that are never removed."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def __call__(self, metric: Any, *values: str) -> Any:
        if not self.enabled:  # metrics off: every series is one that counts nothing
            return _NULL
        return metric.labels(*values)


class ModelSeries:
    """Every series of one deployment that a request updates, looked up once per request instead of once
    per update (``GatewayMetrics.model``); all count nothing when the metrics are off."""

    __slots__ = (
        "decode",
        "e2e",
        "in_flight",
        "input_tokens",
        "inter_token",
        "output_tokens",
        "prefill",
        "prefix_hits",
        "prefix_queries",
        "queue",
        "running",
        "time_to_first_token",
        "tokens_per_second",
        "waiting",
    )

    def __init__(self, metrics: GatewayMetrics, model: str) -> None:
        child, engine = metrics.child, metrics.engine
        self.in_flight = child(metrics.in_flight, model)
        self.input_tokens = child(metrics.input_tokens, model)
        self.output_tokens = child(metrics.output_tokens, model)
        self.tokens_per_second = child(metrics.tokens_per_second, model)
        self.time_to_first_token = child(metrics.time_to_first_token, model)
        self.queue = child(engine.queue_time, model)
        self.prefill = child(engine.prefill_time, model)
        self.decode = child(engine.decode_time, model)
        self.inter_token = child(engine.inter_token, model)
        self.e2e = child(engine.e2e, model)
        self.running = child(engine.running, model)
        self.waiting = child(engine.waiting, model)
        self.prefix_queries = child(engine.prefix_queries, model)
        self.prefix_hits = child(engine.prefix_hits, model)


class EngineMetrics:
    """vLLM-named series per deployment (``model``)."""

    def __init__(self, fast: FastMetrics) -> None:
        self.queue_time = fast.histogram(
            "lamina_request_queue_time_seconds",
            "Time a request waited in its replica's queue before the engine started it.",
            ("model",),
            _LATENCY,
        )
        self.prefill_time = fast.histogram(
            "lamina_request_prefill_time_seconds",
            "Engine time from starting a request to its first token (prompt processing).",
            ("model",),
            _LATENCY,
        )
        self.decode_time = fast.histogram(
            "lamina_request_decode_time_seconds",
            "Engine time from a request's first token to its last.",
            ("model",),
            _E2E,
        )
        self.inter_token = fast.histogram(
            "lamina_inter_token_latency_seconds",
            "Mean time between two output tokens of a request (decode time / (output tokens - 1)).",
            ("model",),
            _ITL,
        )
        self.e2e = fast.histogram(
            "lamina_e2e_request_latency_seconds",
            "Model requests: time from received by the gateway to the last byte sent.",
            ("model",),
            _E2E,
        )
        self.running = fast.gauge(
            "lamina_num_requests_running",
            "Requests dispatched to a replica and not finished.",
            ("model",),
        )
        self.waiting = fast.gauge(
            "lamina_num_requests_waiting",
            "Requests routed to a deployment and not yet dispatched to a replica.",
            ("model",),
        )
        self.prefix_queries = fast.counter(
            "lamina_prefix_cache_queries",
            "Prompt tokens looked up in the engine's prefix cache (replicas that report cached tokens).",
            ("model",),
        )
        self.prefix_hits = fast.counter(
            "lamina_prefix_cache_hits",
            "Prompt tokens the engine found in its prefix cache (usage.prompt_tokens_details.cached_tokens).",
            ("model",),
        )


class TrafficMetrics:
    """The gateway's per-request outcomes beyond the request counters: cache, rate limits, layers, traces."""

    def __init__(self, registry: CollectorRegistry, fast: FastMetrics) -> None:
        reg = registry
        self.cache = fast.counter(
            "lamina_cache_requests",
            "Response-cache lookups by result (hit, miss, bypass, ... as the x-lamina-cache header says).",
            ("result",),
        )
        self.rate_limited = fast.counter(
            "lamina_rate_limited_requests",
            "Requests refused by a rate limit, by the limit's scope and unit (e.g. 'key requests').",
            ("limit",),
        )
        self.layer_seconds = fast.counter(
            "lamina_layer_seconds",
            "Time requests spent in each layer (the self time of its spans).",
            ("layer",),
        )
        self.bottleneck = fast.counter(
            "lamina_bottleneck_requests",
            "Requests by the layer that took longest in them.",
            ("layer",),
        )
        self.traces = fast.counter(
            "lamina_traces",
            "Finished traces by the sampler's decision (error, slow, sampled: stored; dropped: not).",
            ("decision",),
        )
        self.spans_lost = Gauge(
            "lamina_trace_spans_lost",
            "Spans of kept traces that never reached the store (writer behind, or the store failed).",
            registry=reg,
        )
