"""The request path's telemetry at its cheapest: lock-free series, batched counting, and the gateway's
steps made spans only when their trace is kept (observability/_fast_metrics.py, _request_fold.py;
application/_exchange_spans.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from lamina.application._exchange_spans import DispatchStep
from lamina.application._tracing import Exchange
from lamina.observability import LAYER, SamplingPolicy, Telemetry, read_trace
from lamina.observability._fast_metrics import Buckets, FastMetrics
from lamina.observability._request_fold import BATCH
from lamina.store import Store
from tests.support.gateway import LAMINA


def _samples(text: bytes) -> list[str]:
    """The exposition without comments and prometheus_client's ``_created`` samples."""
    return [
        line
        for line in text.decode().splitlines()
        if line and not line.startswith("#") and "_created" not in line
    ]


def test_fast_series_render_as_prometheus_client_renders_the_same_updates() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = FastMetrics(ours)
    buckets = (0.01, 0.1, 1.0, 10.0)
    counter = Counter("x_requests", "h", ("model",), registry=theirs)
    gauge = Gauge("x_running", "h", ("model",), registry=theirs)
    histogram = Histogram("x_seconds", "h", ("model",), buckets=buckets, registry=theirs)
    fast_counter = fast.counter("x_requests", "h", ("model",))
    fast_gauge = fast.gauge("x_running", "h", ("model",))
    fast_histogram = fast.histogram("x_seconds", "h", ("model",), buckets)
    for model, amount in (("m", 3.0), ("n", 1.0)):
        counter.labels(model).inc(amount)
        fast_counter.labels(model).inc(amount)
        gauge.labels(model).inc(amount)
        fast_gauge.labels(model).inc(amount)
    gauge.labels("m").dec()
    fast_gauge.labels("m").dec()
    for value in (0.01, 0.05, 1.0, 99.0):  # 0.01 and 1.0 sit on a bound: in its bucket (le)
        histogram.labels("m").observe(value)
        fast_histogram.labels("m").observe(value)
    assert sorted(_samples(generate_latest(ours))) == sorted(_samples(generate_latest(theirs)))


def test_a_histogram_takes_a_batch_as_it_takes_each_value() -> None:
    """A batch of more than a few values is bisected and tallied with numpy: the same buckets (a value on
    a bound is in that bound's bucket) and the same sum as one value at a time."""
    bounds = (0.01, 0.1, 1.0, 10.0)
    values = [0.01, 1.0, 10.0, 10.5, *[i / 7 for i in range(-3, 40)]]
    one, batch, few = Buckets(bounds), Buckets(bounds), Buckets(bounds)
    for value in values:
        one.observe(value)
    batch.observe_many(values)
    few.observe_many(values[:3])
    assert batch.counts == one.counts and batch.sum == pytest.approx(one.sum, rel=1e-12)
    assert few.counts == [1, 0, 1, 1, 0]


def _chat(telemetry: Telemetry, model: str = "chat") -> Exchange:
    """One chat request's telemetry as the gateway drives it, replied with tests.support's extension."""
    root = telemetry.tracer.start_root("POST /v1/chat/completions", {LAYER: "application"})
    exchange = Exchange(telemetry, root, "/v1/chat/completions")
    with trace.use_span(root):
        exchange.bind(SimpleNamespace(deployment=model, served_name=model, model_version=f"{model}@1"))
        with exchange.dispatch_span(model) as (span, _):
            usage = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
            time.sleep(0.005)  # the replica's work: all of the dispatch (its clock is the same host's)
            start = span.start_ns  # type: ignore[attr-defined]
            ext = {**LAMINA, "start_ns": start, "end_ns": time.time_ns(), "queue_ms": 0.0}
            exchange.record_reply({"model": model, "usage": usage, "lamina": ext}, span)
        exchange.answer({"id": "x"}, {})
    exchange.finish(200)
    return exchange


