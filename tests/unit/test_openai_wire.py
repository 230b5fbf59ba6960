"""The OpenAI API at the wire: requests validated field by field, planned onto an engine's capabilities, and
answers (bodies and SSE chunks) in OpenAI's shapes, checked against OpenAI's own OpenAPI description."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from lamina.errors import UnsupportedCapabilityError
from lamina.models._engine import (
    Capability,
    ChatMessage,
    Delta,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from lamina.models._openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from lamina.models._request_plan import (
    check_capabilities,
    needed_capabilities,
    plan_chat,
    plan_completion,
    sampling_params,
)
from lamina.models._tools import ToolPlan, tool_plan
from lamina.models._worker_wire import ChunkEncoder, completion_body

SPEC = Path("/work/shared/data/openai-openapi/openapi.yaml")
USER = [{"role": "user", "content": "hi"}]
WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ALL = frozenset(Capability)
PLAIN = frozenset({Capability.CHAT, Capability.COMPLETION, Capability.STREAMING})


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **fields})


def error_of(body: dict[str, Any]) -> tuple[str, tuple[int | str, ...], str]:
    with pytest.raises(ValidationError) as err:
        ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **body})
    first = err.value.errors()[0]
    return first["type"], tuple(first["loc"]), first["msg"]


# requests


def test_nulls_mean_defaults_and_harmless_fields_are_accepted() -> None:
    req = chat(
        temperature=None,
        top_p=None,
        n=None,
        stream=None,
        logprobs=None,
        presence_penalty=None,
        user="u-1",
        metadata={"k": "v"},
        store=False,
        service_tier="auto",
        stream_options={"include_usage": True},
        prompt_cache_key="k",
        safety_identifier="s",
        modalities=["text"],
        audio=None,
        a_field_from_the_future={"x": 1},
    )
    assert (req.temperature, req.top_p, req.n, req.stream, req.logprobs) == (1.0, 1.0, 1, False, False)
    assert req.include_usage


@pytest.mark.parametrize(
    ("body", "loc", "says"),
    [
        ({"presence_penalty": 2.5}, ("presence_penalty",), "less than or equal to 2"),
        ({"frequency_penalty": -3}, ("frequency_penalty",), "greater than or equal to -2"),
        ({"logit_bias": {"hello": 5}}, ("logit_bias",), "'hello' is not a token id"),
        ({"logit_bias": {"50256": -101}}, ("logit_bias",), "-100..100"),
        ({"top_logprobs": 3}, ("top_logprobs",), "needs `logprobs: true`"),
        ({"logprobs": True, "top_logprobs": 21}, ("top_logprobs",), "less than or equal to 20"),
        ({"n": 2}, ("n",), "one choice per request"),
        (
            {"response_format": {"type": "json_schema"}},
            ("response_format", "json_schema"),
            "needs `json_schema`",
        ),
        ({"response_format": {"type": "yaml"}}, ("response_format", "type"), "'json_schema'"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}}},
            ("response_format", "json_schema", "name"),
            "pattern",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "no spaces allowed"}}]},
            ("tools", 0, "function", "name"),
            "pattern",
        ),
        ({"tools": [WEATHER, WEATHER]}, ("tools",), "get_weather appear twice"),
        ({"tool_choice": "required"}, ("tool_choice",), "needs `tools`"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            ("tool_choice",),
            "'nope', which is not in `tools`",
        ),
        (
            {"functions": [WEATHER["function"]], "function_call": {"name": "nope"}},
            ("function_call",),
            "not in `functions`",
        ),
        ({"tools": [WEATHER], "functions": [WEATHER["function"]]}, ("functions",), "not both"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, ("audio",), "leave `audio` out"),
        ({"modalities": ["text", "audio"]}, ("modalities",), "only text output"),
        ({"prediction": {"type": "content", "content": "x"}}, ("prediction",), "leave `prediction` out"),
        ({"web_search_options": {}}, ("web_search_options",), "web search"),
        ({"reasoning_effort": "high"}, ("reasoning_effort",), "reasoning"),
    ],
)
def test_a_bad_or_unsupported_field_is_located_at_the_field(
    body: dict[str, Any], loc: tuple[int | str, ...], says: str
) -> None:
    _, where, message = error_of(body)
    assert where[: len(loc)] == loc
    assert says in message


@pytest.mark.parametrize(
    ("message", "loc", "says"),
    [
        ({"role": "tool", "content": "x"}, ("messages", 0, "tool_call_id"), "needs `tool_call_id`"),
        ({"role": "function", "content": "x"}, ("messages", 0, "name"), "needs `name`"),
        ({"role": "user"}, ("messages", 0, "content"), "needs `content`"),
        ({"role": "user", "content": "x", "tool_calls": []}, ("messages", 0, "tool_calls"), "only assistant"),
        (
            {"role": "user", "content": [{"type": "video"}]},
            ("messages", 0, "content"),
            "part 0 has type 'video'",
        ),
        (
            {"role": "user", "content": [{"type": "text"}]},
            ("messages", 0, "content"),
            'without a string "text"',
        ),
    ],
)
def test_a_bad_message_is_located_in_it(
    message: dict[str, Any], loc: tuple[int | str, ...], says: str
) -> None:
    kind, where, text = error_of({"messages": [message]})
    assert (where, says in text) == (loc, True)
    if loc[-1] in ("tool_call_id", "name") or "needs `content`" in says:
        assert kind == "missing"


def test_an_assistant_turn_with_calls_needs_no_content() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    req = chat(messages=[*USER, {"role": "assistant", "content": None, "tool_calls": [call]}])
    assert req.messages[1].text() == ""


def test_completion_requests_take_the_legacy_fields() -> None:
    req = CompletionRequest.model_validate(
        {
            "model": "m",
            "prompt": "x",
            "logprobs": 2,
            "best_of": 1,
            "suffix": None,
            "seed": 7,
            "logit_bias": {"1": 3},
        }
    )
    assert (req.logprobs, req.seed, req.logit_bias_pairs) == (2, 7, ((1, 3.0),))
    cases: list[tuple[dict[str, Any], str]] = [
        ({"logprobs": 6}, "logprobs"),
        ({"best_of": 2}, "best_of"),
        ({"suffix": "end"}, "suffix"),
        ({"echo": True, "logprobs": 1}, "logprobs"),
    ]
    for body, field in cases:
        with pytest.raises(ValidationError) as err:
            CompletionRequest.model_validate({"model": "m", "prompt": "x", **body})
        assert err.value.errors()[0]["loc"] == (field,)


@pytest.mark.parametrize(
    ("model", "field", "value", "says"),
    [
        (CompletionRequest, "prompt", [1, 2, 3], "send the prompt as text"),
        (CompletionRequest, "prompt", [[1, 2], [3]], "send the prompt as text"),
        (CompletionRequest, "prompt", ["a", "b"], "one request per prompt"),
        (EmbeddingRequest, "input", [[101, 7592, 102]], "check_embedding_ctx_length=False"),
        (EmbeddingRequest, "input", [5], "token ids"),
        (EmbeddingRequest, "input", [], "at least one text"),
        (EmbeddingRequest, "input", "", "input is an empty string"),
        (EmbeddingRequest, "input", ["a", " ", ""], "input[2] is an empty string"),
    ],
)
def test_token_ids_and_many_prompts_are_refused_saying_what_to_send(
    model: type[CompletionRequest | EmbeddingRequest], field: str, value: Any, says: str
) -> None:
    """OpenAI's token-id form of a prompt or input (LangChain's embeddings send it) is a 400 that says to
    send text, located at the field, without pydantic's prefixes."""
    with pytest.raises(ValidationError) as err:
        model.model_validate({"model": "m", field: value})
    error = err.value.errors()[0]
    assert error["loc"] == (field,)
    assert says in error["msg"]
    assert not error["msg"].startswith("Value error")


