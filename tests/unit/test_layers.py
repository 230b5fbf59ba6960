"""The rules of the house, read from the source: layers import downward, the data layer's sub-packages
import in their order, no module reaches into another package's private module, modules stay small, and
each layer's public surface is pinned."""

from __future__ import annotations

import ast
import importlib
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
LAMINA = SRC / "lamina"

#: rank of each layer; a module may import a package of equal or lower rank
LAYERS = {"compute": 1, "orchestration": 2, "data": 3, "models": 4, "application": 5}
#: importable from every layer; they import no layer themselves
FOUNDATION = {"clock", "config", "errors", "logs", "store", "observability"}
#: the composition root and the CLI wire everything: they may import any layer
TOP = {"stack", "cli", "__init__", "__main__"}
#: the data layer's sub-packages, lowest first; modules directly in ``lamina.data`` (retrieval) sit on top
DATA_ORDER = {"vectors": 1, "versions": 2, "ingest": 3, "drift": 3}
DATA_TOP = 9
#: no module of src/lamina is longer (starlette's largest is 876 lines; we aim lower)
MAX_MODULE_LINES = 400


@dataclass(frozen=True)
class Import:
    line: int
    #: the module imported, or the module a name is imported from
    module: str
    #: for ``from M import N``: N (it may be a submodule)
    name: str | None = None


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [Import(node.lineno, node.module, a.name) for a in node.names]
    return found


def _sources() -> list[tuple[str, Path]]:
    return [(_module_name(p), p) for p in sorted(LAMINA.rglob("*.py"))]


def _layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "lamina":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def layer_violations(sources: list[tuple[str, Path]]) -> list[str]:
    bad: list[str] = []
    for module, path in sources:
        owner = _layer_of(module)
        if owner is None or owner in TOP:
            continue
        for imp in _imports(path):
            target = _layer_of(imp.module)
            if target is None or target == owner:
                continue
            if owner in FOUNDATION:
                ok = target in {"clock", "config", "errors", "logs", "store"}
            else:
                ok = target in FOUNDATION or LAYERS.get(target, 99) < LAYERS[owner]
            if not ok:
                bad.append(f"{module}:{imp.line} ({owner}) imports {imp.module} ({target})")
    return bad


def _data_rank(module: str) -> int | None:
    """The rank of a module of ``lamina.data`` (None: not in the data layer)."""
    parts = module.split(".")
    if parts[:2] != ["lamina", "data"]:
        return None
    if len(parts) == 2 or parts[2].startswith("_"):
        return DATA_TOP
    return DATA_ORDER.get(parts[2], DATA_TOP)


def data_order_violations(sources: list[tuple[str, Path]]) -> list[str]:
    """A data sub-package imports only itself and the sub-packages below it, never ``lamina.data``."""
    bad: list[str] = []
    for module, path in sources:
        rank = _data_rank(module)
        if rank is None or rank == DATA_TOP:
            continue
        own = module.split(".")[2]
        for imp in _imports(path):
            target = _data_rank(imp.module)
            if target is None or imp.module.split(".")[2:3] == [own]:
                continue
            if target >= rank:
                bad.append(f"{module}:{imp.line} imports {imp.module}, which is not below {own}")
    return bad


