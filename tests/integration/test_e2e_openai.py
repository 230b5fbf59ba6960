"""The Done-when of the serving core: `lamina up` on the embedded defaults, driven by the official client.

One real stack for the module: a `lamina up` subprocess with SmolLM2 (GGUF, llama.cpp) and MiniLM (ONNX).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from lamina.observability import SpanRow, read_trace
from lamina.store import Store
from tests.support import RunningStack, start_stack, stop_stack

pytestmark = pytest.mark.slow

CHAT = "smollm2-135m-instruct"
EMBED = "minilm-l6-v2"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    running = start_stack(tmp_path_factory.mktemp("stack"))
    yield running
    leftovers = stop_stack(running)
    assert leftovers == [], f"processes left after SIGTERM: {leftovers}"


@pytest.fixture(scope="module")
def client(stack: RunningStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="any-key", max_retries=0)


def test_lists_both_models(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {CHAT, EMBED} <= ids


def test_chat_completion(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        max_tokens=16,
        temperature=0,
    )
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason in {"stop", "length"}
    assert reply.usage is not None and reply.usage.prompt_tokens > 0
    assert 0 < reply.usage.completion_tokens <= 16
    assert reply.model == CHAT


def test_streamed_chat_completion(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": "Count from one to ten in words."}],
        max_tokens=40,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert len([p for p in pieces if p]) > 3
    assert "".join(pieces).strip()
    assert finish in {"stop", "length"}
    assert usage is not None and usage.completion_tokens > 0


def test_streamed_and_plain_greedy_answers_agree(client: openai.OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Name three colours."}]
    plain = client.chat.completions.create(model=CHAT, messages=messages, max_tokens=24, temperature=0)
    streamed = client.chat.completions.create(
        model=CHAT, messages=messages, max_tokens=24, temperature=0, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == plain.choices[0].message.content


def test_completion(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=CHAT, prompt="The sky is", max_tokens=8, temperature=0)
    assert reply.choices[0].text
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def test_embeddings_rank_by_meaning(client: openai.OpenAI) -> None:
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "A monkey is playing drums."]
    result = client.embeddings.create(model=EMBED, input=texts)
    vectors = np.array([d.embedding for d in result.data])
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    bread, drums = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert bread > drums
    float_result = client.embeddings.create(model=EMBED, input=texts[0], encoding_format="float")
    assert np.allclose(float_result.data[0].embedding, vectors[0], atol=1e-6)


def test_unknown_model_is_404_listing_models(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "hi"}])
    message = str(info.value)
    assert "gpt-17" in message and CHAT in message and EMBED in message


def test_prompt_beyond_context_is_400_with_numbers(client: openai.OpenAI) -> None:
    long_text = "word " * 6000
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": long_text}])
    body = info.value.body
    assert isinstance(body, dict) and body.get("code") == "context_length_exceeded"
    assert "4096" in str(body.get("message"))


def test_malformed_body_names_the_field(stack: RunningStack) -> None:
    r = httpx.post(f"{stack.base_url}/v1/chat/completions", json={"model": CHAT}, timeout=30)
    assert r.status_code in (400, 422)
    assert "messages" in r.text
    r = httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_chat_on_an_embedding_model_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=EMBED, messages=[{"role": "user", "content": "hi"}])
    assert "embedding" in str(info.value)


def test_health_and_metrics(stack: RunningStack, client: openai.OpenAI) -> None:
    assert httpx.get(f"{stack.base_url}/healthz").status_code == 200
    assert httpx.get(f"{stack.base_url}/readyz").status_code == 200
    client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    text = httpx.get(f"{stack.base_url}/metrics").text
    assert f'lamina_requests_total{{endpoint="/v1/chat/completions",model="{CHAT}"' in text or (
        "lamina_requests_total" in text and CHAT in text
    )
    assert "lamina_time_to_first_token_seconds" in text


def test_every_request_leaves_a_trace_with_a_span_per_layer(stack: RunningStack) -> None:
    r = httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        json={"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        timeout=60,
    )
    assert r.status_code == 200
    trace_id = r.headers["x-lamina-trace-id"]
    store = Store(f"sqlite:///{stack.state_dir / 'lamina.db'}")
    deadline, spans = time.monotonic() + 20, list[SpanRow]()
    while time.monotonic() < deadline and len({s["layer"] for s in spans}) < 3:
        spans = read_trace(store, trace_id)
        time.sleep(0.5)
    store.close()
    layers = {s["layer"] for s in spans}
    assert {"application", "models", "orchestration"} <= layers
    root = next(s for s in spans if s["parent_span_id"] is None)
    assert root["attributes"]["gen_ai.request.model"] == CHAT
    assert root["attributes"]["gen_ai.usage.output_tokens"] > 0


def test_state_dir_holds_the_registry(stack: RunningStack) -> None:
    assert (stack.state_dir / "lamina.db").exists()
    assert any(Path(stack.state_dir / "blobs").rglob("*"))
