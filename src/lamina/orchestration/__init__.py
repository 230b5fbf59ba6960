"""Layer: orchestration. What runs where: replica processes of each deployment, kept running by a
reconcile loop, and a dispatcher that sends each request to a ready replica and fails over."""

from lamina.orchestration._controller import Controller
from lamina.orchestration._dispatcher import Dispatcher, DispatchResult
from lamina.orchestration._local import LocalProcessBackend, ProcessHandle, ReplicaBackend, ReplicaHandle
from lamina.orchestration._policy import (
    Plan,
    ReconcileTimings,
    ReplicaLoad,
    ReplicaView,
    pick_replica,
    reconcile_plan,
    restart_delay,
)
from lamina.orchestration._workload import (
    DeploymentStatus,
    ReplicaState,
    ReplicaStatus,
    Resources,
    WorkloadSpec,
)

__all__ = [
    "Controller",
    "DeploymentStatus",
    "DispatchResult",
    "Dispatcher",
    "LocalProcessBackend",
    "Plan",
    "ProcessHandle",
    "ReconcileTimings",
    "ReplicaBackend",
    "ReplicaHandle",
    "ReplicaLoad",
    "ReplicaState",
    "ReplicaStatus",
    "ReplicaView",
    "Resources",
    "WorkloadSpec",
    "pick_replica",
    "reconcile_plan",
    "restart_delay",
]
