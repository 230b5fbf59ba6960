"""The gateway over ASGI: a catalog and a dispatcher that answer in the replica wire format.

The dispatcher here implements the gateway's Dispatcher port and answers with real ``httpx.Response``
objects shaped exactly like a replica worker's (bodies with the ``lamina`` extension; SSE streams that end
with a usage chunk and ``[DONE]``), so everything from parsing to relaying to telemetry runs for real.
"""

from __future__ import annotations

import gc
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI

from lamina.application import GatewayDeps, create_app
from lamina.errors import NoReadyReplicaError
from lamina.observability import Telemetry, read_trace
from lamina.store import Store
from tests.support import (
    CHAT,
    EMBED,
    LAMINA,
    PLAIN,
    ReplayDispatcher,
    StaticCatalog,
    chat_events,
    chat_scope,
    client_leaving,
    events_of,
    split,
    sse,
    stalled_stream,
    trickle,
)

pytestmark = pytest.mark.anyio


# --- the gateway under test ---------------------------------------------------------------------------


@dataclass
class Gateway:
    app: FastAPI
    client: httpx.AsyncClient
    dispatcher: ReplayDispatcher
    telemetry: Telemetry
    store: Store
    ready: dict[str, bool]

    def metrics(self) -> str:
        return self.telemetry.render_metrics()[0].decode()


def _build(
    tmp_path: Path, api_keys: Sequence[str] = ()
) -> tuple[FastAPI, ReplayDispatcher, Telemetry, Store, dict[str, bool]]:
    store = Store(f"sqlite:///{tmp_path / 'lamina.db'}")
    store.migrate()
    telemetry = Telemetry(service_name="gateway-test", store=store, otlp_endpoint=None)
    dispatcher, ready = ReplayDispatcher(), {CHAT: True, EMBED: True}
    deps = GatewayDeps(StaticCatalog(), dispatcher, lambda: ready, telemetry, api_keys)
    return create_app(deps), dispatcher, telemetry, store, ready


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gateway]:
    app, dispatcher, telemetry, store, ready = _build(tmp_path)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        yield Gateway(app, client, dispatcher, telemetry, store, ready)
    telemetry.shutdown()
    store.close()


