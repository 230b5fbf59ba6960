"""Across the layers: one trace per request with a span per layer, and the gateway's Prometheus metrics."""

from lamina.observability._breakdown import LAYERS, Breakdown, parse_header
from lamina.observability._caller import LOCAL_TRACE_ID, caller_of
from lamina.observability._doctor import (
    BudgetState,
    DatasetState,
    DeploymentState,
    DoctorInputs,
    DriftState,
    Finding,
    Verdict,
    diagnose,
    period_of,
)
from lamina.observability._light import LightSpan
from lamina.observability._metrics import DeviceMetrics, DriftMetrics, GatewayMetrics
from lamina.observability._open_trace import Deferred, OpenTrace
from lamina.observability._sampling import Kept, SamplingPolicy, TraceSampler
from lamina.observability._serving_metrics import ModelSeries
from lamina.observability._store_exporter import LAYER, SpanRow, StoreSpanExporter, check_trace_id, read_trace
from lamina.observability._telemetry import Layer, Telemetry
from lamina.observability._trace_views import (
    TraceLine,
    TreeSpan,
    layer_times_ms,
    recent_traces,
    summarize,
    trace_json,
    tree,
)
from lamina.observability._traces import (
    Pruned,
    RetentionPolicy,
    TraceRetention,
    TraceSummary,
    list_traces,
    read_summary,
)
from lamina.observability._utilisation import DeviceSample, DeviceState

__all__ = [
    "LAYER",
    "LAYERS",
    "LOCAL_TRACE_ID",
    "Breakdown",
    "BudgetState",
    "DatasetState",
    "Deferred",
    "DeploymentState",
    "DeviceMetrics",
    "DeviceSample",
    "DeviceState",
    "DoctorInputs",
    "DriftMetrics",
    "DriftState",
    "Finding",
    "GatewayMetrics",
    "Kept",
    "Layer",
    "LightSpan",
    "ModelSeries",
    "OpenTrace",
    "Pruned",
    "RetentionPolicy",
    "SamplingPolicy",
    "SpanRow",
    "StoreSpanExporter",
    "Telemetry",
    "TraceLine",
    "TraceRetention",
    "TraceSampler",
    "TraceSummary",
    "TreeSpan",
    "Verdict",
    "caller_of",
    "check_trace_id",
    "diagnose",
    "layer_times_ms",
    "list_traces",
    "parse_header",
    "period_of",
    "read_summary",
    "read_trace",
    "recent_traces",
    "summarize",
    "trace_json",
    "tree",
]
