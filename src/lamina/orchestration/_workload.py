"""What orchestration runs, without knowing what it serves: a generic workload spec and replica states."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


@dataclass(frozen=True)
class Resources:
    cpus: float = 1.0
    memory_mb: int = 512
    gpus: int = 0


@dataclass(frozen=True)
class WorkloadSpec:
    """One deployment's replicas: a process started from ``argv`` that serves HTTP on loopback.

    The process binds a port of its own choosing, reports it and checks the secret it is given (the
    handshake in ``lamina.orchestration._handshake``); it is ready once ``GET health_path`` answers 200.
    """

    name: str
    argv: tuple[str, ...]
    replicas: int = 1
    env: dict[str, str] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    health_path: str = "/health"
    ready_timeout_s: float = 120.0


class ReplicaState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    DEAD = "dead"
    STOPPING = "stopping"


@dataclass(frozen=True)
class ReplicaStatus:
    replica_id: str
    deployment: str
    state: ReplicaState
    pid: int | None
    url: str | None
    restarts: int
    last_exit_code: int | None = None
    last_error: str | None = None
    #: the version the replica runs (a rollout's stable or target label; "" when never labelled)
    version: str = ""


@dataclass(frozen=True)
class DeploymentStatus:
    name: str
    desired: int
    replicas: tuple[ReplicaStatus, ...]

    @property
    def ready(self) -> int:
        return sum(1 for r in self.replicas if r.state is ReplicaState.READY)
