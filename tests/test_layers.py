"""The rule of the house: layers import downward only, and each layer's public surface is pinned."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lamina"

#: rank of each layer; a module may import a package of equal or lower rank
LAYERS = {"compute": 1, "orchestration": 2, "data": 3, "models": 4, "application": 5}
#: importable from every layer; they import no layer themselves
FOUNDATION = {"config", "errors", "store", "observability"}
#: the composition root and the CLI wire everything: they may import any layer
TOP = {"stack", "_data_stack", "cli", "__init__", "__main__"}


def _package_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "lamina":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def _isort_key(name: str) -> tuple[int, str]:
    """ruff's RUF022 order: CONSTANTS, then Classes, then functions."""
    return (0 if name.isupper() else 1 if name[:1].isupper() else 2, name)


def _violations() -> list[str]:
    bad: list[str] = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        owner = rel.parts[0].removesuffix(".py")
        if owner in TOP:
            continue
        for lineno, module in _imports(path):
            target = _package_of(module)
            if target is None or target == owner:
                continue
            if owner in FOUNDATION:
                ok = target in {"config", "errors", "store"}
            else:
                ok = target in FOUNDATION or LAYERS.get(target, 99) < LAYERS[owner]
            if not ok:
                bad.append(f"{rel}:{lineno} ({owner}) imports {module} ({target})")
    return bad


def test_layers_import_downward_only() -> None:
    assert _violations() == []


def test_the_checker_catches_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from lamina.application import create_app\n")
    assert _imports(bad) == [(1, "lamina.application")]
    assert LAYERS["application"] > LAYERS["models"]


@pytest.mark.parametrize("layer", sorted([*LAYERS, "observability"]))
def test_each_layer_exports_a_sorted_all(layer: str) -> None:
    mod = importlib.import_module(f"lamina.{layer}")
    exported = list(mod.__all__)
    assert exported == sorted(exported, key=_isort_key), "sort __all__ as ruff does (RUF022)"
    for name in exported:
        assert hasattr(mod, name), f"lamina.{layer}.__all__ names {name} but it is not defined"


#: each layer's public surface; a change here is a change of the API, made on purpose
PUBLIC = {
    "compute": [
        "GPUInfo", "GPUProbeError", "NVMLProbe", "NodeInventory", "PynvmlProbe", "default_threads",
        "probe_gpus", "probe_inventory",
    ],
    "orchestration": [
        "Controller", "DeploymentStatus", "DispatchResult", "Dispatcher", "LocalProcessBackend", "Plan",
        "ProcessHandle", "ReconcileTimings", "ReplicaBackend", "ReplicaHandle", "ReplicaLoad",
        "ReplicaState", "ReplicaStatus", "ReplicaView", "Resources", "WorkloadSpec", "pick_replica",
        "reconcile_plan", "restart_delay",
    ],
    "models": [
        "BUNDLED", "ENGINE_CAPABILITIES", "BundledModel", "Capability", "Catalog", "ChatCompletionRequest",
        "ChatMessage", "CompletionRequest", "Delta", "DispatchQueryEmbedder", "EmbeddingBatch",
        "EmbeddingRequest", "Engine", "EngineEmbedder", "EngineInfo", "HTTPEmbedder", "LoadSpec",
        "ModelCard", "ModelList", "ModelVersion", "Registry", "Route", "SamplingParams", "ServedModel",
        "ThreadQueryEmbedder", "Usage", "detect_format", "engine_names", "load_engine", "read_metadata",
        "register_bundled", "worker_workload",
    ],
    "application": [
        "DispatchResult", "Dispatcher", "GatewayDeps", "ModelCatalog", "Readiness", "Route", "create_app",
    ],
    "observability": [
        "LAYER", "DriftMetrics", "GatewayMetrics", "Layer", "SpanRow", "StoreSpanExporter", "Telemetry",
        "read_trace",
    ],
    "data": [
        "BM25_B", "BM25_K1", "HYBRID_DEPTH", "MIN_INDEX_ROWS", "RRF_K", "AsyncEmbedder", "Chunk",
        "ChunkLineage", "ChunkTokenizer", "Citation", "DatasetCatalog", "DatasetVersion", "DriftChecker",
        "DriftRecorder", "DriftReport", "DriftReports", "DriftSettings", "DriftWindow", "Embedder",
        "EnglishAnalyzer", "ExactIndex", "Fused", "GraphIndex", "Hit", "HnswIndex", "IndexParams",
        "IngestOptions", "IngestPipeline", "IngestProgress", "IngestReport", "IvfHnswSqIndex", "IvfPqIndex",
        "LanceDBStore", "LineageEmitter", "LoadOptions", "PgVectorStore", "PinnedVersion", "Retrieval",
        "Retriever", "Scalar", "SearchMode", "SourceRecord", "VectorStore", "VersionDiff", "VersionResolver",
        "WindowPolicy", "collect_garbage", "publish_drift_metrics", "reciprocal_rank_fusion",
    ],
}  # fmt: skip


@pytest.mark.parametrize("layer", sorted(PUBLIC))
def test_public_surface_is_pinned(layer: str) -> None:
    assert list(importlib.import_module(f"lamina.{layer}").__all__) == PUBLIC[layer]