# planning onto an engine


def test_sampling_params_carry_every_field() -> None:
    req = chat(
        max_completion_tokens=9,
        temperature=0.5,
        top_p=0.9,
        stop="END",
        seed=3,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias={"15": -100, "7": 2},
        logprobs=True,
        top_logprobs=4,
    )
    assert sampling_params(req, "root ::= x") == SamplingParams(
        max_tokens=9,
        temperature=0.5,
        top_p=0.9,
        stop=("END",),
        seed=3,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias=((7, 2.0), (15, -100.0)),
        logprobs=4,
        grammar="root ::= x",
    )
    assert sampling_params(chat(logprobs=True)).logprobs == 0
    assert sampling_params(chat()).logprobs is None


@pytest.mark.parametrize(
    ("fields", "capability", "param"),
    [
        ({"logprobs": True}, Capability.LOGPROBS, "logprobs"),
        ({"presence_penalty": 1}, Capability.PENALTIES, "presence_penalty"),
        ({"frequency_penalty": 1}, Capability.PENALTIES, "frequency_penalty"),
        ({"logit_bias": {"1": 1}}, Capability.PENALTIES, "logit_bias"),
        ({"response_format": {"type": "json_object"}}, Capability.GRAMMAR, "response_format"),
        ({"tools": [WEATHER], "tool_choice": "required"}, Capability.GRAMMAR, "tool_choice"),
        (
            {"functions": [WEATHER["function"]], "function_call": {"name": "get_weather"}},
            Capability.GRAMMAR,
            "function_call",
        ),
    ],
)
def test_what_the_engine_cannot_do_is_a_400_naming_the_field(
    fields: dict[str, Any], capability: Capability, param: str
) -> None:
    req = chat(**fields)
    with pytest.raises(UnsupportedCapabilityError) as err:
        plan_chat(req, ALL - {capability}, "smol")
    assert err.value.param == param and capability.value in err.value.message
    plan = plan_chat(req, ALL, "smol")
    assert capability in plan.params.needs()


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"tools": [WEATHER]},
        {"tools": [WEATHER], "tool_choice": "none"},
        {"response_format": {"type": "text"}},
    ],
)
def test_plain_requests_need_nothing_beyond_sampling(fields: dict[str, Any]) -> None:
    req = chat(**fields)
    assert needed_capabilities(req, tool_plan(req)) == {}
    assert plan_chat(req, PLAIN, "smol").params.needs() == frozenset()


