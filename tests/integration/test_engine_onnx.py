"""The ONNX engine on the real bundled all-MiniLM-L6-v2 (int8), and its execution-provider choice."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from lamina.compute import default_threads
from lamina.errors import ConfigError, UnsupportedCapabilityError
from lamina.models._engine import Capability, ChatMessage, LoadSpec, SamplingParams, load_engine
from lamina.models._onnx import ONNXEngine, choose_providers
from tests.support import minilm_spec

pytestmark = pytest.mark.slow

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
AZURE = "AzureExecutionProvider"
MINILM_DIR = "all-MiniLM-L6-v2-onnx-int8"


@pytest.fixture(scope="module")
def engine() -> ONNXEngine:
    loaded = load_engine("onnx", minilm_spec(batch_size=2))
    assert isinstance(loaded, ONNXEngine)
    return loaded


def test_similar_sentences_are_closer(engine: ONNXEngine) -> None:
    eating, bread, drums = np.array(
        engine.embed(
            ["A man is eating food.", "A man is eating a piece of bread.", "A monkey is playing drums."]
        ).vectors
    )
    assert eating @ bread > eating @ drums + 0.2


def test_vectors_are_unit_norm_and_384_wide(engine: ONNXEngine) -> None:
    batch = engine.embed(["one", "two words", ""])
    vectors = np.array(batch.vectors)
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert engine.info().embedding_dim == 384


def test_a_mixed_batch_equals_one_by_one(engine: ONNXEngine) -> None:
    texts = [
        "short",
        "a considerably longer sentence that needs quite a few more word pieces than the others do",
        "medium length text here",
        "x " * 400,  # longer than max_length: truncated
        "another one",
    ]
    batched = np.array(engine.embed(texts).vectors)
    alone = np.array([engine.embed([t]).vectors[0] for t in texts])
    assert np.allclose(batched, alone, atol=1e-4)


def test_token_counts(engine: ONNXEngine) -> None:
    assert engine.count_tokens("hello world") == 4  # [CLS] hello world [SEP]
    assert engine.embed(["hello world", "hi"]).prompt_tokens == 4 + 3
    assert engine.count_tokens("x " * 400) == 256


def test_info_names_the_provider_in_use(engine: ONNXEngine) -> None:
    info = engine.info()
    assert info.device == CPU
    assert info.capabilities == {Capability.EMBEDDING}


def test_threads_default_to_the_usable_cores_and_follow_the_option(engine: ONNXEngine) -> None:
    assert engine.info().details["threads"] == str(default_threads())
    one = load_engine("onnx", minilm_spec(intra_op_threads=1))
    assert one.info().details["threads"] == "1"


def test_generation_is_unsupported(engine: ONNXEngine) -> None:
    with pytest.raises(UnsupportedCapabilityError, match="embedding"):
        engine.chat([ChatMessage("user", "hi")], SamplingParams())
    with pytest.raises(UnsupportedCapabilityError):
        engine.complete("hi", SamplingParams())


def test_missing_tokenizer_says_to_register_one() -> None:
    spec = minilm_spec()
    with pytest.raises(ConfigError, match="--tokenizer"):
        ONNXEngine(LoadSpec(name=spec.name, path=spec.path))


def test_unavailable_provider_is_refused_at_load() -> None:
    with pytest.raises(ConfigError, match=CPU):
        ONNXEngine(minilm_spec(providers=[CUDA]))


@pytest.mark.parametrize(
    ("preferred", "available", "expected"),
    [
        (None, [CPU], [CPU]),
        (None, [AZURE, CPU], [CPU]),
        (None, [CUDA, CPU], [CUDA, CPU]),
        (None, [CPU, CUDA, TRT], [TRT, CUDA, CPU]),
        ([CPU], [CUDA, CPU], [CPU]),
        ([CUDA], [TRT, CUDA, CPU], [CUDA, CPU]),
        ([CPU, CUDA], [CUDA, CPU], [CUDA, CPU]),
        ([CUDA, CUDA], [CUDA, CPU], [CUDA, CPU]),
        ([AZURE], [AZURE, CPU], [AZURE, CPU]),
    ],
)
def test_choose_providers(
    preferred: Sequence[str] | None, available: Sequence[str], expected: list[str]
) -> None:
    assert choose_providers(preferred, available) == expected


@pytest.mark.parametrize(("preferred", "available"), [([CUDA], [CPU]), ([TRT, CUDA], [CUDA, CPU])])
def test_choose_providers_refuses_what_is_missing(preferred: list[str], available: list[str]) -> None:
    with pytest.raises(ConfigError, match="available: " + ", ".join(available)):
        choose_providers(preferred, available)
