"""Traces and metrics of one process, kept on one object that the composition root builds and passes in.

OpenTelemetry's global tracer provider is left alone: ``Telemetry`` holds its own tracer, so two stacks
(or two tests) in one process never mix their spans, and nothing depends on import order.
Every span carries ``lamina.layer`` (:data:`LAYER`) with one of the :class:`Layer` names; that attribute
is what lets a trace say which layer a request's time went to.

Every span goes through one :class:`~lamina.observability._keeper.TraceKeeper`: it holds a trace's spans
until its root ends, answers "where did this request's time go" meanwhile, and then keeps the trace (an
error, a slow one, or sampled) for the store and the OTLP exporter, or drops it. With a store, a
background :class:`~lamina.observability._traces.TraceRetention` keeps the stored traces within bounds.
"""

from __future__ import annotations

import functools
import importlib.metadata
import socket
import uuid
from collections.abc import Mapping
from contextlib import AbstractContextManager
from enum import StrEnum

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.util.types import AttributeValue
from prometheus_client import CollectorRegistry

from lamina.config import ObservabilityConfig
from lamina.observability._keeper import TraceKeeper
from lamina.observability._light import LightTracer
from lamina.observability._metrics import DeviceMetrics, GatewayMetrics
from lamina.observability._sampling import SamplingPolicy, TraceSampler
from lamina.observability._store_exporter import LAYER, SpanWriter
from lamina.observability._traces import RetentionPolicy, TraceRetention
from lamina.store import Store


class Layer(StrEnum):
    """The value of the ``lamina.layer`` span attribute: which layer of the stack a span's time belongs to."""

    APPLICATION = "application"
    MODELS = "models"
    ORCHESTRATION = "orchestration"
    COMPUTE = "compute"
    DATA = "data"


@functools.cache
def _version() -> str:
    try:
        return importlib.metadata.version("lamina")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def process_resource(service_name: str) -> Resource:
    """What the exported spans say of the process that made them (OpenTelemetry's resource semantic
    conventions): ``service.name`` (the config's), ``service.version`` (Lamina's), ``service.instance.id``
    (one per process), ``host.name``, the SDK's own attributes, and whatever ``OTEL_RESOURCE_ATTRIBUTES``
    adds (``deployment.environment=prod``, ``k8s.pod.name=...``), as every OpenTelemetry SDK reads it."""
    own = {
        SERVICE_NAME: service_name,
        "service.version": _version(),
        "service.instance.id": uuid.uuid4().hex,
        "host.name": socket.gethostname(),
    }
    return Resource.create(own)


class Telemetry:
    """A tracer whose kept traces go to the metadata store and/or an OTLP/HTTP collector, and the metrics.

    ``tracing=False`` records no spans at all (no breakdown either); ``metrics=False`` counts nothing.
    ``sampling`` decides which finished traces are kept (default: errors, slow ones, and up to 2 others a
    second); ``retention`` bounds what the store holds (default: 7 days, 50,000 traces, 64 MiB). Call
    :meth:`shutdown` when the process stops: it writes the spans still queued and stops the background
    threads.
    """

    def __init__(
        self,
        *,
        service_name: str,
        store: Store | None = None,
        otlp_endpoint: str | None = None,
        registry: CollectorRegistry | None = None,
        tracing: bool = True,
        metrics: bool = True,
        sampling: SamplingPolicy | None = None,
        retention: RetentionPolicy | None = None,
        retention_interval_s: float = 30.0,
    ) -> None:
        self.service_name = service_name
        self.tracing = tracing
        resource = process_resource(service_name)
        self.metrics = GatewayMetrics(registry, enabled=metrics)
        #: the compute layer's sampled devices (gauges, and the latest values for each request's span)
        self.devices = DeviceMetrics(self.metrics.registry)
        #: deployment -> the kind of device its replicas run on (``cpu`` or ``gpu``), set by the stack
        self.device_kinds: dict[str, str] = {}
        sinks: list[SpanProcessor] = []
        if otlp_endpoint:
            # the full signal URL, e.g. http://127.0.0.1:4318/v1/traces (the config documents it so)
            sinks.append(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
        writer = SpanWriter(store) if store is not None and tracing else None
        sampler = TraceSampler(sampling or SamplingPolicy())
        self.keeper = TraceKeeper(
            sampler, writer, sinks, decisions=self.metrics.traffic.traces, resource=resource
        )
        self.retention: TraceRetention | None = None
        if writer is not None and store is not None:
            self.retention = TraceRetention(store, retention or RetentionPolicy())
            self.retention.start(retention_interval_s)
        #: spans as plain records until their trace is kept (``_light.py``); OpenTelemetry's API all the same
        self.tracer = LightTracer(self.keeper, resource, record=tracing)

    @classmethod
    def of(cls, config: ObservabilityConfig, store: Store | None) -> Telemetry:
        """The telemetry the ``observability:`` config section describes, storing spans in ``store``."""
        return cls(
            service_name=config.service_name,
            store=store if config.store_spans else None,
            otlp_endpoint=config.otlp_endpoint,
            tracing=config.tracing,
            metrics=config.metrics,
            sampling=SamplingPolicy(config.sample_rate, config.sampled_per_s, config.slow_ms),
            retention=RetentionPolicy(
                config.retention_max_age_s, config.retention_max_traces, config.retention_max_bytes
            ),
            retention_interval_s=config.retention_interval_s,
        )

    def span(
        self, name: str, layer: Layer, attributes: Mapping[str, AttributeValue] | None = None
    ) -> AbstractContextManager[trace.Span]:
        """A child of the current span, tagged with its layer; an exception marks it ERROR and propagates."""
        attrs: dict[str, AttributeValue] = {LAYER: layer.value, **(attributes or {})}
        return self.tracer.start_as_current_span(name, attributes=attrs)

    def device_span(self, deployment: str) -> dict[str, AttributeValue]:
        """The attributes of a request's compute span: the kind of device ``deployment`` runs on and, from
        the compute layer's latest sample, its node and utilisation (GPUs: their mean; CPU: the busy share
        of the last sample period, or before the first, the 1-minute load over the usable cores)."""
        kind = self.device_kinds.get(deployment, "cpu")
        attrs: dict[str, AttributeValue] = {LAYER: Layer.COMPUTE.value, "lamina.device.kind": kind}
        devices = self.devices
        if kind == "gpu" and devices.gpus:
            used = [u for _, u in devices.gpus.values() if u is not None]
            attrs["lamina.device.name"] = next(iter(devices.gpus.values()))[0]
            if used:
                attrs["lamina.device.utilization_pct"] = round(sum(used) / len(used), 1)
        elif devices.nodes:
            node, (load1, cores, busy) = next(iter(devices.nodes.items()))
            attrs["lamina.device.node"] = node
            if busy is not None:
                attrs["lamina.device.utilization_pct"] = round(busy, 1)
            elif cores > 0:
                attrs["lamina.device.utilization_pct"] = round(min(load1 / cores, 1.0) * 100, 1)
        return attrs

    def render_metrics(self) -> tuple[bytes, str]:
        """The Prometheus exposition of the gateway metrics, and its content type."""
        writer = self.keeper.writer
        if writer is not None:
            self.metrics.traffic.spans_lost.set(writer.dropped + writer.lost)
        return self.metrics.render()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Export every kept trace now; False if an exporter did not finish in time."""
        return self.keeper.force_flush(timeout_millis)

    def shutdown(self) -> None:
        """Flush and stop the exporters and the retention; spans started afterwards are dropped."""
        if self.retention is not None:
            self.retention.stop()
        self.keeper.shutdown()