def chat(model: str = CHAT, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def error_of(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"], dict)
    return body["error"]


# --- the OpenAI API -----------------------------------------------------------------------------------


async def test_models_lists_the_catalog(gw: Gateway) -> None:
    r = await gw.client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [CHAT, EMBED, PLAIN]
    assert body["data"][1]["capabilities"] == ["embedding"]
    one = await gw.client.get(f"/v1/models/{CHAT}@1")
    assert one.status_code == 200 and one.json()["id"] == CHAT
    assert error_of(await gw.client.get("/v1/models/gpt-17"))["code"] == "model_not_found"


async def test_chat_forwards_the_clients_body_and_strips_the_extension(gw: Gateway) -> None:
    r = await gw.client.post("/v1/chat/completions", json=chat(f"{CHAT}@1", user="u-1", max_tokens=5))
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body["lamina"]) == {"layers", "bottleneck", "total_ms"}  # the gateway's, not the replica's
    assert body["choices"][0]["message"]["content"] == "Hello world"
    assert body["usage"]["completion_tokens"] == 2
    [sent] = gw.dispatcher.sent
    assert (sent.deployment, sent.path) == (CHAT, "/v1/chat/completions")
    assert sent.body == {**chat(CHAT), "user": "u-1", "max_tokens": 5}
    trace_id = r.headers["x-lamina-trace-id"]
    assert len(trace_id) == 32 and trace_id in sent.headers["traceparent"]


async def test_completion(gw: Gateway) -> None:
    r = await gw.client.post("/v1/completions", json={"model": CHAT, "prompt": "The sky is"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == " blue" and "start_ns" not in r.json()["lamina"]


async def test_embeddings(gw: Gateway) -> None:
    r = await gw.client.post("/v1/embeddings", json={"model": EMBED, "input": ["a text"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["data"][0]["embedding"] == [0.6, 0.8] and "start_ns" not in body["lamina"]
    assert gw.dispatcher.sent[0].path == "/v1/embeddings"


@pytest.mark.parametrize("piece", [0, 1, 7, 10_000], ids=["per-event", "per-byte", "7-bytes", "at-once"])
async def test_stream_relays_the_events_and_drops_the_usage_chunk(gw: Gateway, piece: int) -> None:
    raw = b"".join(chat_events(CHAT))
    pieces = chat_events(CHAT) if piece == 0 else split(raw, piece)
    gw.dispatcher.reply = lambda path, body: httpx.Response(200, content=trickle(pieces))
    r = await gw.client.post("/v1/chat/completions", json=chat(stream=True))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert len(r.headers["x-lamina-trace-id"]) == 32
    events = events_of(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["choices"] for c in chunks), "the usage chunk was not dropped"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Hello world"
    assert "start_ns" not in r.text  # the replica's extension stays behind; the last chunk is the gateway's
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["lamina"]["bottleneck"] is not None
    sent, breakdown = r.text.encode(), events[-2].encode()
    relayed = sent[: sent.index(b"data: " + breakdown)] + b"data: [DONE]\n\n"
    assert relayed == b"".join(chat_events(CHAT)[:-2] + chat_events(CHAT)[-1:])  # bytes untouched
    assert gw.dispatcher.closed == 1


async def test_stream_keeps_the_usage_chunk_without_the_extension_when_asked(gw: Gateway) -> None:
    r = await gw.client.post(
        "/v1/chat/completions", json=chat(stream=True, stream_options={"include_usage": True})
    )
    events = events_of(r.text)
    assert events[-1] == "[DONE]"
    usage_chunk = json.loads(events[-2])
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    assert set(usage_chunk["lamina"]) == {"layers", "bottleneck", "total_ms"}  # the gateway's extension


@pytest.mark.parametrize(
    "fail",
    [httpx.ReadError("connection reset by peer"), None],
    ids=["read-error", "ended-without-done"],
)
async def test_a_stream_broken_off_ends_with_an_error_event_and_done(
    gw: Gateway, fail: Exception | None
) -> None:
    first = chat_events(CHAT)[:3]
    gw.dispatcher.reply = lambda path, body: httpx.Response(
        200, content=trickle([*first, b'data: {"id'], fail)
    )
    r = await gw.client.post("/v1/chat/completions", json=chat(stream=True))
    assert r.status_code == 200
    events = events_of(r.text)
    assert [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:3]] == [
        "",
        "Hello",
        " world",
    ]
    assert json.loads(events[-2])["error"]["code"] == "engine_crashed"
    assert events[-1] == "[DONE]"
    assert len(events) == 5
    assert (
        'lamina_requests_total{endpoint="/v1/chat/completions",model="chat-model",status="502"} 1.0'
        in gw.metrics()
    )


async def test_a_replicas_own_error_event_is_relayed_and_counted(gw: Gateway) -> None:
    failure = {
        "error": {
            "message": "the engine crashed",
            "type": "server_error",
            "param": None,
            "code": "engine_crashed",
        }
    }
    pieces = [*chat_events(CHAT)[:3], sse(failure) + sse("[DONE]")]
    gw.dispatcher.reply = lambda path, body: httpx.Response(200, content=trickle(pieces))
    r = await gw.client.post("/v1/chat/completions", json=chat(stream=True))
    events = events_of(r.text)
    assert len(events) == 5 and json.loads(events[-2]) == failure and events[-1] == "[DONE]"
    assert (
        'lamina_requests_total{endpoint="/v1/chat/completions",model="chat-model",status="502"} 1.0'
        in gw.metrics()
    )


# --- errors -------------------------------------------------------------------------------------------


async def test_unknown_model_is_404_listing_the_models(gw: Gateway) -> None:
    r = await gw.client.post("/v1/chat/completions", json=chat("gpt-17"))
    assert r.status_code == 404
    err = error_of(r)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert "gpt-17" in err["message"] and CHAT in err["message"] and EMBED in err["message"]
    assert gw.dispatcher.sent == []


async def test_malformed_json_is_400(gw: Gateway) -> None:
    r = await gw.client.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    err = error_of(r)
    assert (err["type"], err["code"]) == ("invalid_request_error", "invalid_request")
    assert "JSON" in err["message"]


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "more than 100 deep"),
        (b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "seed": NaN}', "NaN"),
        (
            b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}',
            "Infinity",
        ),
        (
            b'{"model": "chat", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
            "lone UTF-16 surrogate",
        ),
    ],
    ids=["nested-100000-deep", "nan", "infinity", "lone-surrogate"],
)
async def test_json_that_python_accepts_but_nothing_can_take_is_400(
    gw: Gateway, raw: bytes, says: str
) -> None:
    r = await gw.client.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["code"] == "invalid_request" and says in err["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": CHAT}, "messages"),
        (chat(messages=[{"role": "robot", "content": "hi"}]), "messages[0].role"),
        (chat(temperature=7), "temperature"),
        ({"model": EMBED, "input": []}, "input"),
    ],
)
async def test_an_invalid_field_is_400_naming_it(gw: Gateway, body: dict[str, Any], param: str) -> None:
    path = "/v1/embeddings" if "input" in body else "/v1/chat/completions"
    r = await gw.client.post(path, json=body)
    assert r.status_code == 400
    err = error_of(r)
    assert (err["code"], err["param"]) == ("invalid_request", param)
    assert f"`{param}`" in err["message"]