def _private_owner(module: str) -> str | None:
    """The package whose private module ``module`` is (``a.b`` for ``a.b._c.d``), or None if public."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not (part.startswith("__") and part.endswith("__")):
            return ".".join(parts[:i])
    return None


def private_violations(sources: list[tuple[str, Path]]) -> list[str]:
    """``_``-modules are private to their package (and its sub-packages); others import its exports."""
    bad: list[str] = []
    for module, path in sources:
        for imp in _imports(path):
            targets = [imp.module]
            if imp.name is not None and imp.name.startswith("_"):
                targets.append(f"{imp.module}.{imp.name}")  # ``from pkg import _module``
            for target in targets:
                owner = _private_owner(target)
                if owner is None or not owner.startswith("lamina"):
                    continue
                if module != owner and not module.startswith(owner + "."):
                    bad.append(f"{module}:{imp.line} imports {target}, private to {owner}")
    return bad


def test_layers_import_downward_only() -> None:
    assert layer_violations(_sources()) == []


def test_data_subpackages_import_in_their_order() -> None:
    assert data_order_violations(_sources()) == []


def test_no_module_imports_another_packages_private_module() -> None:
    assert private_violations(_sources()) == []


def test_no_module_is_over_the_size_limit() -> None:
    long = {
        m: n
        for m, p in _sources()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}, f"split these modules by concept (at most {MAX_MODULE_LINES} lines)"


def test_the_data_layer_is_a_handful_of_subpackages() -> None:
    packages = sorted(p.parent.name for p in (LAMINA / "data").glob("*/__init__.py"))
    assert packages == sorted(DATA_ORDER)


def _fake_sources(tmp_path: Path, files: dict[str, str]) -> list[tuple[str, Path]]:
    found = []
    for module, text in files.items():
        path = tmp_path / f"{module.replace('.', '_')}.py"
        path.write_text(text)
        found.append((module, path))
    return found


def test_the_checkers_catch_each_kind_of_violation(tmp_path: Path) -> None:
    sources = _fake_sources(
        tmp_path,
        {
            "lamina.models._x": "from lamina.application import create_app\n",
            "lamina.data.vectors._y": "from lamina.data.versions import DatasetCatalog\nimport lamina.data\n",
            "lamina.data.ingest._z": "from lamina.data.vectors._types import Chunk\n",
            "lamina.data.versions._w": "from lamina.data.drift import _stats\n",
            "lamina.data.vectors.graph._v": "from lamina.data.vectors._types import Chunk\n",
            "lamina.data._top": "from lamina.data.drift import DriftWindow\n",
        },
    )
    assert layer_violations(sources) == [
        "lamina.models._x:1 (models) imports lamina.application (application)"
    ]
    assert data_order_violations(sources) == [
        "lamina.data.vectors._y:1 imports lamina.data.versions, which is not below vectors",
        "lamina.data.vectors._y:2 imports lamina.data, which is not below vectors",
        "lamina.data.versions._w:1 imports lamina.data.drift, which is not below versions",
    ]
    assert private_violations(sources) == [
        "lamina.data.ingest._z:1 imports lamina.data.vectors._types, private to lamina.data.vectors",
        "lamina.data.versions._w:1 imports lamina.data.drift._stats, private to lamina.data.drift",
    ]


@pytest.mark.parametrize("layer", sorted([*LAYERS, "observability"]))
def test_each_layer_exports_a_sorted_all(layer: str) -> None:
    mod = importlib.import_module(f"lamina.{layer}")
    exported = list(mod.__all__)
    assert exported == sorted(exported, key=_isort_key), "sort __all__ as ruff does (RUF022)"
    for name in exported:
        assert hasattr(mod, name), f"lamina.{layer}.__all__ names {name} but it is not defined"


def _isort_key(name: str) -> tuple[int, str]:
    """ruff's RUF022 order: CONSTANTS, then Classes, then functions."""
    return (0 if name.isupper() else 1 if name[:1].isupper() else 2, name)