def test_an_image_sent_to_a_text_model_is_a_400_naming_the_part() -> None:
    parts = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "data:x"}}]
    req = chat(messages=[{"role": "system", "content": "s"}, {"role": "user", "content": parts}])
    with pytest.raises(UnsupportedCapabilityError) as err:
        check_capabilities(req, ALL, "smol")
    assert err.value.param == "messages.1.content.1"
    assert "image_url" in err.value.message


def test_a_chat_plan_renders_tools_and_forces_the_call() -> None:
    plan = plan_chat(chat(tools=[WEATHER], tool_choice="required", seed=1), ALL, "smol")
    assert plan.tools is not None and plan.tools.mode == "required"
    assert plan.messages[0].role == "system" and "<tools>" in plan.messages[0].content
    assert plan.messages[1] == ChatMessage("user", "hi")
    assert plan.params.grammar is not None and plan.params.seed == 1


def test_a_completion_plan() -> None:
    req = CompletionRequest.model_validate({"model": "m", "prompt": "x", "logprobs": 0})
    assert plan_completion(req, ALL, "smol").logprobs == 0
    with pytest.raises(UnsupportedCapabilityError):
        plan_completion(req, PLAIN, "smol")


# answers

TOKENS = (
    TokenLogprob(
        "Hel",
        -0.25,
        (72, 101, 108),
        (TopLogprob("Hel", -0.25, (72, 101, 108)), TopLogprob("He", -1.5, (72, 101))),
    ),
    TokenLogprob("lo", float("-inf"), (108, 111), ()),
)
FINAL = Delta("", "stop", Usage(5, 2))
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def plan_of(**fields: Any) -> ToolPlan:
    plan = tool_plan(chat(**fields))
    assert plan is not None
    return plan


def test_a_chat_body_in_openais_shape() -> None:
    body = completion_body(
        "chat", "chatcmpl-1", 1, "smol", "Hello", FINAL, {"engine_s": 0.1}, logprobs=TOKENS
    )
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "Hello", "refusal": None}
    assert choice["finish_reason"] == "stop"
    assert choice["logprobs"] == {
        "content": [
            {
                "token": "Hel",
                "logprob": -0.25,
                "bytes": [72, 101, 108],
                "top_logprobs": [
                    {"token": "Hel", "logprob": -0.25, "bytes": [72, 101, 108]},
                    {"token": "He", "logprob": -1.5, "bytes": [72, 101]},
                ],
            },
            {"token": "lo", "logprob": -9999.0, "bytes": [108, 111], "top_logprobs": []},
        ],
        "refusal": None,
    }
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