@pytest.mark.parametrize(
    ("path", "body", "param", "capability"),
    [
        ("/v1/chat/completions", chat(EMBED), "model", "chat"),
        ("/v1/embeddings", {"model": CHAT, "input": "x"}, "model", "embedding"),
        ("/v1/chat/completions", chat(PLAIN, stream=True), "stream", "streaming"),
    ],
)
async def test_a_capability_the_model_lacks_is_400(
    gw: Gateway, path: str, body: dict[str, Any], param: str, capability: str
) -> None:
    r = await gw.client.post(path, json=body)
    assert r.status_code == 400
    err = error_of(r)
    assert (err["code"], err["param"]) == ("unsupported_capability", param)
    assert capability in err["message"]
    assert gw.dispatcher.sent == []


@pytest.mark.parametrize("stream", [False, True])
async def test_a_replica_error_is_relayed_unchanged(gw: Gateway, stream: bool) -> None:
    refusal = {
        "error": {
            "message": "the prompt has 6001 tokens; the context holds 4096",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }
    raw = json.dumps(refusal).encode()
    gw.dispatcher.reply = lambda path, body: httpx.Response(
        400, content=raw, headers={"content-type": "application/json"}
    )
    r = await gw.client.post("/v1/chat/completions", json=chat(stream=stream))
    assert r.status_code == 400
    assert r.content == raw
    assert len(r.headers["x-lamina-trace-id"]) == 32


@pytest.mark.parametrize("stream", [False, True])
async def test_no_ready_replica_is_503(gw: Gateway, stream: bool) -> None:
    gw.dispatcher.error = NoReadyReplicaError(f"no replica of {CHAT} is ready; check `lamina ps`")
    r = await gw.client.post("/v1/chat/completions", json=chat(stream=stream))
    assert r.status_code == 503
    assert error_of(r)["code"] == "no_ready_replica"


async def test_an_unexpected_error_is_a_generic_500_with_the_trace_id(
    gw: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    gw.dispatcher.error = RuntimeError("a bug")
    r = await gw.client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 500
    err = error_of(r)
    assert err["type"] == "server_error" and "a bug" not in err["message"]
    assert r.headers["x-lamina-trace-id"] in err["message"]
    assert "a bug" in caplog.text


async def test_an_unknown_path_is_an_openai_style_404(gw: Gateway) -> None:
    r = await gw.client.get("/v2/nothing")
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"
    assert "/v1/retrieve" in error_of(r)["message"] and "/admin/v1/" in error_of(r)["message"]  # where to go
    assert "x-lamina-trace-id" in r.headers
    r = await gw.client.delete("/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert error_of(r)["type"] == "invalid_request_error"


# --- keys, probes, metrics, traces --------------------------------------------------------------------


async def test_api_keys_are_required_when_configured(tmp_path: Path) -> None:
    app, _, telemetry, store, _ = _build(tmp_path, api_keys=["key-1", "key-2"])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": "key-2"}):
            r = await client.post("/v1/chat/completions", json=chat(), headers=headers)
            assert r.status_code == 401
            assert error_of(r)["code"] == "invalid_api_key"
        r = await client.post("/v1/chat/completions", json=chat(), headers={"authorization": "Bearer key-2"})
        assert r.status_code == 200
        assert (await client.get("/v1/models")).status_code == 401
        assert (await client.get("/healthz")).status_code == 200
    telemetry.shutdown()
    store.close()


async def test_without_keys_any_request_is_accepted(gw: Gateway) -> None:
    r = await gw.client.get("/v1/models", headers={"authorization": "Bearer whatever"})
    assert r.status_code == 200
    assert (await gw.client.get("/openapi.json")).status_code == 200


async def test_health_and_readiness(gw: Gateway) -> None:
    assert (await gw.client.get("/healthz")).status_code == 200
    r = await gw.client.get("/readyz")
    assert r.status_code == 200 and r.json()["deployments"] == {CHAT: True, EMBED: True}
    gw.ready[EMBED] = False
    r = await gw.client.get("/readyz")
    assert r.status_code == 503
    assert r.json() == {"ready": False, "deployments": {CHAT: True, EMBED: False}}


async def test_metrics_count_the_requests(gw: Gateway) -> None:
    await gw.client.post("/v1/chat/completions", json=chat())
    await gw.client.post("/v1/chat/completions", json=chat(stream=True))
    await gw.client.post("/v1/chat/completions", json=chat("gpt-17"))
    await gw.client.post("/v1/embeddings", json={"model": EMBED, "input": "x"})
    r = await gw.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert (
        'lamina_requests_total{endpoint="/v1/chat/completions",model="chat-model",status="200"} 2.0' in text
    )
    assert 'lamina_requests_total{endpoint="/v1/chat/completions",model="",status="404"} 1.0' in text
    assert 'lamina_requests_total{endpoint="/v1/embeddings",model="embed-model",status="200"} 1.0' in text
    assert (
        'lamina_request_duration_seconds_count{endpoint="/v1/chat/completions",model="chat-model"} 2.0'
        in text
    )
    assert 'lamina_time_to_first_token_seconds_count{model="chat-model"} 1.0' in text
    assert 'lamina_output_tokens_total{model="chat-model"} 4.0' in text
    assert 'lamina_input_tokens_total{model="embed-model"} 3.0' in text
    assert 'lamina_tokens_per_second_sum{model="chat-model"} 100.0' in text  # 2 tokens / 40 ms, twice
    assert 'lamina_requests_in_flight{model="chat-model"} 0.0' in text


@pytest.mark.parametrize("stream", [False, True])
async def test_one_request_leaves_a_span_per_layer(gw: Gateway, stream: bool) -> None:
    r = await gw.client.post(
        "/v1/chat/completions", json=chat(f"{CHAT}@1", max_tokens=5, temperature=0.5, stream=stream)
    )
    assert r.status_code == 200
    assert gw.telemetry.force_flush()
    spans = {s["name"]: s for s in read_trace(gw.store, r.headers["x-lamina-trace-id"])}
    engine_parts = {"queue", "prefill", "decode", "device"}  # the replica's timings, and the compute span
    steps = {"admission", "respond"}  # the gateway's own work before the dispatch and after the reply
    before = {"auth", "parse"}  # the application's steps before routing: children of the root
    assert set(spans) == {
        "POST /v1/chat/completions",
        "route",
        "dispatch",
        "engine",
        *engine_parts,
        *steps,
        *before,
    }
    assert all(spans[n]["parent_span_id"] == spans["POST /v1/chat/completions"]["span_id"] for n in before)
    assert spans["auth"]["end_ns"] <= spans["parse"]["start_ns"] <= spans["parse"]["end_ns"]
    root, route, dispatch, engine = (
        spans[n] for n in ("POST /v1/chat/completions", "route", "dispatch", "engine")
    )
    assert all(spans[n]["parent_span_id"] == engine["span_id"] for n in engine_parts)
    layers = [spans[n]["layer"] for n in ("queue", "prefill", "decode", "device")]
    assert layers == ["models", "models", "models", "compute"]
    started = int(str(LAMINA["start_ns"]))
    queued, first = started - 1_500_000, started + 6_500_000  # ttft 8 ms from receipt
    assert (spans["queue"]["start_ns"], spans["queue"]["end_ns"]) == (queued, LAMINA["start_ns"])
    assert (spans["prefill"]["start_ns"], spans["prefill"]["end_ns"]) == (LAMINA["start_ns"], first)
    assert (spans["decode"]["start_ns"], spans["decode"]["end_ns"]) == (first, LAMINA["end_ns"])
    assert [s["layer"] for s in (root, route, dispatch, engine)] == [
        "application",
        "models",
        "orchestration",
        "models",
    ]
    assert root["parent_span_id"] is None
    assert route["parent_span_id"] == dispatch["parent_span_id"] == root["span_id"]
    assert all(
        spans[n]["parent_span_id"] == root["span_id"] and spans[n]["layer"] == "application" for n in steps
    )
    assert (
        route["end_ns"]
        <= spans["admission"]["start_ns"]
        <= spans["admission"]["end_ns"]
        <= dispatch["start_ns"]
    )
    assert engine["parent_span_id"] == dispatch["span_id"]
    assert (engine["start_ns"], engine["end_ns"]) == (queued, LAMINA["end_ns"])
    assert engine["attributes"]["lamina.queue_ms"] == 1.5 and engine["attributes"]["lamina.ttft_ms"] == 8.0
    assert dispatch["attributes"]["lamina.replica.id"] == "chat-model-0"
    assert dispatch["attributes"]["lamina.dispatch.attempts"] == 1
    attrs = root["attributes"]
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == f"{CHAT}@1"
    assert attrs["gen_ai.response.model"] == CHAT
    assert (attrs["gen_ai.request.max_tokens"], attrs["gen_ai.request.temperature"]) == (5, 0.5)
    assert (attrs["gen_ai.usage.input_tokens"], attrs["gen_ai.usage.output_tokens"]) == (9, 2)
    assert attrs["http.response.status_code"] == 200
    assert attrs["lamina.model_version"] == "chat-model@1"
    assert root["status"] == "unset"


async def test_a_failed_request_marks_its_spans_error(gw: Gateway) -> None:
    r = await gw.client.post("/v1/chat/completions", json=chat("gpt-17"))
    assert gw.telemetry.force_flush()
    spans = {s["name"]: s for s in read_trace(gw.store, r.headers["x-lamina-trace-id"])}
    assert spans["POST /v1/chat/completions"]["status"] == "error"
    assert spans["POST /v1/chat/completions"]["attributes"]["error.type"] == "model_not_found"
    assert spans["route"]["status"] == "error"


async def test_probes_are_not_recorded_but_carry_a_trace_id(gw: Gateway) -> None:
    r = await gw.client.get("/healthz")
    assert len(r.headers["x-lamina-trace-id"]) == 32
    assert gw.telemetry.force_flush()
    assert read_trace(gw.store, r.headers["x-lamina-trace-id"]) == []


async def test_a_client_that_leaves_stops_the_stream(gw: Gateway) -> None:
    gw.dispatcher.reply = lambda path, body: httpx.Response(200, content=stalled_stream(CHAT))
    receive, send, sent = client_leaving(chat(stream=True))

    scope = chat_scope()
    with anyio.fail_after(30):  # a guard against hanging, not a timing assertion
        await gw.app(scope, receive, send)
    assert gw.dispatcher.closed == 1
    assert sent[0]["status"] == 200
    assert (
        'lamina_requests_total{endpoint="/v1/chat/completions",model="chat-model",status="499"} 1.0'
        in gw.metrics()
    )
    assert 'lamina_requests_in_flight{model="chat-model"} 0.0' in gw.metrics()


async def test_a_plain_request_whose_client_leaves_is_dropped_and_counted(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    started, cancelled = anyio.Event(), anyio.Event()

    async def hanging(*args: Any, **kwargs: Any) -> Any:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    monkeypatch.setattr(gw.dispatcher, "request", hanging)
    inbox = [{"type": "http.request", "body": json.dumps(chat()).encode(), "more_body": False}]
    sent: list[Mapping[str, Any]] = []

    async def receive() -> Mapping[str, Any]:
        if inbox:
            return inbox.pop()
        await started.wait()  # the client leaves while the replica works on its answer
        return {"type": "http.disconnect"}

    async def send(message: Mapping[str, Any]) -> None:
        sent.append(message)

    scope = chat_scope()
    with anyio.fail_after(30):  # a guard against hanging, not a timing assertion
        await gw.app(scope, receive, send)  # type: ignore[arg-type]
    assert cancelled.is_set(), "the replica call was not dropped"
    assert sent[0]["status"] == 499
    assert (
        'lamina_requests_total{endpoint="/v1/chat/completions",model="chat-model",status="499"} 1.0'
        in gw.metrics()
    )
    assert 'lamina_requests_in_flight{model="chat-model"} 0.0' in gw.metrics()


def test_the_gateway_process_freezes_what_it_loaded_before_serving() -> None:
    from lamina.stack.gateway import GC_YOUNG_THRESHOLD, settle_garbage_collector

    before = gc.get_threshold()
    try:
        settle_garbage_collector()
        assert gc.get_freeze_count() > 0 and gc.get_threshold()[0] == GC_YOUNG_THRESHOLD
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
