"""The gateway's Prometheus metrics, on a registry of their own (never prometheus_client's global one).

Each ``Telemetry`` owns one ``GatewayMetrics``, so two gateways in one process (or two tests) never count
into each other's series. Label values are bounded: ``model`` is a deployment name (or empty before the
model is known), ``endpoint`` one of the gateway's routes, ``status`` an HTTP status.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from lamina.observability._fast_metrics import FastMetrics
from lamina.observability._request_fold import Finished, RequestFold
from lamina.observability._serving_metrics import EngineMetrics, LabelCache, ModelSeries, TrafficMetrics
from lamina.observability._utilisation import DeviceSample

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TPS_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0)


class GatewayMetrics:
    """The series a dashboard needs to see traffic, latency and generation speed per model."""

    def __init__(self, registry: CollectorRegistry | None = None, *, enabled: bool = True) -> None:
        """``enabled=False``: the request path counts nothing (the series exist, empty)."""
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        fast = FastMetrics(reg)  # the request path's series (_fast_metrics.py): updated on the event loop
        self.requests = fast.counter(
            "lamina_requests", "API requests answered, by outcome.", ("endpoint", "model", "status")
        )
        self.request_duration = fast.histogram(
            "lamina_request_duration_seconds",
            "Time from request received to last byte sent (whole stream for streams).",
            ("endpoint", "model"),
            _DURATION_BUCKETS,
        )
        self.time_to_first_token = fast.histogram(
            "lamina_time_to_first_token_seconds",
            "Time from request received to the first content chunk relayed (streams).",
            ("model",),
            _TTFT_BUCKETS,
        )
        self.tokens_per_second = fast.histogram(
            "lamina_tokens_per_second",
            "Output tokens divided by the engine's generation time, per request.",
            ("model",),
            _TPS_BUCKETS,
        )
        self.input_tokens = fast.counter("lamina_input_tokens", "Prompt tokens processed.", ("model",))
        self.output_tokens = fast.counter("lamina_output_tokens", "Tokens generated.", ("model",))
        self.in_flight = fast.gauge(
            "lamina_requests_in_flight", "Requests being served right now.", ("model",)
        )
        self.guard_decisions = Counter(
            "lamina_guard_decisions",
            "Guardrail decisions, per guard, verdict (allow, block, redact, flag, fail_open, fail_closed) "
            "and direction (input, output); one per guard per request.",
            ("guard", "action", "direction"),
            registry=reg,
        )
        #: the engine's series under vLLM's names, and the cache, rate-limit, layer and trace ones
        #: ``child(metric, *labels)``: a labelled series, looked up once
        self.child = LabelCache(enabled)
        self.engine = EngineMetrics(fast)
        self.traffic = TrafficMetrics(reg, fast)
        self._models: dict[str, ModelSeries] = {}
        self._requests: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        #: finished requests, counted in batches (``_request_fold.py``)
        self.finished = RequestFold(self)
        fast.before_collect.append(self.finished.fold)
        self.enabled = enabled

    def record(self, finished: Finished) -> None:
        """One finished request, counted with the next batch (nothing when the metrics are off)."""
        if self.enabled:
            self.finished.add(finished)

    def model(self, name: str) -> ModelSeries:
        """The series of the deployment ``name`` (every one the request path updates), looked up once."""
        found = self._models.get(name)
        if found is None:
            found = self._models[name] = ModelSeries(self, name)
        return found

    def observe_request(self, *, endpoint: str, model: str, status: int, seconds: float) -> None:
        """Count one finished request and its duration."""
        self.observe_requests(endpoint=endpoint, model=model, status=status, seconds=(seconds,))

    def observe_requests(self, *, endpoint: str, model: str, status: int, seconds: Sequence[float]) -> None:
        """Count finished requests of one outcome, with their durations."""
        key = (endpoint, model, status)
        found = self._requests.get(key)
        if found is None:  # bounded: routes, deployments, HTTP statuses
            found = self._requests[key] = (
                self.child(self.requests, endpoint, model, str(status)),
                self.child(self.request_duration, endpoint, model),
            )
        found[0].inc(len(seconds))
        found[1].observe_many(seconds)

    def observe_guard(self, *, guard: str, action: str, direction: str) -> None:
        """Count one guard's decision on one request (``guard`` is a configured guard's name)."""
        self.child(self.guard_decisions, guard, action, direction).inc()

    def observe_first_token(self, *, model: str, seconds: float) -> None:
        self.child(self.time_to_first_token, model).observe(seconds)

    def observe_tokens(
        self, *, model: str, input_tokens: int, output_tokens: int, seconds: float | None
    ) -> None:
        """Count tokens; ``seconds`` is the generation time the speed is measured over (None: unknown)."""
        self.child(self.input_tokens, model).inc(max(input_tokens, 0))
        self.child(self.output_tokens, model).inc(max(output_tokens, 0))
        if output_tokens > 0 and seconds is not None and seconds > 0:
            self.child(self.tokens_per_second, model).observe(output_tokens / seconds)

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


#: the sample periods the device history keeps (24 hours at 15 s)
HISTORY = 5_760


class DeviceMetrics:
    """The compute layer's sampled devices as gauges, named after NVIDIA DCGM's fields where one exists
    (DCGM_FI_DEV_GPU_UTIL, _FB_USED, _FB_FREE, _GPU_TEMP, _POWER_USAGE), in base units (bytes, watts).

    Labels are bounded: ``node`` is a host name; ``gpu`` an index, ``uuid`` and ``model_name`` that GPU's.
    A GPU that stops being read keeps its last values until :meth:`forget_gpus` removes it.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        gpu, node = ("node", "gpu", "uuid", "model_name"), ("node",)

        def gauge(name: str, documentation: str, labels: tuple[str, ...]) -> Gauge:
            return Gauge(f"lamina_device_{name}", documentation, labels, registry=registry)

        self.registry = registry
        self.cpu_load = gauge("cpu_load1", "1-minute load average of the node.", node)
        self.cpu_utilization = gauge(
            "cpu_utilization_percent",
            "Percent of the node's CPU time busy over the last sample period (all its CPUs).",
            node,
        )
        self.cpu_usable = gauge(
            "cpu_usable_cores", "Physical cores this process may run on (its affinity mask).", node
        )
        self.memory_total = gauge("memory_total_bytes", "RAM of the node.", node)
        self.memory_available = gauge("memory_available_bytes", "RAM available to new processes.", node)
        self.gpu_utilization = gauge(
            "gpu_utilization_percent",
            "Percent of the last sample period a kernel ran (DCGM_FI_DEV_GPU_UTIL).",
            gpu,
        )
        self.gpu_memory_used = gauge("gpu_memory_used_bytes", "GPU memory in use (DCGM_FI_DEV_FB_USED).", gpu)
        self.gpu_memory_free = gauge("gpu_memory_free_bytes", "GPU memory free (DCGM_FI_DEV_FB_FREE).", gpu)
        self.gpu_temperature = gauge(
            "gpu_temperature_celsius", "GPU temperature (DCGM_FI_DEV_GPU_TEMP).", gpu
        )
        self.gpu_power = gauge("gpu_power_watts", "GPU power draw (DCGM_FI_DEV_POWER_USAGE).", gpu)
        self.gpu_gauges = (
            self.gpu_utilization,
            self.gpu_memory_used,
            self.gpu_memory_free,
            self.gpu_temperature,
            self.gpu_power,
        )
        #: the label sets of every GPU series set so far
        self._gpus: set[tuple[str, str, str, str]] = set()
        #: the latest sample, for the compute span of each request: node -> (load1, usable cores, CPU
        #: utilisation % or None), and (node, gpu index) -> (model name, utilization %)
        self.nodes: dict[str, tuple[float, int, float | None]] = {}
        self.gpus: dict[tuple[str, str], tuple[str, float | None]] = {}
        #: the utilisation of each sample period, oldest first (a day of them at the default period)
        self.history: deque[DeviceSample] = deque(maxlen=HISTORY)

    def record(self, start: float, end: float, cpu_pct: float | None, gpu_pct: float | None) -> None:
        """One sample period's CPU and mean GPU utilisation (epoch seconds), for the doctor."""
        self.history.append(DeviceSample(start, end, cpu_pct, gpu_pct))

    def set_node(
        self,
        node: str,
        *,
        load1: float,
        usable_cores: int,
        memory_total: int,
        memory_available: int,
        utilization_pct: float | None = None,
    ) -> None:
        self.nodes[node] = (load1, usable_cores, utilization_pct)
        self.cpu_load.labels(node).set(load1)
        if utilization_pct is not None:
            self.cpu_utilization.labels(node).set(utilization_pct)
        self.cpu_usable.labels(node).set(usable_cores)
        self.memory_total.labels(node).set(memory_total)
        self.memory_available.labels(node).set(memory_available)

    def set_gpu(
        self,
        labels: tuple[str, str, str, str],
        *,
        utilization_pct: float | None,
        memory_used: int,
        memory_free: int,
        temperature_c: float | None,
        power_w: float | None,
    ) -> None:
        """One GPU's readings; ``labels`` is (node, gpu index, uuid, model name). A reading the device
        does not give (None) is left unset."""
        self._gpus.add(labels)
        self.gpus[(labels[0], labels[1])] = (labels[3], utilization_pct)
        values = (utilization_pct, memory_used, memory_free, temperature_c, power_w)
        for gauge, value in zip(self.gpu_gauges, values, strict=True):
            if value is not None:
                gauge.labels(*labels).set(value)

    def forget_gpus(self, keep: set[tuple[str, str, str, str]]) -> None:
        """Drop the series of every GPU not in ``keep`` (one that vanished or failed to read)."""
        for labels in self._gpus - keep:
            for gauge in self.gpu_gauges:
                with contextlib.suppress(KeyError):  # a reading the GPU never gave has no series
                    gauge.remove(*labels)
        self._gpus &= keep
        kept = {(labels[0], labels[1]) for labels in keep}
        self.gpus = {k: v for k, v in self.gpus.items() if k in kept}
