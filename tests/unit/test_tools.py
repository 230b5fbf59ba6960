"""Tool calling in the Hermes/Qwen convention: the plan a request makes, the prompt and history the model
sees, and reading calls out of the answer, whole or streamed in pieces of any size."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable
from typing import Any

import pytest

from lamina.models._openai import ChatCompletionRequest
from lamina.models._tool_stream import (
    ParsedCalls,
    ToolCall,
    ToolEvent,
    ToolStream,
    collect_events,
    parse_calls,
)
from lamina.models._tools import ToolPlan, call_text, render_messages, tool_plan

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ADD: dict[str, Any] = {
    "type": "function",
    "function": {"name": "add", "parameters": {"type": "object", "properties": {}}},
}
NAMES = frozenset({"get_weather", "add"})


def chat(messages: list[dict[str, Any]] | None = None, **fields: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": messages or [{"role": "user", "content": "hi"}], **fields}
    return ChatCompletionRequest.model_validate(body)


def ids() -> Callable[[], str]:
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


@pytest.mark.parametrize(
    ("fields", "mode", "forced", "parallel", "legacy"),
    [
        ({"tools": [WEATHER, ADD]}, "auto", None, True, False),
        (
            {"tools": [WEATHER], "tool_choice": "auto", "parallel_tool_calls": False},
            "auto",
            None,
            False,
            False,
        ),
        ({"tools": [WEATHER], "tool_choice": "required"}, "required", None, False, False),
        (
            {"tools": [WEATHER, ADD], "tool_choice": {"type": "function", "function": {"name": "add"}}},
            "named",
            "add",
            False,
            False,
        ),
        ({"functions": [WEATHER["function"]]}, "auto", None, True, True),
        (
            {"functions": [WEATHER["function"]], "function_call": {"name": "get_weather"}},
            "named",
            "get_weather",
            False,
            True,
        ),
    ],
)
def test_the_plan_a_request_makes(
    fields: dict[str, Any], mode: str, forced: str | None, parallel: bool, legacy: bool
) -> None:
    plan = tool_plan(chat(**fields))
    assert plan is not None
    assert (plan.mode, plan.forced, plan.parallel, plan.legacy) == (mode, forced, parallel, legacy)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"tools": [WEATHER], "tool_choice": "none"},
        {"functions": [WEATHER["function"]], "function_call": "none"},
    ],
)
def test_no_tools_or_choice_none_makes_no_plan(fields: dict[str, Any]) -> None:
    assert tool_plan(chat(**fields)) is None


def test_the_tools_are_described_in_the_system_message() -> None:
    req = chat(
        [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Paris?"}],
        tools=[WEATHER],
    )
    system, user = render_messages(req.messages, tool_plan(req))
    assert system.role == "system" and system.content.startswith("Be brief.\n\n# Tools\n")
    assert json.dumps(WEATHER, ensure_ascii=False) in system.content
    assert (
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
        in system.content
    )
    assert (user.role, user.content) == ("user", "Paris?")


def test_a_system_message_is_added_when_there_is_none() -> None:
    req = chat(tools=[WEATHER], tool_choice="required")
    system, _ = render_messages(req.messages, tool_plan(req))
    assert system.role == "system" and "You must call one of these functions" in system.content


def test_earlier_calls_and_results_are_spelled_in_the_convention() -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    history: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [call, {**call, "id": "call_2"}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "rainy"}]},
        {"role": "assistant", "content": "Sunny in Paris, rainy in Rome."},
    ]
    rendered = render_messages(chat(history).messages, None)
    assert [m.role for m in rendered] == ["user", "assistant", "user", "assistant"]
    one = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert rendered[1].content == f"{one}\n{one}"
    assert (
        rendered[2].content
        == "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrainy\n</tool_response>"
    )


def test_legacy_function_turns_are_spelled_the_same_way() -> None:
    history: list[dict[str, Any]] = [
        {"role": "user", "content": "Paris?"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "function_call": {"name": "get_weather", "arguments": "{}"},
        },
        {"role": "function", "name": "get_weather", "content": "sunny"},
    ]
    rendered = render_messages(chat(history).messages, None)
    assert (
        rendered[1].content
        == 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'
    )
    assert rendered[2] == rendered[2].__class__("user", "<tool_response>\nsunny\n</tool_response>")


def test_arguments_that_are_not_json_are_kept_as_a_string() -> None:
    assert call_text("f", "not json") == '<tool_call>\n{"name": "f", "arguments": "not json"}\n</tool_call>'


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
ANSWERS: list[tuple[str, ParsedCalls]] = [
    ("Hello there!", ParsedCalls("Hello there!", ())),
    ("\n" + CALL, ParsedCalls(None, (ToolCall("call_0", "get_weather", '{"city": "Paris"}'),))),
    (
        "Sure.\n" + CALL + "\n" + CALL.replace("Paris", "Rome"),
        ParsedCalls(
            "Sure.",
            (
                ToolCall("call_0", "get_weather", '{"city": "Paris"}'),
                ToolCall("call_1", "get_weather", '{"city": "Rome"}'),
            ),
        ),
    ),
    (  # braces inside the arguments, and a brace in a string
        '<tool_call>{"name": "add", "arguments": {"x": {"y": "}"}}}</tool_call>',
        ParsedCalls(None, (ToolCall("call_0", "add", '{"x": {"y": "}"}}'),)),
    ),
    (  # keys in the other order: read when the block closes
        '<tool_call>\n{"arguments": {"a": 1}, "name": "add"}\n</tool_call>',
        ParsedCalls(None, (ToolCall("call_0", "add", '{"a": 1}'),)),
    ),
    (  # arguments as a JSON string, as some models write them
        '<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 1}"}\n</tool_call>',
        ParsedCalls(None, (ToolCall("call_0", "add", '{"a": 1}'),)),
    ),
    (  # an unknown function is text
        '<tool_call>{"name": "nope", "arguments": {}}</tool_call> ok',
        ParsedCalls('<tool_call>{"name": "nope", "arguments": {}}</tool_call> ok', ()),
    ),
    ("a < b, and <tool x", ParsedCalls("a < b, and <tool x", ())),
    (  # cut short by max_tokens
        '<tool_call>\n{"name": "add", "arguments": {"a": 1',
        ParsedCalls(None, (ToolCall("call_0", "add", '{"a": 1'),)),
    ),
    (  # ended without the closing tag
        '<tool_call>{"name": "add", "arguments": {"a": 1}}',
        ParsedCalls(None, (ToolCall("call_0", "add", '{"a": 1}'),)),
    ),
    ("  \n", ParsedCalls("  \n", ())),
]


@pytest.mark.parametrize(("text", "parsed"), ANSWERS)
def test_a_whole_answer_is_read(text: str, parsed: ParsedCalls) -> None:
    assert parse_calls(text, NAMES, new_id=ids()) == parsed


@pytest.mark.parametrize(("text", "parsed"), ANSWERS)
def test_streaming_in_any_pieces_reads_the_same(text: str, parsed: ParsedCalls) -> None:
    for seed in range(25):
        rng = random.Random(seed)
        stream = ToolStream(NAMES, new_id=ids())
        events: list[ToolEvent] = []
        i = 0
        while i < len(text):
            n = rng.randint(1, 5)
            events += stream.feed(text[i : i + n])
            i += n
        events += stream.finish()
        assert collect_events(events) == parsed, (seed, events)


def test_a_call_streams_its_name_first_then_its_arguments_as_they_come() -> None:
    stream = ToolStream(NAMES, new_id=ids())
    assert stream.feed("<tool_") == []
    assert stream.feed('call>\n{"name": "get_weather", "arguments": ') == []
    assert stream.feed('{"city": "Pa') == [
        ToolEvent("call", index=0, call_id="call_0", name="get_weather"),
        ToolEvent("arguments", '{"city": "Pa'),
    ]
    assert stream.feed('ris"}') == [ToolEvent("arguments", 'ris"')]  # the brace may close the call
    assert stream.feed("}\n</tool") == [ToolEvent("arguments", "}")]
    assert stream.feed("_call>") == []
    assert stream.finish() == []
    assert stream.calls == 1


def test_text_before_a_possible_tag_is_held_only_as_long_as_needed() -> None:
    stream = ToolStream(NAMES)
    assert stream.feed("Hi <tool") == [ToolEvent("content", "Hi ")]
    assert stream.feed("box") == [ToolEvent("content", "<toolbox")]


def test_one_call_only_when_parallel_calls_are_off() -> None:
    text = CALL + "\n" + CALL.replace("Paris", "Rome") + " and more"
    parsed = parse_calls(text, NAMES, parallel=False, new_id=ids())
    assert parsed == ParsedCalls(None, (ToolCall("call_0", "get_weather", '{"city": "Paris"}'),))
    stream = ToolStream(NAMES, parallel=False)
    stream.feed(CALL)
    assert stream.done and stream.feed("more") == []


def test_ids_are_openai_shaped() -> None:
    (call,) = parse_calls(CALL, NAMES).calls
    assert call.id.startswith("call_") and len(call.id) == 29
    assert call.json() == {
        "id": call.id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }


def test_a_plan_reads_with_its_own_settings() -> None:
    plan = ToolPlan(functions=tuple(chat(tools=[WEATHER]).tools[0].function for _ in (0,)), legacy=True)  # type: ignore[index]
    assert len(plan.parse(CALL + CALL).calls) == 1
    assert not plan.stream().parallel
