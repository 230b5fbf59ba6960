"""Stored traces read back: self time per layer, the tree of a waterfall, the listing; and the replay
recorder's pieces (what it takes out of a grounded request, what it keeps of an answer, its rows)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from sqlalchemy import func, select
from typer.testing import CliRunner

from lamina.application import ANONYMOUS, Call, ReplayRecorder, Usage, answer_summary, read_replay
from lamina.application._rag import grounded_messages
from lamina.application._replay import ungrounded
from lamina.cli import app
from lamina.cli._traces import bar
from lamina.clock import utcnow
from lamina.data import Citation, PinnedVersion, Retrieval
from lamina.errors import InvalidRequestError, NotFoundError
from lamina.observability import SpanRow, check_trace_id, layer_times_ms, recent_traces, summarize, tree
from lamina.store import Store, replay_requests, spans

MS = 1_000_000
T0 = 1_767_225_600 * 1_000_000_000  # 2026-01-01T00:00:00Z


def span(
    sid: str, parent: str | None, name: str, layer: str | None, start_ms: float, end_ms: float, **attrs: Any
) -> SpanRow:
    return SpanRow(
        span_id=sid.rjust(16, "0"),
        trace_id="a" * 32,
        parent_span_id=parent.rjust(16, "0") if parent else None,
        name=name,
        layer=layer,
        start_ns=T0 + int(start_ms * MS),
        end_ns=T0 + int(end_ms * MS),
        status="unset",
        attributes=attrs,
    )


#: root 0-100 ms; route 1-3; retrieve 5-25; dispatch 30-95 with the engine 40-90 inside it (queue 10 ms
#: reported), and an unlayered span 91-93 under dispatch
REQUEST = [
    span(
        "1",
        None,
        "POST /v1/chat/completions",
        "application",
        0,
        100,
        **{
            "http.route": "/v1/chat/completions",
            "http.response.status_code": 200,
            "gen_ai.request.model": "chat",
        },
    ),
    span("2", "1", "route", "models", 1, 3),
    span("3", "1", "retrieve", "data", 5, 25),
    span("4", "1", "dispatch", "orchestration", 30, 95),
    span("5", "4", "engine", "models", 40, 90, **{"lamina.queue_ms": 10.0}),
    span("6", "4", "attempt", None, 91, 93),
]


def test_self_time_per_layer_counts_each_millisecond_once() -> None:
    layers = layer_times_ms(REQUEST)
    assert layers == pytest.approx(
        {"application": 100 - 2 - 20 - 65, "models": 2 + 50, "data": 20, "orchestration": 65 - 50}
    )
    assert sum(layers.values()) == pytest.approx(100)


def test_overlapping_children_are_not_subtracted_twice() -> None:
    rows = [
        span("1", None, "root", "application", 0, 10),
        span("2", "1", "a", "data", 2, 6),
        span("3", "1", "b", "data", 4, 8),  # overlaps a: the root's self time is 10 - 6
        span("4", "1", "c", "models", 9, 30),  # runs past its parent: clipped to it
    ]
    assert layer_times_ms(rows) == pytest.approx({"application": 3, "data": 8, "models": 21})


def test_the_summary_names_route_model_status_bottleneck_and_stages() -> None:
    line = summarize(REQUEST)
    assert (line.route, line.model, line.status, line.error) == ("/v1/chat/completions", "chat", 200, False)
    assert line.duration_ms == pytest.approx(100)
    assert line.bottleneck == "models"
    assert line.stages_ms == pytest.approx({"retrieve": 20, "dispatch": 65, "engine": 50, "queue": 10})
    assert line.start.isoformat() == "2026-01-01T00:00:00+00:00"


def test_a_queue_span_inside_the_engine_is_the_queue_wait_not_engine_time() -> None:
    rows = [
        span("1", None, "POST /v1/chat/completions", "application", 0, 100),
        span("4", "1", "dispatch", "orchestration", 5, 95),
        span("5", "4", "engine", "models", 10, 90, **{"lamina.queue_ms": 99.0}),
        span("7", "5", "queue", "models", 10, 60),
        span("8", "5", "decode", "models", 60, 90),
    ]
    stages = summarize(rows).stages_ms
    assert stages == pytest.approx({"dispatch": 90, "engine": 30, "queue": 50})


def test_the_tree_is_depth_first_with_depths_and_offsets() -> None:
    placed = [(t.span["name"], t.depth, t.offset_ms, t.duration_ms) for t in tree(REQUEST[::-1])]
    assert placed == [
        ("POST /v1/chat/completions", 0, 0.0, 100.0),
        ("route", 1, 1.0, 2.0),
        ("retrieve", 1, 5.0, 20.0),
        ("dispatch", 1, 30.0, 65.0),
        ("engine", 2, 40.0, 50.0),
        ("attempt", 2, 91.0, 2.0),
    ]


def test_a_waterfall_bar_sits_at_its_offset_and_is_at_least_one_cell() -> None:
    placed = {t.span["name"]: t for t in tree(REQUEST)}
    assert bar(placed["dispatch"], 100, width=20).plain == " " * 6 + "█" * 13
    assert bar(placed["route"], 100, width=20).plain == "█"
    assert bar(placed["POST /v1/chat/completions"], 100, width=20).plain == "█" * 20


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'lamina.db'}")
    s.migrate()
    yield s
    s.close()


def test_recent_traces_lists_the_newest_first_from_since(store: Store) -> None:
    rows: list[SpanRow] = []
    for i, trace_id in enumerate(["1" * 32, "2" * 32, "3" * 32]):
        for r in REQUEST:  # the same request a second later each time, its span ids renamed
            parent = r["parent_span_id"]
            shifted = SpanRow(
                span_id=f"{i}{r['span_id'][1:]}",
                trace_id=trace_id,
                parent_span_id=f"{i}{parent[1:]}" if parent else None,
                name=r["name"],
                layer=r["layer"],
                start_ns=r["start_ns"] + i * 1000 * MS,
                end_ns=r["end_ns"] + i * 1000 * MS,
                status=r["status"],
                attributes=r["attributes"],
            )
            rows.append(shifted)
    with store.begin() as conn:
        conn.execute(spans.insert(), rows)
    since = datetime.fromtimestamp((T0 + 500 * MS) / 1e9, UTC)
    lines = recent_traces(store, since, limit=10)
    assert [line.trace_id for line in lines] == ["3" * 32, "2" * 32]
    assert all(line.bottleneck == "models" for line in lines)
    assert [line.trace_id for line in recent_traces(store, since, limit=1)] == ["3" * 32]


# -- the replay recorder ---------------------------------------------------------------------------------

VERSION = PinnedVersion(dataset="docs", version_id="v" * 64, seq=3, chunk_ids=frozenset({"c1", "c2"}))


def retrieval() -> Retrieval:
    cite = [
        Citation(
            index=i + 1,
            chunk_id=f"c{i + 1}",
            text=f"passage {i + 1}",
            score=1.0,
            source_uri=f"file:///docs/{i}.md",
            byte_start=0,
            byte_end=9,
            content_sha256="0" * 64,
            dataset="docs",
            dataset_version=VERSION.version_id,
            dataset_seq=3,
        )
        for i in range(2)
    ]
    return Retrieval(query="q", mode="keyword", version=VERSION, citations=cite)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "q"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}],
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "q"},
        ],
    ],
)
def test_ungrounded_undoes_grounded_messages(messages: list[dict[str, Any]]) -> None:
    grounded = grounded_messages(messages, retrieval())
    assert grounded != messages
    assert ungrounded(grounded, retrieval()) == messages


def test_the_answer_summary_keeps_text_finish_citations_and_usage() -> None:
    answer = {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
        "citations": [c.to_json() for c in retrieval().citations],
    }
    summary = answer_summary(answer)
    assert summary is not None
    assert summary["text"] == "Hi" and summary["finish_reason"] == "stop"
    assert [c["chunk_id"] for c in summary["citations"]] == ["c1", "c2"]
    assert summary["citations"][0]["dataset_version"] == VERSION.version_id
    assert answer_summary(None) is None


def test_the_recorder_keeps_a_grounded_request_pinned_to_its_dataset_version(store: Store) -> None:
    recorder = ReplayRecorder(store)
    tracer = trace.get_tracer("test")

    async def one_call() -> str:
        with tracer.start_as_current_span("root") as root:
            trace_id = format(root.get_span_context().trace_id, "032x")
            recorder.record(retrieval())  # the gateway's query sink, inside the request
            user = [{"role": "user", "content": "q"}]
            call = Call(
                principal=ANONYMOUS,
                operation="chat",
                model="kb",
                deployment="chat",
                model_version="chat-model@2",
                body={"model": "chat", "messages": grounded_messages(user, retrieval()), "seed": 7},
                stream=False,
                prompt_tokens=10,
                completion_tokens=5,
                span=root,
                template="greet@4",
                answer={"choices": [{"message": {"content": "A."}, "finish_reason": "stop"}]},
            )
            ticket = await recorder.admit(call)
            await ticket.settle(call, Usage(10, 2))
            return trace_id

    trace_id = asyncio.run(one_call())
    recorder.flush()
    kept = read_replay(store, trace_id)
    assert kept.route == "/v1/chat/completions"
    assert kept.body["messages"] == [{"role": "user", "content": "q"}]
    assert kept.body["rag"] == {"dataset": f"docs@{VERSION.version_id}", "k": 2, "mode": "keyword"}
    assert kept.versions == {
        "model": "kb",
        "deployment": "chat",
        "model_version": "chat-model@2",
        "template": "greet@4",
        "seed": 7,
        "stream": False,
        "dataset": "docs",
        "dataset_version": VERSION.version_id,
        "dataset_seq": 3,
    }
    assert kept.answer is not None and kept.answer["text"] == "A."
    assert kept.pinned()["model"] == "chat-model@2"
    assert kept.pinned(routable=False)["model"] == "chat"
    assert kept.created_at <= utcnow()
    asyncio.run(recorder.aclose())


def test_a_call_that_failed_is_not_kept_and_an_unknown_trace_says_why(store: Store) -> None:
    recorder = ReplayRecorder(store)

    async def failed() -> None:
        call = Call(ANONYMOUS, "chat", "m", "m", None, {"model": "m"}, False, 1, 1)
        ticket = await recorder.admit(call)
        await ticket.settle(call, None)

    asyncio.run(failed())
    recorder.flush()
    with store.begin() as conn:
        assert conn.execute(select(func.count()).select_from(replay_requests)).scalar_one() == 0
    with pytest.raises(NotFoundError, match=r"observability\.keep_requests: true"):
        read_replay(store, "f" * 32)
    asyncio.run(recorder.aclose())


def test_a_trace_id_is_32_hex_digits_everywhere_one_is_given(tmp_path: Path) -> None:
    """The CLI's trace and replay, the admin API and the dashboard take the header's form (any case,
    spaces around it); anything else is a bad input that says what a trace id looks like."""
    assert check_trace_id(" 0123456789ABCDEF0123456789abcdef\n") == "0123456789abcdef" * 2
    for bad in ("cf17cc37", "nonexistent", "g" * 32, "0" * 33):
        with pytest.raises(InvalidRequestError, match="32 hex digits"):
            check_trace_id(bad)
    for command in ("trace", "replay"):
        result = CliRunner().invoke(app, [command, "cf17cc37", "--state-dir", str(tmp_path / "state")])
        assert result.exit_code == 2, result.output
        assert "is not a trace id" in result.output