#: each layer's public surface; a change here is a change of the API, made on purpose
PUBLIC = {
    "compute": [
        "DEFAULT_SAMPLE_INTERVAL_S",
        "FULL_GPU",
        "CPUInfo",
        "ClusterSnapshot",
        "CpuMeter",
        "CpuReading",
        "Demand",
        "DeviceFit",
        "FitReport",
        "GPUInfo",
        "GPULink",
        "GPUProbeError",
        "GPUProcess",
        "GPUReading",
        "GPUState",
        "MemoryEstimate",
        "MigInstance",
        "NodeInventory",
        "NodeState",
        "Placement",
        "PlacementPolicy",
        "apply",
        "best_fit",
        "core_cpus",
        "default_threads",
        "fit",
        "fragmentation_aware",
        "gib",
        "gpu_choices",
        "node_fragmentation",
        "physical_cores_of",
        "place_gang",
        "probe_inventory",
        "publish_inventory",
        "read_cpus",
        "read_gpus",
        "sample_devices_forever",
        "snapshot_of",
        "spread",
    ],
    "orchestration": [
        "FILES_MOUNT",
        "INFLIGHT_METRIC",
        "MODELS_MOUNT",
        "PORT_FD_ENV",
        "SECRET_ENV",
        "SECRET_HEADER",
        "AutoscalePolicy",
        "CanaryJudge",
        "CanaryPolicy",
        "Controller",
        "DeploymentStatus",
        "DispatchResult",
        "Dispatcher",
        "Http1Client",
        "Job",
        "JobContext",
        "JobKind",
        "JobQueue",
        "JobResources",
        "JobScheduler",
        "JobState",
        "K8sAutoscaler",
        "K8sOptions",
        "K8sScaleMetric",
        "K8sWorkload",
        "LoadObservation",
        "LocalProcessBackend",
        "Plan",
        "ProcessHandle",
        "QueueContext",
        "QueueDecision",
        "RayJobRunner",
        "RayJobStatus",
        "RayReplicaBackend",
        "RayReplicaHandle",
        "ReconcileTimings",
        "ReplicaAutoscaler",
        "ReplicaBackend",
        "ReplicaClient",
        "ReplicaHandle",
        "ReplicaLoad",
        "ReplicaSecrets",
        "ReplicaState",
        "ReplicaStatus",
        "ReplicaView",
        "Resources",
        "Rollout",
        "RolloutControl",
        "RolloutPhase",
        "RolloutStrategy",
        "RunningJob",
        "ScaleDecision",
        "SchedulerSettings",
        "WaitingJob",
        "WorkloadSpec",
        "job_demand",
        "k8s_manifests",
        "k8s_name",
        "models_loader",
        "pick_replica",
        "ray_inventory",
        "ray_node_inventory",
        "reconcile_plan",
        "report_port",
        "reserve",
        "restart_delay",
        "retry_delay",
        "schedule_jobs",
        "secret_matches",
    ],
    "models": [
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
    ],
    "application": [
        "ANONYMOUS",
        "AliasCatalog",
        "Authenticator",
        "Budget",
        "Call",
        "CostLedger",
        "CostLine",
        "CostPolicy",
        "DeployRequest",
        "DeploymentManager",
        "DispatchResult",
        "Dispatcher",
        "Doctor",
        "GatewayDeps",
        "IngestService",
        "IngestSettings",
        "KeyAuthenticator",
        "KeyRecord",
        "KeySpec",
        "KeyStore",
        "LedgerEntry",
        "ModelCatalog",
        "ModelRouter",
        "Policy",
        "Prices",
        "Principal",
        "PromptSpec",
        "PromptStore",
        "PromptVersion",
        "RagOptions",
        "RateLimitPolicy",
        "Readiness",
        "ReplayRecord",
        "ReplayRecorder",
        "ResponseCache",
        "Route",
        "SemanticIndex",
        "StaticKeys",
        "ThreadedIngestService",
        "Ticket",
        "Usage",
        "admin_router",
        "answer_summary",
        "close_policies",
        "create_app",
        "deployments_router",
        "gateway_hosts",
        "gpu_hour_usd",
        "observe_router",
        "parse_replicas",
        "read_replay",
        "replica_hourly_usd",
        "response_cache",
    ],
    "observability": [
        "LAYER",
        "LAYERS",
        "LOCAL_TRACE_ID",
        "Breakdown",
        "BudgetState",
        "DatasetState",
        "Deferred",
        "DeploymentState",
        "DeviceMetrics",
        "DeviceSample",
        "DeviceState",
        "DoctorInputs",
        "DriftMetrics",
        "DriftState",
        "Finding",
        "GatewayMetrics",
        "Kept",
        "Layer",
        "LightSpan",
        "ModelSeries",
        "OpenTrace",
        "Pruned",
        "RetentionPolicy",
        "SamplingPolicy",
        "SpanRow",
        "StoreSpanExporter",
        "Telemetry",
        "TraceLine",
        "TraceRetention",
        "TraceSampler",
        "TraceSummary",
        "TreeSpan",
        "Verdict",
        "caller_of",
        "check_trace_id",
        "diagnose",
        "layer_times_ms",
        "list_traces",
        "parse_header",
        "period_of",
        "read_summary",
        "read_trace",
        "recent_traces",
        "summarize",
        "trace_json",
        "tree",
    ],
    "data": [
        "BM25_B",
        "BM25_K1",
        "HYBRID_DEPTH",
        "MIN_INDEX_ROWS",
        "RRF_K",
        "AsyncEmbedder",
        "CatalogResolver",
        "Chunk",
        "ChunkLineage",
        "ChunkTokenizer",
        "Citation",
        "DatasetCatalog",
        "DatasetVersion",
        "DriftChecker",
        "DriftRecorder",
        "DriftReport",
        "DriftReports",
        "DriftSettings",
        "DriftWindow",
        "Embedder",
        "EmbeddingTokenizer",
        "EnglishAnalyzer",
        "ExactIndex",
        "Fused",
        "GraphIndex",
        "Hit",
        "HnswIndex",
        "IndexParams",
        "IngestOptions",
        "IngestPipeline",
        "IngestProgress",
        "IngestReport",
        "IngestRun",
        "IngestRuns",
        "IvfHnswSqIndex",
        "IvfPqIndex",
        "LanceDBStore",
        "LineageEmitter",
        "LoadOptions",
        "PgVectorStore",
        "PinnedVersion",
        "Retrieval",
        "Retriever",
        "Scalar",
        "SearchMode",
        "SourceRecord",
        "VectorStore",
        "VectorStoreBase",
        "VersionDiff",
        "VersionResolver",
        "WindowPolicy",
        "check_dataset_name",
        "collect_garbage",
        "lineage_chain",
        "publish_drift_metrics",
        "reciprocal_rank_fusion",
    ],
}


@pytest.mark.parametrize("layer", sorted(PUBLIC))
def test_public_surface_is_pinned(layer: str) -> None:
    assert list(importlib.import_module(f"lamina.{layer}").__all__) == PUBLIC[layer]