def test_a_chat_body_with_tool_calls() -> None:
    body = completion_body("chat", "c", 1, "smol", CALL, FINAL, {}, tools=plan_of(tools=[WEATHER]))
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert (message["content"], message["refusal"]) == (None, None)
    (call,) = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def test_a_legacy_functions_body_answers_with_function_call() -> None:
    plan = plan_of(functions=[WEATHER["function"]])
    (choice,) = completion_body("chat", "c", 1, "smol", CALL, FINAL, {}, tools=plan)["choices"]
    assert choice["finish_reason"] == "function_call"
    assert choice["message"]["function_call"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert "tool_calls" not in choice["message"]


def test_a_call_cut_short_keeps_the_length_reason() -> None:
    cut = Delta("", "length", Usage(5, 2))
    (choice,) = completion_body("chat", "c", 1, "smol", CALL[:50], cut, {}, tools=plan_of(tools=[WEATHER]))[
        "choices"
    ]
    assert choice["finish_reason"] == "length" and choice["message"]["tool_calls"]


def test_a_completion_body_with_legacy_logprobs() -> None:
    (choice,) = completion_body("completion", "cmpl-1", 1, "smol", "Hello", FINAL, {}, logprobs=TOKENS)[
        "choices"
    ]
    assert choice["logprobs"] == {
        "tokens": ["Hel", "lo"],
        "token_logprobs": [-0.25, -9999.0],
        "top_logprobs": [{"Hel": -0.25, "He": -1.5}, {}],
        "text_offset": [0, 3],
    }


def events(raw: bytes) -> list[dict[str, Any]]:
    chunks = raw.decode().split("\n\n")
    assert chunks[-1] == ""
    return [json.loads(c.removeprefix("data: ")) for c in chunks[:-1]]


def stream(encoder: ChunkEncoder, deltas: list[Delta]) -> list[dict[str, Any]]:
    raw = encoder.opening() + b"".join(encoder.delta(d) for d in deltas) + encoder.usage(Usage(5, 2), {})
    return events(raw)


def test_plain_tokens_keep_the_fast_path() -> None:
    encoder = ChunkEncoder("chat", "c", 1, "smol")
    assert encoder.delta(Delta("Hi")) == encoder.token("Hi")
    assert encoder.delta(Delta("!", "length", Usage(1, 2))) == encoder.final("!", "length")


def test_streamed_tool_calls_in_openais_delta_form() -> None:
    encoder = ChunkEncoder("chat", "c", 1, "smol", tools=plan_of(tools=[WEATHER]))
    pieces = ["<tool_", 'call>\n{"name": "get_weather", "arguments": {"ci', 'ty": "Paris"}}\n</tool_call>']
    chunks = stream(encoder, [Delta(p) for p in pieces] + [FINAL])
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    start = deltas[1]["tool_calls"][0]
    assert (start["index"], start["type"], start["function"]) == (
        0,
        "function",
        {"name": "get_weather", "arguments": ""},
    )
    assert start["id"].startswith("call_")
    arguments = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas[2:-1])
    assert arguments == '{"city": "Paris"}' and all("id" not in d["tool_calls"][0] for d in deltas[2:-1])
    assert deltas[-1] == {} and chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"


def test_streamed_legacy_function_call() -> None:
    encoder = ChunkEncoder("chat", "c", 1, "smol", tools=plan_of(functions=[WEATHER["function"]]))
    chunks = stream(encoder, [Delta(CALL), FINAL])
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[1] == {"function_call": {"name": "get_weather", "arguments": ""}}
    assert deltas[2] == {"function_call": {"arguments": '{"city": "Paris"}'}}
    assert chunks[-2]["choices"][0]["finish_reason"] == "function_call"


def test_streamed_logprobs_ride_on_their_chunks() -> None:
    encoder = ChunkEncoder("chat", "c", 1, "smol", logprobs=True)
    chunks = stream(
        encoder, [Delta("Hel", logprobs=TOKENS[:1]), Delta("lo", "stop", Usage(5, 2), TOKENS[1:])]
    )
    first, last = chunks[1]["choices"][0], chunks[2]["choices"][0]
    assert first["delta"] == {"content": "Hel"} and first["logprobs"]["content"][0]["token"] == "Hel"
    assert last["finish_reason"] == "stop" and last["logprobs"]["content"][0]["logprob"] == -9999.0


def test_streamed_completion_logprobs_count_offsets() -> None:
    encoder = ChunkEncoder("completion", "c", 1, "smol", logprobs=True)
    chunks = stream(
        encoder, [Delta("Hel", logprobs=TOKENS[:1]), Delta("lo", "stop", Usage(5, 2), TOKENS[1:])]
    )
    assert [c["choices"][0]["logprobs"]["text_offset"] for c in chunks[:2]] == [[0], [3]]


def test_plain_text_through_a_tool_plan_streams_as_content() -> None:
    encoder = ChunkEncoder("chat", "c", 1, "smol", tools=plan_of(tools=[WEATHER]))
    chunks = stream(encoder, [Delta("It is "), Delta("sunny <3"), FINAL])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "It is sunny <3" and chunks[-2]["choices"][0]["finish_reason"] == "stop"


# against OpenAI's OpenAPI description


@pytest.fixture(scope="module")
def schemas() -> Iterator[dict[str, Any]]:
    if not SPEC.exists():
        pytest.skip(f"OpenAI's OpenAPI description is not at {SPEC} (the shared data directory is absent)")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with SPEC.open() as f:
        yield yaml.load(f, Loader=loader)["components"]["schemas"]


