"""Issue 8's Done-when through the official openai client, LangChain and a real stack: structured outputs,
tool calls, log probabilities, a client that leaves mid-stream, and greedy answers that do not depend on the
traffic around them.

One `lamina up` subprocess for the module, SmolLM2 on llama.cpp with 8 parallel slots.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageFunctionToolCall
from pydantic import BaseModel

from tests.support import RunningStack, start_stack, stop_stack

pytestmark = pytest.mark.slow

CHAT = "smollm2-135m-instruct"
CONFIG = """
register_bundled: true
deployments:
  - name: smollm2-135m-instruct
    engine: gguf
    gguf: {n_ctx: 2048, parallel: 8}
"""

#: typed loosely: the tests send what a client sends, not what the SDK's types spell
WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


class City(BaseModel):
    name: str
    country: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    running = start_stack(tmp_path_factory.mktemp("api"), CONFIG)
    yield running
    assert stop_stack(running) == []


@pytest.fixture(scope="module")
def client(stack: RunningStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="any-key", max_retries=0, timeout=120)


def test_json_schema_output_parses_into_a_pydantic_model(client: openai.OpenAI) -> None:
    reply = client.beta.chat.completions.parse(
        model=CHAT,
        messages=[{"role": "user", "content": "Name a city in France and its country."}],
        response_format=City,
        max_tokens=80,
        temperature=0,
    )
    city = reply.choices[0].message.parsed
    assert isinstance(city, City) and city.name and city.country
    assert reply.choices[0].message.refusal is None


def test_json_object_mode_answers_json(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": "Give a JSON object with a key 'color' set to a colour."}],
        response_format={"type": "json_object"},
        max_tokens=40,
        temperature=0,
    )
    content = reply.choices[0].message.content
    assert content is not None and isinstance(json.loads(content), dict)


def test_a_forced_tool_call_and_its_result_continue_the_conversation(client: openai.OpenAI) -> None:
    question: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client.chat.completions.create(
        model=CHAT,
        messages=question,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=60,
        temperature=0,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls and isinstance(calls[0], ChatCompletionMessageFunctionToolCall)
    assert calls[0].function.name == "get_weather"
    arguments = json.loads(calls[0].function.arguments)
    assert set(arguments) == {"city"} and isinstance(arguments["city"], str)
    followup = client.chat.completions.create(
        model=CHAT,
        messages=[
            *question,
            cast(Any, choice.message.model_dump(exclude_none=True)),
            {"role": "tool", "tool_call_id": calls[0].id, "content": '{"temperature_c": 21, "sky": "sunny"}'},
        ],
        tools=[WEATHER],
        max_tokens=40,
        temperature=0,
    )
    assert followup.choices[0].message.content


def test_streamed_tool_calls_use_openai_deltas(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": "What is the weather in Rome?"}],
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=60,
        temperature=0,
        stream=True,
    )
    name, arguments, finish = "", "", None
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                name += (call.function.name or "") if call.function else ""
                arguments += (call.function.arguments or "") if call.function else ""
            finish = choice.finish_reason or finish
    assert name == "get_weather" and finish == "tool_calls"
    assert set(json.loads(arguments)) == {"city"}


def test_logprobs_come_back(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    logprobs, usage = reply.choices[0].logprobs, reply.usage
    assert logprobs is not None and usage is not None
    content = logprobs.content
    assert content and len(content) == usage.completion_tokens
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content)


def test_a_field_the_engine_cannot_honour_is_a_400_naming_it(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=CHAT,
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}
            ],
            max_tokens=5,
        )
    assert "messages.0.content.0" in str(refused.value)


def test_identical_greedy_requests_answer_the_same_alone_and_in_a_batch_of_8(client: openai.OpenAI) -> None:
    def ask(question: str) -> str:
        reply = client.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": question}], max_tokens=32, temperature=0
        )
        return reply.choices[0].message.content or ""

    question = "Tell me one fact about the ocean."
    alone = ask(question)
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, [question] * 8))
    assert together == [alone] * 8


def test_a_client_leaving_mid_stream_frees_its_slot(stack: RunningStack, client: openai.OpenAI) -> None:
    body = {
        "model": CHAT,
        "messages": [{"role": "user", "content": "Write a very long story about the sea."}],
        "max_tokens": 1500,
        "temperature": 0.8,
        "stream": True,
    }
    with httpx.Client(timeout=60) as http:
        streams = [http.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body) for _ in range(8)]
        for s in streams:  # all eight slots busy and streaming
            response = s.__enter__()
            assert response.status_code == 200
            next(response.iter_lines())
        for s in streams:  # every client leaves
            s.__exit__(None, None, None)
    started = time.monotonic()
    reply = client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
    )
    # had the eight kept their slots, this would wait for 1500 tokens of one of them (over 10 s here)
    assert reply.choices[0].message.content is not None
    assert time.monotonic() - started < 8


def test_langchain_structured_output_and_bound_tools(stack: RunningStack) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    settings: dict[str, Any] = {"model": CHAT, "base_url": f"{stack.base_url}/v1", "api_key": "any-key"}
    llm = ChatOpenAI(**settings, temperature=0, max_tokens=80, max_retries=0)
    structured = llm.with_structured_output(City, method="json_schema")
    city = structured.invoke("Name a city in Italy and its country.")
    assert isinstance(city, City)  # parsed and validated; what a 135M model puts in the fields may be thin

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return "sunny"

    answer = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Oslo?")
    assert answer.tool_calls and answer.tool_calls[0]["name"] == "get_weather"
    assert isinstance(answer.tool_calls[0]["args"]["city"], str)


def test_a_client_leaving_before_its_whole_answer_frees_its_slot(
    stack: RunningStack, client: openai.OpenAI
) -> None:
    body = {
        "model": CHAT,
        "messages": [{"role": "user", "content": "Write a very long story about the mountains."}],
        "max_tokens": 1500,
        "temperature": 0.8,
    }

    def give_up(_: int) -> None:
        with pytest.raises(httpx.ReadTimeout):  # the client stops waiting and closes its connection
            httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=httpx.Timeout(5, read=2))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(give_up, range(8)))
    started = time.monotonic()
    reply = client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
    )
    assert reply.choices[0].message.content is not None
    assert time.monotonic() - started < 8
