"""From a deployment of a registered model to the generic workload that orchestration runs.

Orchestration does not know what a replica serves; the models layer hands it a ``WorkloadSpec`` whose
argv starts the replica worker on a WorkerSpec JSON file, with the resources the engine will use. This
module stays light (no engine libraries, no HTTP server) because the gateway imports it.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lamina.config import DEFAULT_WATCHDOG_S, BatchingConfig, DeploymentConfig
from lamina.errors import ConfigError
from lamina.models._catalog import ServedModel
from lamina.models._checksums import MODEL_ROLE, RecordedFile
from lamina.models._engine import (
    EngineDescriptor,
    LoadSpec,
    engine_descriptor,
    engine_for_format,
    engine_names,
)
from lamina.orchestration import WorkloadSpec

if TYPE_CHECKING:
    from lamina.models._registry import Registry


class WorkerSpec(BaseModel):
    """What one replica serves; written as JSON by the models layer, read by the worker at start."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    served_name: str = Field(description="The model name clients ask for; echoed as `model` in responses.")
    engine: str = Field(
        description="Engine plugin name (its `lamina.engines` entry point): gguf, onnx, fake, ..."
    )
    model_version: str | None = Field(None, description="Registered version served, for traces.")
    path: str | None = Field(None, description="The model file. Empty for engines that need none.")
    sha256: str | None = Field(None, description="Expected sha256 of `path`; a mismatch refuses to load.")
    extra_files: dict[str, str] = Field(default_factory=dict, description="Companion files by role.")
    extra_sha256: dict[str, str] = Field(
        default_factory=dict,
        description="Expected sha256 of companion files by role; a mismatch refuses to load.",
    )
    options: dict[str, Any] = Field(default_factory=dict, description="The engine's options.")
    batching: BatchingConfig = Field(
        default_factory=BatchingConfig, description="Micro-batching of concurrent embedding requests."
    )
    watchdog_s: float = Field(
        DEFAULT_WATCHDOG_S,
        ge=1,
        allow_inf_nan=False,
        description="Seconds an engine step may run without progress before /health answers 503 (stuck).",
    )

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


def check_deployment(deployment: DeploymentConfig) -> DeploymentConfig:
    """``deployment`` with its engine and each of its options blocks checked against the installed engines,
    defaults filled in; a ConfigError names the deployment, the engine and the field."""
    where = f"deployment {deployment.name!r}"
    if deployment.engine is not None:
        engine_descriptor(deployment.engine)
    installed = engine_names()
    unknown = sorted(set(deployment.options) - set(installed))
    if unknown:
        raise ConfigError(
            f"{where}: options for {', '.join(unknown)}, but no engine of that name is installed "
            f"(installed: {', '.join(installed)}); fix the name or install the engine plugin"
        )
    options = {
        name: engine_descriptor(name).validate_options(block, where)
        for name, block in deployment.options.items()
    }
    return deployment.model_copy(update={"options": options})


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

    ``sha256`` and ``extra_sha256`` are what the worker checks the files against before it loads them. The
    engine's descriptor checks the deployment's options for it and says what a replica needs."""
    descriptor = engine_descriptor(engine)
    where = f"deployment {deployment.name!r}"
    parsed = descriptor.parse_options(deployment.options_for(engine), where)
    options = parsed.model_dump(mode="json")
    files = [p for p in (path, *extra_files.values()) if p is not None]
    spec = WorkerSpec(
        served_name=deployment.name,
        engine=engine,
        model_version=model_version,
        path=str(path) if path is not None else None,
        sha256=sha256,
        extra_files={role: str(p) for role, p in extra_files.items()},
        extra_sha256=dict(extra_sha256 or {}),
        options=options,
        batching=deployment.batching,
        watchdog_s=deployment.watchdog_s,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path = run_dir / spec_file_name(deployment.name)
    spec_path.write_text(spec.model_dump_json(indent=2), encoding="utf-8")
    argv = (sys.executable, "-m", "lamina.models._worker", "--host", "127.0.0.1")
    return WorkloadSpec(
        name=deployment.name,
        argv=(*argv, "--spec", str(spec_path)),
        replicas=deployment.replicas,
        resources=descriptor.resources(files, parsed),
        health_path="/health",
        ready_timeout_s=ready_timeout_s,
    )


def deploy(
    deployment: DeploymentConfig, registry: Registry, run_dir: Path, ready_timeout_s: float
) -> tuple[ServedModel, WorkloadSpec]:
    """What ``deployment`` serves (the catalog's entry) and the replica processes that serve it.

    An engine that takes no model file serves under the deployment's name alone. Otherwise the engine
    defaults to the one that loads the registered file's format; one that cannot load it is a ConfigError.
    """
    if deployment.engine is not None and not engine_descriptor(deployment.engine).needs_model:
        descriptor = engine_descriptor(deployment.engine)
        spec = worker_workload(
            deployment=deployment,
            engine=descriptor.name,
            path=None,
            sha256=None,
            extra_files={},
            model_version=None,
            run_dir=run_dir,
            ready_timeout_s=ready_timeout_s,
        )
        slots = _slots(descriptor, deployment)
        return ServedModel(deployment.name, descriptor.name, None, descriptor.capabilities, slots=slots), spec
    mv = registry.get(deployment.model_ref)
    descriptor = (
        engine_for_format(mv.format) if deployment.engine is None else engine_descriptor(deployment.engine)
    )
    if mv.format not in descriptor.formats:
        loads = ", ".join(sorted(descriptor.formats))
        raise ConfigError(
            f"deployment {deployment.name!r} asks for engine {descriptor.name!r}, which loads {loads} files, "
            f"but {mv.ref} is a {mv.format} file; leave `engine` out to use the engine for {mv.format}"
        )
    spec = worker_workload(
        deployment=deployment,
        engine=descriptor.name,
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
        engine=descriptor.name,
        model_ref=mv.ref,
        engine_capabilities=descriptor.capabilities,
        aliases=tuple(n for n in (mv.ref, deployment.model_ref) if n != deployment.name),
        created=int(mv.created_at.timestamp()),
        slots=_slots(descriptor, deployment),
    )
    return served, spec


def _slots(descriptor: EngineDescriptor, deployment: DeploymentConfig) -> int:
    """How many requests one replica of ``deployment`` runs at once (its engine's word on its options)."""
    where = f"deployment {deployment.name!r}"
    return int(descriptor.slots(descriptor.parse_options(deployment.options_for(descriptor.name), where)))
