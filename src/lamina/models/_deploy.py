"""From a deployment of a registered model to the generic workload that orchestration runs.

Orchestration does not know what a replica serves; the models layer hands it a ``WorkloadSpec`` whose
argv starts the replica worker on a WorkerSpec JSON file, with the resources the engine will use. This
module stays light (no engine libraries, no HTTP server) because the gateway imports it.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import psutil
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lamina.config import DeploymentConfig
from lamina.errors import ConfigError
from lamina.models._catalog import ServedModel
from lamina.models._checksums import MODEL_ROLE, RecordedFile
from lamina.models._engine import LoadSpec
from lamina.models._registry import Registry
from lamina.orchestration import Resources, WorkloadSpec

_MIB = 1 << 20
#: what a worker process needs before its model: Python, the HTTP server, the engine library
_BASE_MEMORY_MB = 256
_GPU_PROVIDERS = frozenset({"CUDAExecutionProvider", "TensorrtExecutionProvider"})


class WorkerSpec(BaseModel):
    """What one replica serves; written as JSON by the models layer, read by the worker at start."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    served_name: str = Field(description="The model name clients ask for; echoed as `model` in responses.")
    engine: str = Field(description="Engine plugin name (`lamina.engines` entry point): gguf, onnx, fake.")
    model_version: str | None = Field(None, description="Registered version served, for traces.")
    path: str | None = Field(None, description="The model file. Empty for engines that need none.")
    sha256: str | None = Field(None, description="Expected sha256 of `path`; a mismatch refuses to load.")
    extra_files: dict[str, str] = Field(default_factory=dict, description="Companion files by role.")
    extra_sha256: dict[str, str] = Field(
        default_factory=dict,
        description="Expected sha256 of companion files by role; a mismatch refuses to load.",
    )
    options: dict[str, Any] = Field(default_factory=dict, description="The engine's options.")

    @classmethod
    def read(cls, path: Path) -> WorkerSpec:
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except (OSError, ValidationError) as exc:
            raise ConfigError(f"worker spec {path} is unreadable or invalid ({exc}); rewrite it") from exc

    def recorded_files(self) -> list[RecordedFile]:
        """The files to check before loading: those whose sha256 this spec records."""
        files = [RecordedFile(MODEL_ROLE, Path(self.path), self.sha256)] if self.path and self.sha256 else []
        return files + [
            RecordedFile(role, Path(path), self.extra_sha256[role])
            for role, path in self.extra_files.items()
            if role in self.extra_sha256
        ]

    def load_spec(self) -> LoadSpec:
        return LoadSpec(
            name=self.served_name,
            path=Path(self.path) if self.path else None,
            extra_files={role: Path(p) for role, p in self.extra_files.items()},
            options=dict(self.options),
        )


def _files_mb(paths: Iterable[Path | None]) -> int:
    return math.ceil(sum(p.stat().st_size for p in paths if p is not None and p.is_file()) / _MIB)


def worker_resources(
    deployment: DeploymentConfig, engine: str, path: Path | None, extra_files: Iterable[Path] = ()
) -> Resources:
    """What one replica asks for: GGUF its threads and ~1.5x its files; ONNX one core and ~1.5x its files
    (an ONNX model's external data included); fake next to nothing."""
    files_mb = _files_mb([path, *extra_files])
    if engine == "gguf":
        opts = deployment.gguf
        return Resources(
            cpus=float(opts.n_threads or psutil.cpu_count(logical=False) or 1),
            memory_mb=max(_BASE_MEMORY_MB, math.ceil(files_mb * 1.5)),
            gpus=1 if opts.n_gpu_layers != 0 else 0,
        )
    if engine == "onnx":
        providers = set(deployment.onnx.providers or ())
        return Resources(
            cpus=1.0,
            memory_mb=max(_BASE_MEMORY_MB, math.ceil(files_mb * 1.5)),
            gpus=1 if providers & _GPU_PROVIDERS else 0,
        )
    return Resources(cpus=0.1, memory_mb=128, gpus=0)


def spec_file_name(deployment: str) -> str:
    """``<deployment>.json``, with anything unsafe in a file name replaced."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", deployment) + ".json"


def worker_workload(
    *,
    deployment: DeploymentConfig,
    engine: str,
    path: Path | None,
    sha256: str | None,
    extra_files: dict[str, Path],
    model_version: str | None,
    run_dir: Path,
    ready_timeout_s: float,
    extra_sha256: Mapping[str, str] | None = None,
) -> WorkloadSpec:
    """Write the deployment's WorkerSpec into ``run_dir`` and describe the replica processes to run.

    ``sha256`` and ``extra_sha256`` are what the worker checks the files against before it loads them."""
    options = getattr(deployment, engine).model_dump() if engine in ("gguf", "onnx", "fake") else {}
    spec = WorkerSpec(
        served_name=deployment.name,
        engine=engine,
        model_version=model_version,
        path=str(path) if path is not None else None,
        sha256=sha256,
        extra_files={role: str(p) for role, p in extra_files.items()},
        extra_sha256=dict(extra_sha256 or {}),
        options=options,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path = run_dir / spec_file_name(deployment.name)
    spec_path.write_text(spec.model_dump_json(indent=2), encoding="utf-8")
    argv = (sys.executable, "-m", "lamina.models._worker", "--host", "127.0.0.1", "--port", "{port}")
    return WorkloadSpec(
        name=deployment.name,
        argv=(*argv, "--spec", str(spec_path)),
        replicas=deployment.replicas,
        resources=worker_resources(deployment, engine, path, extra_files.values()),
        health_path="/health",
        ready_timeout_s=ready_timeout_s,
    )


def deploy(
    deployment: DeploymentConfig, registry: Registry, run_dir: Path, ready_timeout_s: float
) -> tuple[ServedModel, WorkloadSpec]:
    """What ``deployment`` serves (the catalog's entry) and the replica processes that serve it.

    The engine defaults to the registered file's format; asking for another one is a ConfigError.
    """
    if deployment.engine == "fake":
        spec = worker_workload(
            deployment=deployment,
            engine="fake",
            path=None,
            sha256=None,
            extra_files={},
            model_version=None,
            run_dir=run_dir,
            ready_timeout_s=ready_timeout_s,
        )
        return ServedModel(deployment=deployment.name, engine="fake", model_ref=None), spec
    mv = registry.get(deployment.model_ref)
    engine = deployment.engine or mv.format
    if engine != mv.format:
        raise ConfigError(
            f"deployment {deployment.name!r} asks for engine {engine!r} but {mv.ref} is a {mv.format} file; "
            f"set `engine: {mv.format}` or leave it out"
        )
    spec = worker_workload(
        deployment=deployment,
        engine=engine,
        path=mv.path,
        sha256=mv.sha256,
        extra_files=mv.extra_files,
        extra_sha256=mv.extra_sha256,
        model_version=mv.ref,
        run_dir=run_dir,
        ready_timeout_s=ready_timeout_s,
    )
    served = ServedModel(
        deployment=deployment.name,
        engine=engine,
        model_ref=mv.ref,
        aliases=tuple(n for n in (mv.ref, deployment.model_ref) if n != deployment.name),
        created=int(mv.created_at.timestamp()),
    )
    return served, spec