def test_finished_requests_are_counted_when_scraped_and_every_batch() -> None:
    telemetry = Telemetry(service_name="t")
    metrics = telemetry.metrics
    _chat(telemetry)
    assert len(metrics.finished.pending) == 1  # not counted yet: nothing read the series
    text = telemetry.render_metrics()[0].decode()
    assert metrics.finished.pending == []
    assert 'lamina_requests_total{endpoint="/v1/chat/completions",model="chat",status="200"} 1.0' in text
    assert 'lamina_output_tokens_total{model="chat"} 3.0' in text
    assert 'lamina_request_queue_time_seconds_count{model="chat"} 1.0' in text
    assert 'lamina_bottleneck_requests_total{layer="models"} 1.0' in text
    assert 'lamina_requests_in_flight{model="chat"} 0.0' in text  # the live gauges: at once
    metrics.record(("", "/v1/chat/completions", 404, 0.001, [], None, None, None))  # never routed
    text = telemetry.render_metrics()[0].decode()
    assert 'lamina_requests_total{endpoint="/v1/chat/completions",model="",status="404"} 1.0' in text
    unrouted = [line.split("{")[0] for line in text.splitlines() if 'model=""' in line]
    assert {
        name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum") for name in unrouted
    } == {
        "lamina_requests_total",
        "lamina_request_duration_seconds",
    }  # no per-model series for it
    assert 'lamina_bottleneck_requests_total{layer="orchestration"}' not in text  # only layers that led
    for _ in range(BATCH):
        _chat(telemetry)
    assert len(metrics.finished.pending) < BATCH  # a full batch was counted without a scrape
    assert metrics.registry.get_sample_value("lamina_input_tokens_total", {"model": "chat"}) == 9.0 * (
        BATCH + 1
    )
    telemetry.shutdown()


