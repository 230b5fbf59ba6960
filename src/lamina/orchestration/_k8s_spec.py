"""What Kubernetes manifests are made from: one workload (a replica deployment or the gateway) and the
cluster-wide choices, as plain frozen records; ``lamina.orchestration._k8s`` turns them into objects."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Manifest = dict[str, Any]
K8sAutoscaler = Literal["hpa", "keda"]
K8sScaleMetric = Literal["inflight", "cpu"]

#: where the shared model volume is mounted in every replica
MODELS_MOUNT = "/models"
#: where a workload's ConfigMap files are mounted
FILES_MOUNT = "/etc/lamina"
#: the gauge the autoscalers read (exported by the gateway, labelled by deployment)
INFLIGHT_METRIC = "lamina_requests_in_flight"
_GIB = 1 << 30
#: a non-root uid/gid with no name in the image (the image need not create a user)
UID = 10001


@dataclass(frozen=True)
class K8sWorkload:
    """One thing to run in the cluster: a replica deployment or the gateway."""

    #: the deployment's name (the model name clients ask for); the objects get a DNS-safe form of it
    name: str
    #: the container's command, with the port and file paths as the pod sees them
    command: tuple[str, ...]
    port: int
    #: liveness (and startup): answers 200 while the process is alive and not stuck
    health_path: str
    #: CPU cores requested per pod (the engine's threads)
    cpus: float
    #: memory requested per pod (the will-it-fit estimate); the limit adds ``memory_headroom``
    memory_bytes: int
    gpus: int = 0
    min_replicas: int = 1
    max_replicas: int = 1
    #: in-flight requests per replica the autoscaler aims at
    target_concurrency: float = 4.0
    #: files for the ConfigMap mounted at ``/etc/lamina/<file>``
    files: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    #: mounts the shared model volume read-only
    needs_models: bool = False
    #: ``worker`` or ``gateway`` (the component label)
    role: Literal["worker", "gateway"] = "worker"
    #: seconds a pod may take to become ready (the deployment's ready timeout)
    ready_timeout_s: float = 120.0
    #: readiness (in the Service's rotation); None: ``health_path``
    ready_path: str | None = None
    #: the header that must carry the per-replica secret (a replica refuses requests without it, and
    #: answers only to a loopback Host); the probes then run in the pod, from the secret's variable
    secret_header: str | None = None


@dataclass(frozen=True)
class K8sOptions:
    """Cluster-wide choices for the manifests."""

    image: str = "lamina:0.1.0"
    namespace: str | None = None
    autoscaler: K8sAutoscaler = "hpa"
    metric: K8sScaleMetric = "inflight"
    #: the Prometheus that scrapes the gateway (KEDA's Prometheus scaler asks it)
    prometheus_url: str = "http://prometheus-server.monitoring.svc:9090"
    #: the Secret (key ``secret``) holding the per-replica secret
    secret_name: str = "lamina-replica-secret"
    models_claim: str = "lamina-models"
    #: the model volume's size (sum of the model files, rounded up)
    models_bytes: int = _GIB
    #: fraction added to the memory request to make the limit (the estimate is not exact)
    memory_headroom: float = 0.25
    #: CPU utilisation (percent of the request) the CPU fallback aims at
    cpu_target_percent: int = 70


def k8s_name(name: str) -> str:
    """``name`` as a DNS-1035 label (lower case, ``-``, starts with a letter, at most 63 characters)."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    label = f"lamina-{label}" if label else "lamina"
    return label[:63].rstrip("-")


def object_meta(w: K8sWorkload, opts: K8sOptions, name: str | None = None) -> Manifest:
    meta: Manifest = {"name": name or k8s_name(w.name), "labels": pod_labels(w)}
    if opts.namespace:
        meta["namespace"] = opts.namespace
    return meta


def pod_labels(w: K8sWorkload) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": k8s_name(w.name),
        "app.kubernetes.io/part-of": "lamina",
        "app.kubernetes.io/component": w.role,
    }
