"""Guardrails: checks of a request's input and of a model's output (PII and secrets, prompt injection,
toxicity and blocked topics, answer length and JSON schema), and the policy that runs them in the gateway.

Presidio (and with it spaCy) is imported only when a pii guard is built.
"""

from lamina.application.guards._base import (
    Decision,
    Finding,
    Guard,
    GuardSettings,
    redact,
    run_chain,
    run_guard,
)
from lamina.application.guards._build import (
    SentenceEmbedder,
    build_guard,
    build_guards,
    bundled_embedder,
    input_guards,
    needs_embedder,
    output_guards,
)
from lamina.application.guards._injection import (
    INJECTION_WEIGHTS,
    InjectionClassifier,
    InjectionGuard,
    heuristic_findings,
    looks_suspicious,
)
from lamina.application.guards._lists import PROFANITY_LIST, WordListGuard, profanity_guard
from lamina.application.guards._output import JsonSchemaGuard, LengthGuard
from lamina.application.guards._pii import PII_ENTITIES, PiiGuard, plausible
from lamina.application.guards._policy import GuardPolicy, GuardRecorder, OutputGuards
from lamina.application.guards._stream import CHECK_EVERY, StreamGuard, stream_guard

__all__ = [
    "CHECK_EVERY",
    "INJECTION_WEIGHTS",
    "PII_ENTITIES",
    "PROFANITY_LIST",
    "Decision",
    "Finding",
    "Guard",
    "GuardPolicy",
    "GuardRecorder",
    "GuardSettings",
    "InjectionClassifier",
    "InjectionGuard",
    "JsonSchemaGuard",
    "LengthGuard",
    "OutputGuards",
    "PiiGuard",
    "SentenceEmbedder",
    "StreamGuard",
    "WordListGuard",
    "build_guard",
    "build_guards",
    "bundled_embedder",
    "heuristic_findings",
    "input_guards",
    "looks_suspicious",
    "needs_embedder",
    "output_guards",
    "plausible",
    "profanity_guard",
    "redact",
    "run_chain",
    "run_guard",
    "stream_guard",
]
