"""Which backend runs the replicas (``orchestration.backend``): local processes (default) or Ray actors."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from lamina.compute import NodeInventory, probe_inventory
from lamina.config import OrchestrationConfig
from lamina.orchestration import LocalProcessBackend, RayReplicaBackend, ReplicaBackend, ray_inventory

#: Ray puts unix sockets under its temp dir, and a socket path may hold 107 bytes at most: a deeper state
#: directory gets a short folder of its own in the system's temp folder instead
_MAX_RAY_DIR = 48


def ray_temp_dir(state_dir: Path) -> Path:
    """Where a local Ray started for ``state_dir`` keeps its files: ``state_dir/ray`` when that path is
    short enough for Ray's sockets, else ``<tmp>/lamina-ray-<hash of state_dir>``."""
    wanted = (state_dir / "ray").resolve()
    if len(str(wanted)) <= _MAX_RAY_DIR:
        return wanted
    digest = hashlib.sha256(str(wanted).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"lamina-ray-{digest}"


def replica_backend(orch: OrchestrationConfig, state_dir: Path) -> ReplicaBackend:
    """The backend the config asks for; a ConfigError when it is ``ray`` and Ray is not installed."""
    logs = state_dir / "logs"
    if orch.backend == "ray":
        return RayReplicaBackend(logs, address=orch.ray_address, temp_dir=ray_temp_dir(state_dir))
    return LocalProcessBackend(logs)


def backend_nodes(backend: ReplicaBackend) -> list[NodeInventory]:
    """The nodes the backend's replicas may run on, for the will-it-fit check: every node of the Ray
    cluster (probed on each), or this machine."""
    if isinstance(backend, RayReplicaBackend):
        return ray_inventory()
    return [probe_inventory()]
