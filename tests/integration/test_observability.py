"""Spans reach the metadata store (and an OTLP/HTTP collector); metrics render as Prometheus text."""

from __future__ import annotations

import importlib.metadata
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from prometheus_client import CollectorRegistry

from lamina.application import GatewayDeps, create_app
from lamina.observability import (
    LAYER,
    LOCAL_TRACE_ID,
    Layer,
    SamplingPolicy,
    StoreSpanExporter,
    Telemetry,
    read_trace,
)
from lamina.observability._light import LightSpan
from lamina.store import Store
from tests.support.gateway import CHAT, ReplayDispatcher, StaticCatalog


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'lamina.db'}")
    s.migrate()
    yield s
    s.close()


@pytest.fixture
def telemetry(store: Store) -> Iterator[Telemetry]:
    t = Telemetry(service_name="lamina-test", store=store, otlp_endpoint=None)
    yield t
    t.shutdown()


def _one_request_trace(t: Telemetry) -> str:
    with t.span("POST /v1/chat/completions", Layer.APPLICATION) as root:
        root.set_attributes(
            {"gen_ai.operation.name": "chat", "gen_ai.request.model": "m", "gen_ai.usage.output_tokens": 7}
        )
        with t.span("route", Layer.MODELS):
            pass
        with t.span("dispatch", Layer.ORCHESTRATION, {"lamina.replica.id": "r1"}) as dispatch:
            parent = trace.set_span_in_context(dispatch)
            engine = t.tracer.start_span("engine", parent, attributes={LAYER: "models"}, start_time=1_000)
            engine.end(2_000)
        with pytest.raises(ValueError), t.span("data", Layer.DATA):
            raise ValueError("a failing step")
        return format(root.get_span_context().trace_id, "032x")


def test_spans_reach_the_store_with_layers_and_attributes(telemetry: Telemetry, store: Store) -> None:
    trace_id = _one_request_trace(telemetry)
    assert telemetry.force_flush()
    rows = {r["name"]: r for r in read_trace(store, trace_id)}
    assert set(rows) == {"POST /v1/chat/completions", "route", "dispatch", "engine", "data"}
    root = rows["POST /v1/chat/completions"]
    assert root["parent_span_id"] is None and root["layer"] == "application"
    assert root["attributes"]["gen_ai.request.model"] == "m"
    assert root["attributes"]["gen_ai.usage.output_tokens"] == 7
    assert {r["layer"] for r in rows.values()} == {"application", "models", "orchestration", "data"}
    assert rows["route"]["parent_span_id"] == root["span_id"]
    assert rows["engine"]["parent_span_id"] == rows["dispatch"]["span_id"]
    assert (rows["engine"]["start_ns"], rows["engine"]["end_ns"]) == (1_000, 2_000)
    assert rows["dispatch"]["attributes"]["lamina.replica.id"] == "r1"
    assert rows["data"]["status"] == "error" and rows["route"]["status"] == "unset"
    assert all(r["trace_id"] == trace_id for r in rows.values())


def test_read_trace_of_an_unknown_id_is_empty(store: Store) -> None:
    assert read_trace(store, "0" * 32) == []


def test_a_store_without_the_spans_table_loses_the_batch_without_raising(tmp_path: Path) -> None:
    bare = Store(f"sqlite:///{tmp_path / 'bare.db'}")  # never migrated
    t = Telemetry(service_name="t", store=None, otlp_endpoint=None)
    span = t.tracer.start_span("y")
    span.end()
    assert isinstance(span, LightSpan)
    readable = span.readable(t.keeper.resource, t.keeper.scope)
    assert isinstance(readable, ReadableSpan)
    assert StoreSpanExporter(bare).export([readable]) is SpanExportResult.FAILURE
    t.shutdown()
    bare.close()


def test_telemetry_leaves_the_global_tracer_provider_alone(store: Store) -> None:
    before = trace.get_tracer_provider()
    t = Telemetry(service_name="t", store=store, otlp_endpoint=None)
    assert trace.get_tracer_provider() is before
    t.shutdown()


def test_metrics_off_count_nothing() -> None:
    t = Telemetry(service_name="t", store=None, otlp_endpoint=None, metrics=False)
    m = t.metrics
    m.observe_request(endpoint="/v1/chat/completions", model="chat", status=200, seconds=0.2)
    m.observe_guard(guard="pii", action="allow", direction="input")
    m.child(m.in_flight, "chat").inc()
    text = t.render_metrics()[0].decode()
    assert "lamina_requests_total{" not in text and "lamina_guard_decisions_total{" not in text
    assert "# TYPE lamina_requests_total counter" in text  # the series are declared, empty
    t.shutdown()


