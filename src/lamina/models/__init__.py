"""Layer 4, models: the registry, engines per format, the replica worker and the catalog of served names.

The names that need the metadata store (the registry, the bundled models, gates, deploying, embedders
over registered versions) load on first use: a replica worker process, which imports this package for
its engines, has no use for SQLAlchemy and Alembic, and starts that much sooner without them.
"""

import importlib
from typing import TYPE_CHECKING, Any

from lamina.models._builtin_engines import FakeOptions, GGUFOptions, ONNXOptions
from lamina.models._catalog import Catalog, Route, ServedModel
from lamina.models._deploy import check_deployment, deploy, worker_workload
from lamina.models._engine import (
    Capability,
    ChatMessage,
    Delta,
    EmbeddingBatch,
    Engine,
    EngineDescriptor,
    EngineInfo,
    LoadSpec,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
    Usage,
    engine_descriptor,
    engine_descriptors,
    engine_for_format,
    engine_names,
    load_engine,
)
from lamina.models._formats import detect_format, read_metadata
from lamina.models._openai import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ModelCard,
    ModelList,
)
from lamina.models._quantize import METHODS as QUANT_METHODS
from lamina.models._query_embedder import DispatchQueryEmbedder, ThreadQueryEmbedder
from lamina.models._request_json import read_json
from lamina.models._routing import (
    Classifier,
    Features,
    KeywordClassifier,
    LatencyTracker,
    MemberStats,
    plan_tries,
    rank_members,
    retry_backoff_s,
    rule_matches,
)
from lamina.models._train import TrainSettings

if TYPE_CHECKING:
    from lamina.models._bundled import BUNDLED, BundledModel, register_bundled, registered_or_bundled
    from lamina.models._embedder import EngineEmbedder, HTTPEmbedder
    from lamina.models._gate_record import LIMITS as GATE_LIMITS
    from lamina.models._gate_record import GateRecord
    from lamina.models._model_version import ModelVersion
    from lamina.models._quantize_gate import GateResult, dataset_sample, quantize_and_gate
    from lamina.models._registry import Registry
    from lamina.models._train_gate import TrainingData, TrainResult, train_and_gate

#: a lazily loaded name: its module and its name there
_LAZY = {
    "BUNDLED": ("_bundled", "BUNDLED"),
    "BundledModel": ("_bundled", "BundledModel"),
    "register_bundled": ("_bundled", "register_bundled"),
    "registered_or_bundled": ("_bundled", "registered_or_bundled"),
    "EngineEmbedder": ("_embedder", "EngineEmbedder"),
    "HTTPEmbedder": ("_embedder", "HTTPEmbedder"),
    "GATE_LIMITS": ("_gate_record", "LIMITS"),
    "GateRecord": ("_gate_record", "GateRecord"),
    "ModelVersion": ("_model_version", "ModelVersion"),
    "GateResult": ("_quantize_gate", "GateResult"),
    "dataset_sample": ("_quantize_gate", "dataset_sample"),
    "quantize_and_gate": ("_quantize_gate", "quantize_and_gate"),
    "Registry": ("_registry", "Registry"),
    "TrainingData": ("_train_gate", "TrainingData"),
    "TrainResult": ("_train_gate", "TrainResult"),
    "train_and_gate": ("_train_gate", "train_and_gate"),
}


__all__ = [
    "BUNDLED",
    "GATE_LIMITS",
    "QUANT_METHODS",
    "BundledModel",
    "Capability",
    "Catalog",
    "ChatCompletionRequest",
    "ChatMessage",
    "Classifier",
    "CompletionRequest",
    "Delta",
    "DispatchQueryEmbedder",
    "EmbeddingBatch",
    "EmbeddingRequest",
    "Engine",
    "EngineDescriptor",
    "EngineEmbedder",
    "EngineInfo",
    "FakeOptions",
    "Features",
    "GGUFOptions",
    "GateRecord",
    "GateResult",
    "HTTPEmbedder",
    "KeywordClassifier",
    "LatencyTracker",
    "LoadSpec",
    "MemberStats",
    "ModelCard",
    "ModelList",
    "ModelVersion",
    "ONNXOptions",
    "Registry",
    "Route",
    "SamplingParams",
    "ServedModel",
    "ThreadQueryEmbedder",
    "TokenLogprob",
    "TopLogprob",
    "TrainResult",
    "TrainSettings",
    "TrainingData",
    "Usage",
    "check_deployment",
    "dataset_sample",
    "deploy",
    "detect_format",
    "engine_descriptor",
    "engine_descriptors",
    "engine_for_format",
    "engine_names",
    "load_engine",
    "plan_tries",
    "quantize_and_gate",
    "rank_members",
    "read_json",
    "read_metadata",
    "register_bundled",
    "registered_or_bundled",
    "retry_backoff_s",
    "rule_matches",
    "train_and_gate",
    "worker_workload",
]


def __getattr__(name: str) -> Any:
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{where[0]}"), where[1])
    globals()[name] = value
    return value
