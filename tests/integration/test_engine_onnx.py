"""The ONNX engine on the real bundled all-MiniLM-L6-v2 (int8) and on its int8-compute variant, how it
batches texts, and its execution-provider choice."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from lamina.compute import default_threads
from lamina.errors import ConfigError, UnsupportedCapabilityError
from lamina.models._engine import Capability, ChatMessage, LoadSpec, SamplingParams, load_engine
from lamina.models._onnx import ONNXEngine, choose_providers, length_batches, quantizes_at_run_time
from lamina.models._quantize import quantize_file
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


def test_batches_hold_similar_lengths_within_their_texts_and_tokens() -> None:
    lengths = [256, 12, 256, 20, 256, 14, 256, 256, 900]
    batches = list(length_batches(lengths, batch_size=2, max_tokens=1024))
    assert batches == [[1, 5], [3, 0], [2, 4], [6, 7], [8]]  # shortest first, 2 texts at most
    batches = list(length_batches(lengths, batch_size=32, max_tokens=1024))
    # padded to the longest of each: 3 short ones and one of 256 would be 4 x 256 = 1024
    assert batches == [[1, 5, 3, 0], [2, 4, 6, 7], [8]]  # a text over the budget runs alone
    assert [len(b) for b in length_batches([20] * 100, 32, 1024)] == [32, 32, 32, 4]
    assert [len(b) for b in length_batches([40] * 30, 32, 1024)] == [25, 5]  # 25 x 40 = 1,000 tokens
    assert engine_details(32, None)["max_batch_tokens"] == "512"  # the CPU's default


def engine_details(batch_size: int, max_batch_tokens: int | None) -> dict[str, str]:
    spec = minilm_spec(batch_size=batch_size, max_batch_tokens=max_batch_tokens)
    return ONNXEngine(spec).info().details


@pytest.fixture(scope="module")
def int8_compute(tmp_path_factory: pytest.TempPathFactory) -> ONNXEngine:
    """The bundled model quantized as `lamina models quantize --method onnx-int8-per-channel` does it:
    int8 weights, activations quantized at run time with one scale for the whole pass."""
    spec = minilm_spec()
    assert spec.path is not None and not quantizes_at_run_time(str(spec.path))
    out = quantize_file(spec.path, "onnx-int8-per-channel", tmp_path_factory.mktemp("q") / "q.onnx")
    assert quantizes_at_run_time(str(out))
    return ONNXEngine(dataclasses.replace(spec, path=Path(out)))


def test_a_model_that_quantizes_at_run_time_gives_a_text_the_same_vector_whatever_is_beside_it(
    engine: ONNXEngine, int8_compute: ONNXEngine
) -> None:
    text = "How do vaccines train the immune system to recognise a virus?"
    others = ["ZZZZ 99999 !!!! ???? ----", "The mitochondria is the powerhouse of the cell.", "x " * 300]
    alone = int8_compute.embed([text]).vectors[0]
    for k in range(1, len(others) + 1):
        assert int8_compute.embed([text, *others[:k]]).vectors[0] == alone  # bit for bit
    assert int8_compute.info().details["batch_size"] == "1"  # one text per pass
    float_vector = np.array(engine.embed([text]).vectors[0])
    assert 0.98 < float_vector @ np.array(alone) < 1.0  # the same model, int8 arithmetic


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
