"""The gateway's Prometheus metrics, on a registry of their own (never prometheus_client's global one).

Each ``Telemetry`` owns one ``GatewayMetrics``, so two gateways in one process (or two tests) never count
into each other's series. Label values are bounded: ``model`` is a deployment name (or empty before the
model is known), ``endpoint`` one of the gateway's routes, ``status`` an HTTP status.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TPS_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0)


class GatewayMetrics:
    """The series a dashboard needs to see traffic, latency and generation speed per model."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self.requests = Counter(
            "lamina_requests",
            "API requests answered, by outcome.",
            ("endpoint", "model", "status"),
            registry=reg,
        )
        self.request_duration = Histogram(
            "lamina_request_duration_seconds",
            "Time from request received to last byte sent (whole stream for streams).",
            ("endpoint", "model"),
            buckets=_DURATION_BUCKETS,
            registry=reg,
        )
        self.time_to_first_token = Histogram(
            "lamina_time_to_first_token_seconds",
            "Time from request received to the first content chunk relayed (streams).",
            ("model",),
            buckets=_TTFT_BUCKETS,
            registry=reg,
        )
        self.tokens_per_second = Histogram(
            "lamina_tokens_per_second",
            "Output tokens divided by the engine's generation time, per request.",
            ("model",),
            buckets=_TPS_BUCKETS,
            registry=reg,
        )
        self.input_tokens = Counter(
            "lamina_input_tokens", "Prompt tokens processed.", ("model",), registry=reg
        )
        self.output_tokens = Counter("lamina_output_tokens", "Tokens generated.", ("model",), registry=reg)
        self.in_flight = Gauge(
            "lamina_requests_in_flight", "Requests being served right now.", ("model",), registry=reg
        )
        self.guard_decisions = Counter(
            "lamina_guard_decisions",
            "Guardrail decisions, per guard, verdict (allow, block, redact, flag, fail_open, fail_closed) "
            "and direction (input, output); one per guard per request.",
            ("guard", "action", "direction"),
            registry=reg,
        )

    def observe_request(self, *, endpoint: str, model: str, status: int, seconds: float) -> None:
        """Count one finished request and its duration."""
        self.requests.labels(endpoint, model, str(status)).inc()
        self.request_duration.labels(endpoint, model).observe(seconds)

    def observe_guard(self, *, guard: str, action: str, direction: str) -> None:
        """Count one guard's decision on one request (``guard`` is a configured guard's name)."""
        self.guard_decisions.labels(guard, action, direction).inc()

    def observe_first_token(self, *, model: str, seconds: float) -> None:
        self.time_to_first_token.labels(model).observe(seconds)

    def observe_tokens(
        self, *, model: str, input_tokens: int, output_tokens: int, seconds: float | None
    ) -> None:
        """Count tokens; ``seconds`` is the generation time the speed is measured over (None: unknown)."""
        self.input_tokens.labels(model).inc(max(input_tokens, 0))
        self.output_tokens.labels(model).inc(max(output_tokens, 0))
        if output_tokens > 0 and seconds is not None and seconds > 0:
            self.tokens_per_second.labels(model).observe(output_tokens / seconds)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every series, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class DriftMetrics:
    """The latest drift check of each dataset as gauges (``dataset`` is bounded: the datasets that exist).

    A gauge whose statistic a check could not compute (too little data) keeps its previous value; the
    ``detected`` gauge is always set, 1 for drift and 0 otherwise.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.auc = Gauge(
            "lamina_drift_auc",
            "Out-of-fold ROC AUC of the domain classifier, dataset vs traffic (drift above 0.55).",
            ("dataset",),
            registry=registry,
        )
        self.mmd = Gauge(
            "lamina_drift_mmd",
            "Unbiased MMD^2 (RBF kernel) between the dataset's and the traffic's embeddings.",
            ("dataset",),
            registry=registry,
        )
        self.p_value = Gauge(
            "lamina_drift_p_value",
            "Permutation p-value of the MMD test (drift below 0.05).",
            ("dataset",),
            registry=registry,
        )
        self.detected = Gauge(
            "lamina_drift_detected",
            "1 if the latest drift check found drift.",
            ("dataset",),
            registry=registry,
        )

    def set(
        self,
        dataset: str,
        *,
        auc: float | None,
        mmd2: float | None,
        p_value: float | None,
        drifted: bool,
    ) -> None:
        """Record one dataset's latest check."""
        for gauge, value in ((self.auc, auc), (self.mmd, mmd2), (self.p_value, p_value)):
            if value is not None:
                gauge.labels(dataset).set(value)
        self.detected.labels(dataset).set(1.0 if drifted else 0.0)
