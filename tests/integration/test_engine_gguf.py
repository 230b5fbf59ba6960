"""The GGUF engine on the real bundled SmolLM2-135M-Instruct, loaded once for the module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import llama_cpp.llama
import pytest

from lamina.compute import default_threads
from lamina.errors import ConfigError, UnsupportedCapabilityError
from lamina.models import Capability, ChatMessage, LoadSpec, SamplingParams, load_engine
from lamina.models._gguf import GGUFEngine, context_window, model_params_with_extra_bufts
from tests.support import smollm2_path

pytestmark = pytest.mark.slow

QUESTION = [ChatMessage("system", "Answer briefly."), ChatMessage("user", "What is the capital of France?")]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def engine() -> Iterator[GGUFEngine]:
    loaded = load_engine("gguf", LoadSpec(name="smol", path=smollm2_path(), options={}))
    assert isinstance(loaded, GGUFEngine)
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def llama(engine: GGUFEngine) -> Iterator[Any]:
    """llama-cpp-python used directly, as the reference the engine must agree with."""
    with model_params_with_extra_bufts(False):
        path, threads = str(smollm2_path()), default_threads()  # the engine's own default
        llm = llama_cpp.Llama(model_path=path, n_ctx=4096, n_threads=threads, verbose=False)
    yield llm
    llm.close()


def test_chat_answers(engine: GGUFEngine) -> None:
    deltas = list(engine.chat(QUESTION, GREEDY))
    text = "".join(d.text for d in deltas)
    assert text.strip()
    final = deltas[-1]
    assert final.finish_reason in {"stop", "length"}
    assert final.usage is not None and 0 < final.usage.completion_tokens <= 24
    assert final.usage.prompt_tokens == engine.count_chat_tokens(QUESTION)


def test_stream_matches_llama_cpp_greedy_answer(engine: GGUFEngine, llama: Any) -> None:
    deltas = [d for d in engine.chat(QUESTION, GREEDY) if d.text]
    assert len(deltas) > 3
    reference = llama.create_chat_completion(
        [{"role": m.role, "content": m.content} for m in QUESTION], max_tokens=24, temperature=0.0
    )
    assert "".join(d.text for d in deltas) == reference["choices"][0]["message"]["content"]


def test_greedy_does_not_depend_on_what_ran_before(engine: GGUFEngine) -> None:
    # a prompt whose first greedy token is a near-tie: replaying the cached prompt used to flip it
    color = [ChatMessage("user", "Name a color.")]
    answers = ["".join(d.text for d in engine.chat(color, GREEDY)) for _ in range(3)]
    list(engine.chat(QUESTION, GREEDY))
    answers.append("".join(d.text for d in engine.chat(color, GREEDY)))
    assert len(set(answers)) == 1, answers


def test_count_chat_tokens_equals_llamas_prompt_count(engine: GGUFEngine, llama: Any) -> None:
    for messages in (QUESTION, [ChatMessage("user", "Hi!")], [*QUESTION, ChatMessage("assistant", "Paris.")]):
        reference = llama.create_chat_completion(
            [{"role": m.role, "content": m.content} for m in messages], max_tokens=1, temperature=0.0
        )
        assert engine.count_chat_tokens(messages) == reference["usage"]["prompt_tokens"]


def test_completion_and_max_tokens(engine: GGUFEngine, llama: Any) -> None:
    prompt = "The capital of France is"
    deltas = list(engine.complete(prompt, SamplingParams(max_tokens=5, temperature=0.0)))
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == 5
    reference = llama.create_completion(prompt, max_tokens=5, temperature=0.0)
    assert "".join(d.text for d in deltas) == reference["choices"][0]["text"]
    assert engine.count_tokens(prompt) == reference["usage"]["prompt_tokens"]


def test_stop_strings_end_the_answer(engine: GGUFEngine) -> None:
    prompt = "1, 2, 3, 4, 5, 6,"
    free = "".join(d.text for d in engine.complete(prompt, SamplingParams(max_tokens=12, temperature=0.0)))
    assert " 9" in free, free
    deltas = list(engine.complete(prompt, SamplingParams(max_tokens=12, temperature=0.0, stop=(" 9",))))
    assert "".join(d.text for d in deltas) == free[: free.index(" 9")]
    assert deltas[-1].finish_reason == "stop"


def test_info(engine: GGUFEngine) -> None:
    info = engine.info()
    assert info.engine == "gguf" and info.device == "cpu"
    assert info.capabilities == {
        Capability.CHAT,
        Capability.COMPLETION,
        Capability.STREAMING,
        Capability.BATCHING,
        Capability.LOGPROBS,
        Capability.GRAMMAR,
        Capability.PENALTIES,
    }
    assert info.context_length == 4096 and info.details["parallel"] == "4"
    assert info.details["use_extra_bufts"] == "false"
    assert info.details["threads"] == str(default_threads())  # one per physical core this process may use
    assert info.details["quantization"] == "Q4_1"


def test_context_is_capped_at_the_trained_length() -> None:
    metadata = {"general.architecture": "llama", "llama.context_length": "8192"}
    assert context_window(4096, metadata) == 4096
    assert context_window(16384, metadata) == 8192
    assert context_window(2048, {"general.architecture": "qwen2", "qwen2.context_length": "1024"}) == 1024
    assert context_window(2048, {}) == 2048


def test_small_n_ctx_option_is_reported() -> None:
    small = GGUFEngine(LoadSpec(name="smol", path=smollm2_path(), options={"n_ctx": 256}))
    try:
        assert small.info().context_length == 256
    finally:
        small.close()


def test_repacking_patch_is_scoped() -> None:
    module: Any = llama_cpp.llama.llama_cpp  # type: ignore[attr-defined]
    original = module.llama_model_default_params
    with model_params_with_extra_bufts(False):
        assert module.llama_model_default_params is not original
        assert module.llama_model_default_params().use_extra_bufts is False
    assert module.llama_model_default_params is original


def test_embeddings_are_unsupported(engine: GGUFEngine) -> None:
    with pytest.raises(UnsupportedCapabilityError, match="not embeddings"):
        engine.embed(["hello"])


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        GGUFEngine(LoadSpec(name="gone", path=tmp_path / "gone.gguf"))