def test_a_batch_counts_each_reply_as_it_reported_itself() -> None:
    """The tally of a batch: numbers only (a bool or a string is no figure), a prefill only with a queue
    and a first token, a decode only with the engine's time too, cached tokens capped by the prompt."""
    telemetry = Telemetry(service_name="t")
    metrics = telemetry.metrics
    full = (
        {"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 40}},
        {"queue_ms": 2.0, "ttft_ms": 12.0, "engine_ms": 50.0},
    )
    odd = ({"prompt_tokens": True, "completion_tokens": "7"}, {"queue_ms": -1.0, "ttft_ms": 3.0})
    no_engine = ({"prompt_tokens": 4.0, "completion_tokens": 1}, {"queue_ms": 0.5, "ttft_ms": 1.5})
    for model, replies in (("a", [full, odd]), ("a", [no_engine]), ("b", [full])):
        metrics.record((model, "/v1/chat/completions", 200, 0.25, replies, (0, 0, 7, 7, 0), "hit", None))
    metrics.record(("a", None, 429, 0.001, [], None, None, "key requests"))

    def value(name: str, **labels: str) -> float | None:
        telemetry.render_metrics()  # the scrape folds the batch
        return metrics.registry.get_sample_value(name, labels)

    assert value("lamina_input_tokens_total", model="a") == 14.0
    assert value("lamina_output_tokens_total", model="a") == 6.0
    assert value("lamina_prefix_cache_queries_total", model="a") == 10.0
    assert value("lamina_prefix_cache_hits_total", model="a") == 10.0  # 40 cached of a 10-token prompt
    assert value("lamina_request_queue_time_seconds_count", model="a") == 2.0  # -1 ms is no wait
    assert value("lamina_request_prefill_time_seconds_sum", model="a") == 0.01 + 0.001
    assert value("lamina_request_decode_time_seconds_count", model="a") == 1.0
    assert value("lamina_request_decode_time_seconds_sum", model="a") == 0.04
    assert value("lamina_inter_token_latency_seconds_sum", model="a") == 0.04 / 4
    assert value("lamina_tokens_per_second_sum", model="a") == 100.0
    assert value("lamina_e2e_request_latency_seconds_count", model="a") == 2.0  # the 429 has no endpoint
    assert value("lamina_requests_total", endpoint="/v1/chat/completions", model="a", status="200") == 2.0
    assert value("lamina_request_duration_seconds_sum", endpoint="/v1/chat/completions", model="b") == 0.25
    assert value("lamina_bottleneck_requests_total", layer="models") == 3.0  # the first of equals
    assert value("lamina_layer_seconds_total", layer="orchestration") == 21e-6
    assert value("lamina_cache_requests_total", result="hit") == 3.0
    assert value("lamina_rate_limited_requests_total", limit="key requests") == 1.0
    telemetry.shutdown()


def test_a_streams_final_event_repeats_the_replicas_fields_as_json() -> None:
    telemetry = Telemetry(service_name="t")
    root = telemetry.tracer.start_root("POST /v1/chat/completions", {LAYER: "application"})
    exchange = Exchange(telemetry, root, "/v1/chat/completions")
    for chunk, choice in (
        ({"id": 'é"1\n', "object": "chat.completion.chunk", "created": 17, "model": "m", "x": 1}, "delta"),
        ({"object": "text_completion", "created": 1.5, "model": None}, "text"),
        ({"id": True, "model": ["odd"]}, "delta"),
    ):
        exchange.reported = None
        raw = exchange.final_event(chunk)
        assert raw.startswith(b"data: ") and raw.endswith(b"\n\n")
        event = json.loads(raw[6:])
        assert {k: v for k, v in event.items() if k not in ("choices", "lamina")} == {
            k: v for k, v in chunk.items() if k != "x"
        }
        assert event["choices"] == [
            {"index": 0, choice: {} if choice == "delta" else "", "finish_reason": None}
        ]
        assert set(event["lamina"]) == {"layers", "bottleneck", "total_ms"}
    telemetry.shutdown()


def _keeping_every_trace(tmp_path: Path) -> tuple[Store, Telemetry, trace.Span, Exchange]:
    """A store, telemetry that keeps every trace in it, and one chat request's root and exchange."""
    store = Store(f"sqlite:///{tmp_path / 'l.db'}")
    store.migrate()
    telemetry = Telemetry(service_name="t", store=store, sampling=SamplingPolicy(1.0, 1000.0))
    root = telemetry.tracer.start_root("POST /v1/chat/completions", {LAYER: "application"})
    return store, telemetry, root, Exchange(telemetry, root, "/v1/chat/completions")


def test_a_kept_streams_root_records_its_time_to_first_token(tmp_path: Path) -> None:
    store, telemetry, root, exchange = _keeping_every_trace(tmp_path)
    with trace.use_span(root):
        exchange.bind(SimpleNamespace(deployment="chat", served_name="chat", model_version="chat@1"))
        time.sleep(0.002)
        exchange.first_token()
        exchange.first_token()  # once per request
    exchange.finish(200)
    assert telemetry.force_flush()
    spans = {s["name"]: s for s in read_trace(store, exchange.trace_id)}
    assert spans["POST /v1/chat/completions"]["attributes"]["lamina.gateway_ttft_ms"] >= 2.0
    count = telemetry.metrics.registry.get_sample_value(
        "lamina_time_to_first_token_seconds_count", {"model": "chat"}
    )
    assert count == 1.0
    telemetry.shutdown()
    store.close()


def test_a_kept_traces_steps_become_spans_under_the_right_parents(tmp_path: Path) -> None:
    store, telemetry, root, exchange = _keeping_every_trace(tmp_path)
    replica = SimpleNamespace(replica_id="r0", url="u", attempts=2, response=httpx.Response(502))
    with (
        trace.use_span(root),
        telemetry.tracer.start_as_current_span("attempt", attributes={LAYER: "models"}),  # a group's try
        exchange.dispatch_span("chat") as (span, headers),
    ):
        assert isinstance(span, DispatchStep)
        assert headers["traceparent"].split("-")[1:3] == [exchange.trace_id, f"{span.span_id:016x}"]
        exchange.dispatched(span, replica)
        span.set_status(trace.Status(trace.StatusCode.ERROR, "HTTP 502"))
    exchange.finish(502)
    assert telemetry.force_flush()
    spans = {s["name"]: s for s in read_trace(store, exchange.trace_id)}
    assert spans["dispatch"]["parent_span_id"] == spans["attempt"]["span_id"]
    assert spans["dispatch"]["status"] == "error" and spans["dispatch"]["layer"] == "orchestration"
    assert spans["dispatch"]["attributes"]["lamina.dispatch.attempts"] == 2
    assert spans["POST /v1/chat/completions"]["status"] == "error"
    telemetry.shutdown()
    store.close()
