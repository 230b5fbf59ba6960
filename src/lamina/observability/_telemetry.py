"""Traces and metrics of one process, kept on one object that the composition root builds and passes in.

OpenTelemetry's global tracer provider is left alone: ``Telemetry`` holds its own ``TracerProvider``, so
two stacks (or two tests) in one process never mix their spans, and nothing depends on import order.
Every span carries ``lamina.layer`` (:data:`LAYER`) with one of the :class:`Layer` names; that attribute
is what lets a trace say which layer a request's time went to.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from enum import StrEnum

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.util.types import AttributeValue
from prometheus_client import CollectorRegistry

from lamina.observability._metrics import GatewayMetrics
from lamina.observability._store_exporter import LAYER, StoreSpanExporter
from lamina.store import Store


class Layer(StrEnum):
    """The value of the ``lamina.layer`` span attribute: which layer of the stack a span's time belongs to."""

    APPLICATION = "application"
    MODELS = "models"
    ORCHESTRATION = "orchestration"
    COMPUTE = "compute"
    DATA = "data"


class Telemetry:
    """A tracer whose spans go to the metadata store and/or an OTLP/HTTP collector, and the gateway metrics.

    Call :meth:`shutdown` when the process stops: it flushes the spans still queued for export.
    """

    def __init__(
        self,
        *,
        service_name: str,
        store: Store | None = None,
        otlp_endpoint: str | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.service_name = service_name
        self._provider = TracerProvider(
            sampler=ALWAYS_ON, resource=Resource({SERVICE_NAME: service_name}), shutdown_on_exit=False
        )
        if store is not None:
            self._provider.add_span_processor(BatchSpanProcessor(StoreSpanExporter(store)))
        if otlp_endpoint:
            # the full signal URL, e.g. http://127.0.0.1:4318/v1/traces (the config documents it so)
            self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
        self.tracer: trace.Tracer = self._provider.get_tracer("lamina")
        self.metrics = GatewayMetrics(registry)

    @contextmanager
    def span(
        self, name: str, layer: Layer, attributes: Mapping[str, AttributeValue] | None = None
    ) -> Iterator[trace.Span]:
        """A child of the current span, tagged with its layer; an exception marks it ERROR and propagates."""
        attrs: dict[str, AttributeValue] = {LAYER: layer.value, **(attributes or {})}
        with self.tracer.start_as_current_span(name, attributes=attrs) as span:
            yield span

    def render_metrics(self) -> tuple[bytes, str]:
        """The Prometheus exposition of the gateway metrics, and its content type."""
        return self.metrics.render()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Export every finished span now; False if an exporter did not finish in time."""
        return self._provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        """Flush and stop the exporters; spans started afterwards are dropped."""
        self._provider.shutdown()
