"""Request-shaped traces for the tests of trace storage and retention."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from lamina.observability import LAYER


def chat_trace(tracer: trace.Tracer, i: int) -> str:
    """A chat request's spans (eight, with attributes of the real ones' size); every tenth one failed."""
    with tracer.start_as_current_span("POST /v1/chat/completions", attributes={LAYER: "application"}) as root:
        root.set_attributes(
            {
                "http.route": "/v1/chat/completions",
                "gen_ai.request.model": "chat",
                "lamina.deployment": "chat",
                "gen_ai.usage.input_tokens": 41,
                "gen_ai.usage.output_tokens": 8,
                "http.response.status_code": 500 if i % 10 == 0 else 200,
            }
        )
        for layer, name in [("models", "route"), ("orchestration", "dispatch"), ("models", "engine")]:
            with tracer.start_as_current_span(name, attributes={LAYER: layer, "lamina.replica.id": "chat-0"}):
                pass
        for name in ("queue", "prefill", "decode", "device"):
            with tracer.start_as_current_span(name, attributes={LAYER: "models", "lamina.queue_ms": 0.1}):
                pass
        if i % 10 == 0:
            root.set_status(Status(StatusCode.ERROR, "engine_error: test"))
        return format(root.get_span_context().trace_id, "032x")
