"""The guards of a ``guards:`` config section, built once by the composition root."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import anyio

from lamina.application.guards._base import Guard, GuardSettings
from lamina.application.guards._injection import InjectionClassifier, InjectionGuard
from lamina.application.guards._lists import WordListGuard, profanity_guard
from lamina.application.guards._output import JsonSchemaGuard, LengthGuard
from lamina.application.guards._pii import DEFAULT_THRESHOLD, PiiGuard
from lamina.application.guards._policy import GuardPolicy, GuardRecorder, OutputGuards, RequestSchema
from lamina.config import BUNDLED_EMBEDDING_MODEL, GuardConfig, GuardsConfig
from lamina.errors import ConfigError
from lamina.models import EngineEmbedder, ONNXOptions, Registry, registered_or_bundled
from lamina.observability import GatewayMetrics


class SentenceEmbedder(Protocol):
    """What the injection classifier needs: the bundled MiniLM (``EngineEmbedder`` is one)."""

    @property
    def sha256(self) -> str: ...

    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


def needs_embedder(config: GuardsConfig) -> bool:
    """Whether an injection guard of ``config`` runs the embedding classifier."""
    return any(g.kind == "injection" and g.classifier != "never" for g in (*config.input, *config.output))


def _settings(cfg: GuardConfig) -> GuardSettings:
    return GuardSettings(
        action=cfg.action,
        fail_open=cfg.fail_open,
        timeout_s=cfg.timeout_ms / 1000,
        exempt=frozenset(cfg.exempt_keys),
    )


def _classifier(cfg: GuardConfig, embedder: SentenceEmbedder | None) -> InjectionClassifier | None:
    if cfg.classifier == "never":
        return None
    if embedder is None:
        raise ConfigError(
            f"the injection guard {cfg.name or cfg.kind!r} needs the embedding model for its classifier; "
            "set its classifier to never, or let the stack load the bundled minilm-l6-v2"
        )
    classifier = InjectionClassifier(embedder.embed, threshold=cfg.threshold)
    if classifier.model_sha256 != embedder.sha256:
        raise ConfigError(
            f"the injection classifier was trained on the embedding model with sha256 "
            f"{classifier.model_sha256[:12]}..., not on the one loaded ({embedder.sha256[:12]}...); "
            "retrain it with bench/train_injection.py or set the guard's classifier to never"
        )
    return classifier


def build_guard(cfg: GuardConfig, embedder: SentenceEmbedder | None = None) -> Guard:
    """One guard from its config (raises ConfigError for a combination it cannot honour)."""
    settings, name = _settings(cfg), cfg.name or cfg.kind
    try:
        if cfg.kind == "pii":
            return PiiGuard(
                settings, name=name, entities=cfg.entities, threshold=cfg.threshold or DEFAULT_THRESHOLD
            )
        if cfg.kind == "injection":
            classifier = _classifier(cfg, embedder)
            return InjectionGuard(settings, name=name, classifier=classifier, mode=cfg.classifier)
        if cfg.kind == "toxicity":
            return profanity_guard(settings, name=name, extra=cfg.words)
        if cfg.kind == "topics":
            return WordListGuard(
                settings, name=name, entity="BLOCKED_TOPIC", words=cfg.words, patterns=cfg.patterns
            )
        if cfg.kind == "length":
            return LengthGuard(settings, name=name, max_chars=cfg.max_chars, max_tokens=cfg.max_tokens)
        assert cfg.json_schema is not None
        return JsonSchemaGuard(settings, name=name, schema=cfg.json_schema)
    except ValueError as exc:
        raise ConfigError(f"guards: {exc}") from exc


def _request_schema(cfg: GuardConfig) -> RequestSchema:
    settings, name = _settings(cfg), cfg.name or cfg.kind

    def make(schema: dict[str, Any]) -> JsonSchemaGuard:
        return JsonSchemaGuard(settings, name=name, schema=schema)

    return RequestSchema(name, make)


def build_guards(
    config: GuardsConfig, *, metrics: GatewayMetrics | None, embedder: SentenceEmbedder | None = None
) -> tuple[GuardPolicy | None, OutputGuards | None]:
    """The input policy and the output guards of ``config`` (None for a side with no guards)."""
    for side, items in (("input", config.input), ("output", config.output)):
        names = [g.name or g.kind for g in items]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"guards.{side} names {', '.join(dupes)} twice; give each guard its own name")
    recorder = GuardRecorder(metrics)
    limiter = anyio.CapacityLimiter(8)
    policy = None
    if config.input:
        policy = GuardPolicy([build_guard(g, embedder) for g in config.input], recorder, limiter)
    output = None
    if config.output:
        fixed = [g for g in config.output if not (g.kind == "json_schema" and g.json_schema is None)]
        per_request = [
            _request_schema(g) for g in config.output if g.kind == "json_schema" and not g.json_schema
        ]
        output = OutputGuards(
            [build_guard(g, embedder) for g in fixed], recorder, request_schemas=per_request, limiter=limiter
        )
    return policy, output


def bundled_embedder(registry: Registry) -> EngineEmbedder:
    """The bundled MiniLM in this process, for the injection classifier (registered now if missing); one
    ONNX Runtime thread: a guard embeds one prompt at a time, where more threads mostly spin (the README's
    Guardrails section has the figures)."""
    mv = registered_or_bundled(registry, BUNDLED_EMBEDDING_MODEL)
    return EngineEmbedder(mv, ONNXOptions(intra_op_threads=1))


def input_guards(
    config: GuardsConfig, metrics: GatewayMetrics | None, registry: Registry
) -> GuardPolicy | None:
    """The input side of ``config`` as a policy (None: no input guards)."""
    side = config.model_copy(update={"output": []})
    embedder = bundled_embedder(registry) if needs_embedder(side) else None
    return build_guards(side, metrics=metrics, embedder=embedder)[0]


def output_guards(
    config: GuardsConfig, metrics: GatewayMetrics | None, registry: Registry
) -> OutputGuards | None:
    """The output side of ``config`` (None: no output guards)."""
    side = config.model_copy(update={"input": []})
    embedder = bundled_embedder(registry) if needs_embedder(side) else None
    return build_guards(side, metrics=metrics, embedder=embedder)[1]
