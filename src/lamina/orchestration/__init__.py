"""Layer: orchestration. What runs where: replica processes of each deployment, kept running by a
reconcile loop, and a dispatcher that sends each request to a ready replica and fails over.

The job queue's names load on first use: they need the metadata store (SQLAlchemy), which a replica worker
process, importing this package for its workload types, has no use for.
"""

import importlib
from typing import TYPE_CHECKING, Any

from lamina.orchestration._autoscale import AutoscalePolicy, LoadObservation, ReplicaAutoscaler, ScaleDecision
from lamina.orchestration._controller import Controller
from lamina.orchestration._dispatcher import Dispatcher, DispatchResult, ReplicaClient
from lamina.orchestration._handshake import (
    PORT_FD_ENV,
    SECRET_ENV,
    SECRET_HEADER,
    ReplicaSecrets,
    report_port,
    secret_matches,
)
from lamina.orchestration._http1 import Http1Client
from lamina.orchestration._job_main import JobContext
from lamina.orchestration._jobs_policy import (
    QueueContext,
    QueueDecision,
    RunningJob,
    WaitingJob,
    job_demand,
    reserve,
    retry_delay,
    schedule_jobs,
)
from lamina.orchestration._k8s import k8s_manifests, models_loader
from lamina.orchestration._k8s_spec import (
    FILES_MOUNT,
    INFLIGHT_METRIC,
    MODELS_MOUNT,
    K8sAutoscaler,
    K8sOptions,
    K8sScaleMetric,
    K8sWorkload,
    k8s_name,
)
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
from lamina.orchestration._ray import RayReplicaBackend, RayReplicaHandle, ray_inventory, ray_node_inventory
from lamina.orchestration._ray_jobs import RayJobRunner, RayJobStatus
from lamina.orchestration._rollout import CanaryJudge, CanaryPolicy, Rollout, RolloutPhase, RolloutStrategy
from lamina.orchestration._rollout_control import RolloutControl
from lamina.orchestration._workload import (
    DeploymentStatus,
    ReplicaState,
    ReplicaStatus,
    Resources,
    WorkloadSpec,
)

__all__ = [
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
]

if TYPE_CHECKING:
    from lamina.orchestration._job_runner import JobScheduler, SchedulerSettings
    from lamina.orchestration._jobs import Job, JobKind, JobQueue, JobResources, JobState

_LAZY = {
    "JobScheduler": "_job_runner",
    "SchedulerSettings": "_job_runner",
    "Job": "_jobs",
    "JobKind": "_jobs",
    "JobQueue": "_jobs",
    "JobResources": "_jobs",
    "JobState": "_jobs",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