_TYPES: dict[str, Any] = {
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "array": list,
    "object": dict,
    "null": type(None),
}


def problems(value: Any, schema: dict[str, Any], schemas: dict[str, Any], path: str = "$") -> list[str]:
    """Where ``value`` breaks ``schema``: the keywords OpenAI's response schemas use (type, nullable, enum,
    required, properties, items, additionalProperties, anyOf/oneOf/allOf, $ref)."""
    if "$ref" in schema:
        return problems(value, schemas[schema["$ref"].rsplit("/", 1)[-1]], schemas, path)
    for key in ("anyOf", "oneOf"):
        if key in schema and all(problems(value, s, schemas, path) for s in schema[key]):
            return [f"{path}: matches none of {key}"]
    found = [p for s in schema.get("allOf", []) for p in problems(value, s, schemas, path)]
    if value is None and schema.get("nullable"):
        return found
    kinds = schema.get("type")
    if kinds is not None:
        wanted = tuple(_TYPES[k] for k in (kinds if isinstance(kinds, list) else [kinds]))
        if not isinstance(value, wanted) or (isinstance(value, bool) and bool not in wanted):
            return [*found, f"{path}: {value!r} is not {kinds}"]
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{path}: {value!r} not in {schema['enum']}")
    if isinstance(value, dict):
        found += [f"{path}.{k}: required" for k in schema.get("required", []) if k not in value]
        for k, v in value.items():
            sub = schema.get("properties", {}).get(k, schema.get("additionalProperties"))
            if isinstance(sub, dict):
                found += problems(v, sub, schemas, f"{path}.{k}")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            found += problems(v, schema["items"], schemas, f"{path}[{i}]")
    return found


def test_the_validator_finds_problems(schemas: dict[str, Any]) -> None:
    body = completion_body("chat", "c", 1, "smol", "x", FINAL, {})
    del body["choices"][0]["message"]["refusal"]
    body["choices"][0]["finish_reason"] = "done"
    found = problems(body, {"$ref": "CreateChatCompletionResponse"}, schemas)
    assert "$.choices[0].message.refusal: required" in found
    assert any("'done' not in" in p for p in found)


BODIES = [
    ("chat", "Hello", {}, {}),
    ("chat", "Hello", {"logprobs": TOKENS}, {}),
    ("chat", CALL, {}, {"tools": [WEATHER]}),
    ("chat", "Sure. " + CALL, {"logprobs": TOKENS}, {"tools": [WEATHER]}),
    ("chat", CALL, {}, {"functions": [WEATHER["function"]]}),
    ("completion", "Hello", {}, {}),
    ("completion", "Hello", {"logprobs": TOKENS}, {}),
]


@pytest.mark.parametrize(("kind", "text", "extra", "fields"), BODIES)
def test_bodies_match_openais_schema(
    schemas: dict[str, Any], kind: Any, text: str, extra: dict[str, Any], fields: dict[str, Any]
) -> None:
    tools = plan_of(**fields) if fields else None
    body = completion_body(kind, "id-1", 1, "smol", text, FINAL, {"engine_s": 0.1}, tools=tools, **extra)
    name = "CreateChatCompletionResponse" if kind == "chat" else "CreateCompletionResponse"
    assert problems(body, {"$ref": name}, schemas) == []


@pytest.mark.parametrize(("kind", "text", "extra", "fields"), BODIES)
def test_chunks_match_openais_schema(
    schemas: dict[str, Any], kind: Any, text: str, extra: dict[str, Any], fields: dict[str, Any]
) -> None:
    tools = plan_of(**fields) if fields else None
    encoder = ChunkEncoder(kind, "id-1", 1, "smol", tools=tools, logprobs="logprobs" in extra)
    tokens = extra.get("logprobs", ())
    deltas = [Delta(text[:7], logprobs=tuple(tokens[:1])), Delta(text[7:], logprobs=tuple(tokens[1:])), FINAL]
    name = "CreateChatCompletionStreamResponse" if kind == "chat" else "CreateCompletionResponse"
    chunks = stream(encoder, deltas)
    assert len(chunks) >= 3
    # one schema serves streamed and whole completions, its finish_reason not nullable; OpenAI's own
    # streams send null before the last chunk, and so do these
    streamed_null = "$.choices[0].finish_reason: None is not string"
    for chunk in chunks:
        found = problems(chunk, {"$ref": name}, schemas)
        if kind == "completion" and chunk["choices"] and chunk["choices"][0]["finish_reason"] is None:
            found.remove(streamed_null)
        assert found == [], chunk
