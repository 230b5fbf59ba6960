"""Every answer says where its time went, per layer, and the store keeps only the traces worth keeping.

One `lamina up` process (fake engine, 10 ms a token) serves the module. Its sampler keeps no ordinary
trace (``sample_rate: 0``) but keeps every error and every request slower than 300 ms, and its retention
runs every second, so each behaviour shows within a test's time.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert

from lamina.observability import LAYERS, list_traces, parse_header, read_summary, read_trace
from lamina.observability._breakdown import Timed, breakdown
from lamina.store import Store, spans, traces
from tests.support import RunningStack, start_stack, stop_stack

pytestmark = pytest.mark.slow

CONFIG = """
register_bundled: false
observability:
  sample_rate: 0.0
  slow_ms: 300
  retention_interval_s: 1
  retention_max_age_s: 86400
deployments:
  - name: echo
    engine: fake
    fake:
      mode: echo
      seconds_per_token: 0.01
"""
SLOW = " ".join(["word"] * 60)  # 60+ tokens at 10 ms: about 0.6 s, slow
FAST = "hi"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    running = start_stack(tmp_path_factory.mktemp("breakdown"), CONFIG, timeout_s=120)
    yield running
    assert stop_stack(running) == []


@pytest.fixture(scope="module")
def store(stack: RunningStack) -> Iterator[Store]:
    s = Store(f"sqlite:///{stack.state_dir / 'lamina.db'}")
    yield s
    s.close()


def _chat(stack: RunningStack, text: str, **extra: object) -> httpx.Response:
    body = {"model": "echo", "messages": [{"role": "user", "content": text}], **extra}
    r = httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=60)
    return r


def _stored(store: Store, trace_id: str, timeout_s: float = 10.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        summary = read_summary(store, trace_id)
        if summary is not None:
            return dict(summary)
        time.sleep(0.1)
    raise AssertionError(f"trace {trace_id} was not stored within {timeout_s} s")


def test_a_plain_answer_carries_its_breakdown_and_the_store_agrees(stack: RunningStack, store: Store) -> None:
    r = _chat(stack, SLOW)
    assert r.status_code == 200, r.text
    header = parse_header(r.headers["x-lamina-layers"])
    assert list(header) == list(LAYERS)
    ext = r.json()["lamina"]
    assert ext["bottleneck"] == "models" and set(ext["layers"]) == set(LAYERS)
    assert header["models"] >= 500 and sum(header.values()) >= ext["total_ms"] * 0.99
    summary = _stored(store, r.headers["x-lamina-trace-id"])
    assert summary["kept"] == "slow" and summary["bottleneck"] == "models" and summary["model"] == "echo"
    layers = summary["layers"]
    assert isinstance(layers, dict)
    # models, data, orchestration were done before the response started: the header's numbers are final
    for layer in ("data", "models", "orchestration", "compute"):
        assert layers[layer] == pytest.approx(header[layer], abs=0.002), layer
    rows = read_trace(store, r.headers["x-lamina-trace-id"])
    names = {row["name"] for row in rows}
    assert {"route", "dispatch", "engine", "queue", "prefill", "decode", "device"} <= names
    root = next(row for row in rows if row["parent_span_id"] is None)
    assert root["attributes"]["gen_ai.usage.output_tokens"] >= 60
    assert root["attributes"]["lamina.bottleneck"] == "models"
    device = next(row for row in rows if row["name"] == "device")
    assert device["layer"] == "compute" and device["attributes"]["lamina.device.kind"] == "cpu"
    # the stored summary is the stored spans' self time per layer
    timed = [
        Timed(
            int(row["span_id"], 16),
            int(row["parent_span_id"], 16) if row["parent_span_id"] else None,
            row["layer"],
            row["start_ns"],
            row["end_ns"],
        )
        for row in rows
    ]
    assert breakdown(timed, int(root["span_id"], 16), 0).layers == layers


def test_a_stream_ends_with_the_breakdown(stack: RunningStack) -> None:
    for usage in (False, True):
        r = _chat(stack, "one two three", stream=True, stream_options={"include_usage": usage})
        assert r.status_code == 200 and parse_header(r.headers["x-lamina-layers"])
        events = [e.removeprefix("data: ") for e in r.text.strip().split("\n\n")]
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert last["lamina"]["bottleneck"] == "models", last
        assert last["lamina"]["layers"]["models"] >= 30  # three tokens and more at 10 ms
        if usage:
            assert last["choices"] == [] and last["usage"]["completion_tokens"] >= 3
        else:
            assert last["choices"] == [{"index": 0, "delta": {}, "finish_reason": None}]
        text = "".join(
            c["choices"][0]["delta"].get("content", "") for c in map(json.loads, events[:-2]) if c["choices"]
        )
        assert text == "one two three"


def test_ordinary_traces_are_sampled_out_but_errors_and_slow_ones_are_kept(
    stack: RunningStack, store: Store
) -> None:
    fast = [_chat(stack, FAST) for _ in range(5)]
    assert all(r.status_code == 200 and "x-lamina-layers" in r.headers for r in fast)
    failed = _chat(stack, FAST, model="no-such-model")
    assert failed.status_code == 404
    slow = _chat(stack, SLOW)
    assert _stored(store, failed.headers["x-lamina-trace-id"])["kept"] == "error"
    assert _stored(store, slow.headers["x-lamina-trace-id"])["kept"] == "slow"
    for r in fast:  # written before the slow one, had they been kept (one writer, in order)
        trace_id = r.headers["x-lamina-trace-id"]
        assert read_summary(store, trace_id) is None and read_trace(store, trace_id) == []
    metrics = httpx.get(f"{stack.base_url}/metrics", timeout=10).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
    }
    assert samples[("lamina_traces_total", (("decision", "dropped"),))] >= 5
    assert samples[("lamina_request_queue_time_seconds_count", (("model", "echo"),))] >= 7
    assert samples[("lamina_inter_token_latency_seconds_count", (("model", "echo"),))] >= 1
    assert samples[("lamina_layer_seconds_total", (("layer", "models"),))] > 0.5
    checked = subprocess.run(["promtool", "check", "metrics"], input=metrics, capture_output=True, text=True)
    assert checked.returncode == 0 and not checked.stdout.strip(), checked.stdout + checked.stderr


def test_retention_deletes_traces_older_than_the_limit(stack: RunningStack, store: Store) -> None:
    old = time.time_ns() - 2 * 86400 * 10**9  # two days; the limit is one
    with store.begin() as conn:
        conn.execute(
            insert(traces),
            {
                "trace_id": "f" * 32,
                "start_ns": old,
                "duration_ms": 1.0,
                "status": "ok",
                "http_status": 200,
                "route": "/v1/chat/completions",
                "model": "echo",
                "layers": {},
                "bottleneck": None,
                "kept": "sampled",
                "span_count": 1,
                "size_bytes": 200,
            },
        )
        conn.execute(
            insert(spans),
            {
                "span_id": "f" * 16,
                "trace_id": "f" * 32,
                "parent_span_id": None,
                "name": "POST /v1/chat/completions",
                "layer": "application",
                "start_ns": old,
                "end_ns": old + 10**6,
                "status": "unset",
                "attributes": {},
            },
        )
    recent = len(list_traces(store, limit=1000))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and read_trace(store, "f" * 32):
        time.sleep(0.2)
    assert read_trace(store, "f" * 32) == [] and read_summary(store, "f" * 32) is None
    assert len(list_traces(store, limit=1000)) == recent - 1  # the recent ones stay
