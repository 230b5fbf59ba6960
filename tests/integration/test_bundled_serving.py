"""What the default deployments serve of the bundled models: ``NAME@serving``, the bundled chat model's Q8_0
variant behind its accuracy gate (made on the first start that asks for it), else the file as shipped."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lamina.config import BUNDLED_CHAT_MODEL, BUNDLED_EMBEDDING_MODEL, LaminaConfig
from lamina.errors import ConflictError, ModelNotFoundError
from lamina.models import _quantize_gate
from lamina.models._bundled import register_bundled, registered_or_bundled
from lamina.models._quantize_gate import GateResult
from lamina.models._registry import Registry
from lamina.store import Store

SERVING = f"{BUNDLED_CHAT_MODEL}@serving"
WANTED = [d.model_ref for d in LaminaConfig().deployments]


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    store = Store(f"sqlite:///{tmp_path / 'lamina.db'}")
    store.migrate()
    yield Registry(store, tmp_path / "blobs")
    store.close()


def _refuse_to_quantize(monkeypatch: pytest.MonkeyPatch, why: Exception | GateResult) -> None:
    def quantize_and_gate(*_: Any, **__: Any) -> GateResult:
        if isinstance(why, Exception):
            raise why
        return why

    monkeypatch.setattr(_quantize_gate, "quantize_and_gate", quantize_and_gate)


@pytest.mark.slow  # llama.cpp quantizes the 98 MB file and the gate reads its prompts with both models
def test_the_default_chat_deployment_serves_the_gated_q8_0_variant(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert SERVING in WANTED and BUNDLED_EMBEDDING_MODEL in WANTED  # the embedding model: as shipped
    register_bundled(registry, WANTED)
    served = registry.get(SERVING)
    assert served.ref == f"{BUNDLED_CHAT_MODEL}@1-gguf-q8_0" and served.meta["quantization"] == "MOSTLY_Q8_0"
    assert served.gate is not None and served.gate.passed and served.gate.method == "gguf-q8_0"
    assert served.gate.figures["perplexity_ratio"] <= 1.1 and served.gate.figures["agreement"] >= 0.9
    assert registry.get(BUNDLED_CHAT_MODEL).ref == f"{BUNDLED_CHAT_MODEL}@1"  # the bare name: as shipped
    assert registry.get(f"{BUNDLED_CHAT_MODEL}@1").meta["quantization"] == "MOSTLY_Q4_1"
    with pytest.raises(ModelNotFoundError):
        registry.get(f"{BUNDLED_EMBEDDING_MODEL}@serving")
    # the next start finds it: nothing quantized again, nothing added
    before = [mv.ref for mv in registry.list()]
    _refuse_to_quantize(monkeypatch, AssertionError("quantized again"))
    register_bundled(registry, WANTED)
    assert [mv.ref for mv in registry.list()] == before and registry.get(SERVING).ref == served.ref
    # an alias moved by hand stays where it was put
    registry.alias(BUNDLED_CHAT_MODEL, "serving", "1")
    register_bundled(registry, WANTED)
    assert registry.get(SERVING).ref == f"{BUNDLED_CHAT_MODEL}@1"


@pytest.mark.parametrize("refusal", ["crash", "gate"])
def test_a_variant_that_cannot_be_made_or_fails_its_gate_serves_the_file_as_shipped(
    registry: Registry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, refusal: str
) -> None:
    failed = GateResult(
        ref=f"{BUNDLED_CHAT_MODEL}@1-gguf-q8_0",
        parent=f"{BUNDLED_CHAT_MODEL}@1",
        method="gguf-q8_0",
        passed=False,
        figures={"agreement": 0.5},
        tolerance={"min_agreement": 0.9},
        reasons=("agreement 0.5 is not at least 0.9 (min_agreement)",),
        size_bytes=1,
        parent_size_bytes=1,
        quantize_s=0.0,
        evaluate_s=0.0,
    )
    _refuse_to_quantize(monkeypatch, RuntimeError("the quantizer crashed") if refusal == "crash" else failed)
    with caplog.at_level(logging.WARNING, logger="lamina.models"):
        register_bundled(registry, WANTED)
    assert registry.get(SERVING).ref == f"{BUNDLED_CHAT_MODEL}@1"
    said = "RuntimeError: the quantizer crashed" if refusal == "crash" else "failed the gate: agreement 0.5"
    assert any(
        said in r.getMessage() and "serving smollm2-135m-instruct@1 as shipped" in r.getMessage()
        for r in caplog.records
    ), caplog.text


@pytest.mark.slow
def test_a_gateway_that_loses_the_race_to_make_the_variant_takes_the_one_made(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = _quantize_gate.quantize_and_gate

    def raced(registry: Registry, ref: str, method: str, *args: Any, **kw: Any) -> GateResult:
        real(registry, ref, method)  # another gateway on the same store, a moment sooner
        raise ConflictError(f"{ref}-{method} already exists")

    monkeypatch.setattr(_quantize_gate, "quantize_and_gate", raced)
    register_bundled(registry, WANTED)
    assert registry.get(SERVING).ref == f"{BUNDLED_CHAT_MODEL}@1-gguf-q8_0"


def test_a_serving_reference_resolved_before_any_start_is_made_there(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # e.g. `lamina compute fit smollm2-135m-instruct@serving` on a fresh state folder
    _refuse_to_quantize(monkeypatch, RuntimeError("no quantizer here"))
    assert registered_or_bundled(registry, SERVING).ref == f"{BUNDLED_CHAT_MODEL}@1"
    assert registered_or_bundled(registry, BUNDLED_EMBEDDING_MODEL).ref == f"{BUNDLED_EMBEDDING_MODEL}@1"
    with pytest.raises(ModelNotFoundError):
        registered_or_bundled(registry, "no-such-model")