def test_metrics_render_every_series() -> None:
    t = Telemetry(service_name="t", store=None, otlp_endpoint=None)
    m = t.metrics
    m.observe_request(endpoint="/v1/chat/completions", model="chat", status=200, seconds=0.2)
    m.observe_first_token(model="chat", seconds=0.05)
    m.observe_tokens(model="chat", input_tokens=12, output_tokens=30, seconds=0.5)
    m.in_flight.labels("chat").inc()
    payload, content_type = t.render_metrics()
    text = payload.decode()
    assert content_type.startswith("text/plain")
    assert 'lamina_requests_total{endpoint="/v1/chat/completions",model="chat",status="200"} 1.0' in text
    assert 'lamina_request_duration_seconds_count{endpoint="/v1/chat/completions",model="chat"} 1.0' in text
    assert 'lamina_time_to_first_token_seconds_count{model="chat"} 1.0' in text
    assert 'lamina_tokens_per_second_sum{model="chat"} 60.0' in text
    assert 'lamina_input_tokens_total{model="chat"} 12.0' in text
    assert 'lamina_output_tokens_total{model="chat"} 30.0' in text
    assert 'lamina_requests_in_flight{model="chat"} 1.0' in text
    t.shutdown()


def test_each_telemetry_counts_on_its_own_registry() -> None:
    registry = CollectorRegistry()
    a = Telemetry(service_name="a", store=None, otlp_endpoint=None, registry=registry)
    b = Telemetry(service_name="b", store=None, otlp_endpoint=None)
    a.metrics.observe_request(endpoint="/v1/embeddings", model="e", status=200, seconds=0.1)
    assert a.metrics.registry is registry
    assert b"/v1/embeddings" in a.render_metrics()[0]
    assert b"/v1/embeddings" not in b.render_metrics()[0]
    a.shutdown()
    b.shutdown()


class _Collector(BaseHTTPRequestHandler):
    """A stand-in OTLP/HTTP collector: keeps what it is sent."""

    received: list[tuple[str, str, bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        self.received.append((self.path, self.headers.get("content-type", ""), body))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    received: list[tuple[str, str, bytes]] = []
    handler = type("Handler", (_Collector,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces", received
    server.shutdown()
    server.server_close()
    thread.join()


def test_spans_go_to_the_otlp_endpoint_when_one_is_given(
    collector: tuple[str, list[tuple[str, str, bytes]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint, received = collector
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=staging,k8s.pod.name=gw-1")
    t = Telemetry(service_name="lamina-otlp", store=None, otlp_endpoint=endpoint)
    with t.span("dispatch", Layer.ORCHESTRATION):
        pass
    assert t.force_flush()
    t.shutdown()
    assert received, "the collector got nothing"
    path, content_type, body = received[0]
    assert path == "/v1/traces" and content_type == "application/x-protobuf"
    request = ExportTraceServiceRequest.FromString(body)
    spans = [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert [s.name for s in spans] == ["dispatch"]
    attrs = {a.key: a.value.string_value for a in spans[0].attributes}
    assert attrs[LAYER] == "orchestration"
    resource = {a.key: a.value.string_value for a in request.resource_spans[0].resource.attributes}
    assert resource["service.name"] == "lamina-otlp"
    assert resource["service.version"] == importlib.metadata.version("lamina")
    assert resource["host.name"] == socket.gethostname() and len(resource["service.instance.id"]) == 32
    assert (resource["deployment.environment"], resource["k8s.pod.name"]) == ("staging", "gw-1")


CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def _exported(body: bytes) -> list[Any]:
    request = ExportTraceServiceRequest.FromString(body)
    return [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]


def test_a_request_with_a_traceparent_is_exported_in_the_callers_trace(
    collector: tuple[str, list[tuple[str, str, bytes]]], store: Store
) -> None:
    """The store keeps the request as the gateway's own trace (the header's id, its root without a parent);
    what goes over OTLP joins the caller's trace, under the caller's span. The caller sampled it (flag 01):
    kept although ordinary traces are not (sampled_per_s 0); without a traceparent it is not."""
    endpoint, received = collector
    t = Telemetry(service_name="gw", store=store, otlp_endpoint=endpoint, sampling=SamplingPolicy(per_s=0.0))
    deps = GatewayDeps(StaticCatalog(), ReplayDispatcher(), lambda: {CHAT: True}, t)
    body = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}]}
    with TestClient(create_app(deps), base_url="http://127.0.0.1") as client:
        joined = client.post(
            "/v1/chat/completions", json=body, headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
        )
        alone = client.post("/v1/chat/completions", json=body)
    assert t.force_flush()
    t.shutdown()
    own = joined.headers["x-lamina-trace-id"]
    assert own != CALLER_TRACE  # the gateway's own id: one request, one trace in its store
    spans = [s for _, _, b in received for s in _exported(b)]
    assert spans and {s.trace_id.hex() for s in spans} == {CALLER_TRACE}  # the ordinary one was not kept
    ids = {s.span_id for s in spans}
    (root,) = [s for s in spans if s.parent_span_id not in ids]
    assert root.parent_span_id.hex() == CALLER_SPAN and root.name == "POST /v1/chat/completions"
    attrs = {a.key: a.value.string_value for a in root.attributes}
    assert attrs[LOCAL_TRACE_ID] == own and attrs["lamina.caller.traceparent"].startswith("00-4bf9")
    assert len(spans) > 3  # the gateway's steps came along
    stored = read_trace(store, own)
    assert [r["name"] for r in stored if r["parent_span_id"] is None] == ["POST /v1/chat/completions"]
    assert not read_trace(store, alone.headers["x-lamina-trace-id"])
