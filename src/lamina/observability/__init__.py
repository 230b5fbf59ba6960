"""Across the layers: one trace per request with a span per layer, and the gateway's Prometheus metrics."""

from lamina.observability._metrics import DeviceMetrics, DriftMetrics, GatewayMetrics
from lamina.observability._store_exporter import LAYER, SpanRow, StoreSpanExporter, read_trace
from lamina.observability._telemetry import Layer, Telemetry

__all__ = [
    "LAYER",
    "DeviceMetrics",
    "DriftMetrics",
    "GatewayMetrics",
    "Layer",
    "SpanRow",
    "StoreSpanExporter",
    "Telemetry",
    "read_trace",
]
