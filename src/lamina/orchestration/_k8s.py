"""Kubernetes manifests for deployments: pure functions, workload specs in, manifests (plain dicts) out.

Each :class:`K8sWorkload` becomes a Deployment, a Service, a ConfigMap with its files (a replica's worker
spec, the gateway's config) and an autoscaler: an ``autoscaling/v2`` HorizontalPodAutoscaler, or a KEDA
``ScaledObject``. The autoscaler scales on the gateway's ``lamina_requests_in_flight{model=...}`` gauge
(in-flight requests per replica, the same signal as the local autoscaler; the HPA reads it as an External
metric through an adapter such as prometheus-adapter, KEDA through its Prometheus scaler), or on CPU as a
fallback for clusters with no metrics adapter.

Model files reach the replicas through one shared PersistentVolumeClaim (``ReadWriteMany``), mounted
read-only at ``/models`` and holding each file under ``/models/<sha256>/<name>``; it is filled once (see
the loader Pod that :func:`models_loader` writes). Rejected alternative: an initContainer that downloads
the weights into an ``emptyDir`` at every pod start, which re-transfers gigabytes on each scale-out (the
moment latency matters most), needs a model server reachable from the cluster, and costs node disk per
pod; on the shared volume the weights are written once and mapped by every replica. The worker checks
each file's sha256 before it loads it (exit 3 on a mismatch), so a wrong volume fails loudly.

Pods run as a non-root user with a read-only root filesystem, no privilege escalation and no
capabilities; ``/tmp`` (and the gateway's state directory) are ``emptyDir`` volumes. The gateway and its
replicas share the per-replica secret through a Secret that the pods read as an environment variable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lamina.errors import ConfigError
from lamina.orchestration._handshake import SECRET_ENV
from lamina.orchestration._k8s_spec import (
    FILES_MOUNT,
    INFLIGHT_METRIC,
    MODELS_MOUNT,
    UID,
    K8sOptions,
    K8sWorkload,
    Manifest,
    k8s_name,
    object_meta,
    pod_labels,
)

_MIB = 1 << 20
_GIB = 1 << 30


def _quantity_mib(n_bytes: int) -> str:
    return f"{max(1, math.ceil(n_bytes / _MIB))}Mi"


def _cpu(cores: float) -> str:
    return f"{max(1, math.ceil(cores * 1000))}m"


def _resources(w: K8sWorkload, opts: K8sOptions) -> Manifest:
    requests = {"cpu": _cpu(w.cpus), "memory": _quantity_mib(w.memory_bytes)}
    limits = {"memory": _quantity_mib(int(w.memory_bytes * (1 + opts.memory_headroom)))}
    if w.gpus:  # extended resources are set in limits; the request defaults to the limit
        limits["nvidia.com/gpu"] = str(w.gpus)
    return {"requests": requests, "limits": limits}


def _probe(w: K8sWorkload, path: str, period_s: int, failures: int) -> Manifest:
    """An HTTP GET of ``path``; for a replica that wants its secret, the same GET sent from inside the pod
    to loopback with the secret (a kubelet probe can neither read a Secret into a header nor send a
    loopback Host)."""
    action: Manifest = {"httpGet": {"path": path, "port": "http"}}
    if w.secret_header:
        url = f"http://127.0.0.1:{w.port}{path}"
        code = (
            "import os, urllib.request as r; r.urlopen(r.Request("
            f"{url!r}, headers={{{w.secret_header!r}: os.environ[{SECRET_ENV!r}]}}), timeout=2)"
        )
        action = {"exec": {"command": ["python", "-c", code]}}
    return {
        **action,
        "periodSeconds": period_s,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def _container(w: K8sWorkload, opts: K8sOptions) -> Manifest:
    env: list[Manifest] = [{"name": k, "value": v} for k, v in sorted(w.env.items())]
    env.append(
        {
            "name": SECRET_ENV,
            "valueFrom": {"secretKeyRef": {"name": opts.secret_name, "key": "secret"}},
        }
    )
    mounts: list[Manifest] = [{"name": "tmp", "mountPath": "/tmp"}]
    if w.files:
        mounts.append({"name": "files", "mountPath": FILES_MOUNT, "readOnly": True})
    if w.needs_models:
        mounts.append({"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True})
    if w.role == "gateway":
        mounts.append({"name": "state", "mountPath": "/var/lib/lamina"})
    return {
        "name": w.role,
        "image": opts.image,
        "command": list(w.command),
        "ports": [{"name": "http", "containerPort": w.port, "protocol": "TCP"}],
        "env": env,
        "resources": _resources(w, opts),
        # loading a model can take minutes: the startup probe covers the ready timeout, then liveness
        # replaces a stuck engine (its /health answers 503) and readiness takes it out of the Service
        "startupProbe": _probe(w, w.health_path, 5, max(1, math.ceil(w.ready_timeout_s / 5))),
        "livenessProbe": _probe(w, w.health_path, 10, 3),
        "readinessProbe": _probe(w, w.ready_path or w.health_path, 5, 1),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    }


def _volumes(w: K8sWorkload, opts: K8sOptions) -> list[Manifest]:
    volumes: list[Manifest] = [{"name": "tmp", "emptyDir": {}}]
    if w.files:
        volumes.append({"name": "files", "configMap": {"name": f"{k8s_name(w.name)}-files"}})
    if w.needs_models:
        claim = {"claimName": opts.models_claim, "readOnly": True}
        volumes.append({"name": "models", "persistentVolumeClaim": claim})
    if w.role == "gateway":
        volumes.append({"name": "state", "emptyDir": {}})
    return volumes


def deployment(w: K8sWorkload, opts: K8sOptions) -> Manifest:
    """The workload's ``apps/v1`` Deployment (its replica count is the autoscaler's to change)."""
    pod: Manifest = {
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "automountServiceAccountToken": False,
        "containers": [_container(w, opts)],
        "volumes": _volumes(w, opts),
    }
    if w.gpus:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_meta(w, opts),
        "spec": {
            "replicas": w.min_replicas,
            "selector": {"matchLabels": {"app.kubernetes.io/name": k8s_name(w.name)}},
            "template": {"metadata": {"labels": pod_labels(w)}, "spec": pod},
        },
    }


def service(w: K8sWorkload, opts: K8sOptions) -> Manifest:
    """A ClusterIP Service in front of the workload's ready pods (port ``http``)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(w, opts),
        "spec": {
            "type": "ClusterIP",
            "selector": {"app.kubernetes.io/name": k8s_name(w.name)},
            "ports": [{"name": "http", "port": w.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def config_map(w: K8sWorkload, opts: K8sOptions) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(w, opts, f"{k8s_name(w.name)}-files"),
        "data": dict(sorted(w.files.items())),
    }


def _inflight_query(w: K8sWorkload) -> str:
    return f'sum({INFLIGHT_METRIC}{{model="{w.name}"}})'


def hpa(w: K8sWorkload, opts: K8sOptions) -> Manifest:
    """An ``autoscaling/v2`` HorizontalPodAutoscaler on in-flight requests per replica (External metric), or
    on CPU utilisation."""
    if opts.metric == "cpu":
        metric: Manifest = {
            "type": "Resource",
            "resource": {
                "name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": opts.cpu_target_percent},
            },
        }
    else:
        metric = {
            "type": "External",
            "external": {
                "metric": {"name": INFLIGHT_METRIC, "selector": {"matchLabels": {"model": w.name}}},
                "target": {"type": "AverageValue", "averageValue": _average(w.target_concurrency)},
            },
        }
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": object_meta(w, opts),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": k8s_name(w.name)},
            "minReplicas": max(1, w.min_replicas),
            "maxReplicas": max(1, w.min_replicas, w.max_replicas),
            "metrics": [metric],
            # up at once, down after five quiet minutes, one pod at a time (a cold start is costly)
            "behavior": {
                "scaleDown": {
                    "stabilizationWindowSeconds": 300,
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
                },
            },
        },
    }


def _average(value: float) -> str:
    """A Kubernetes quantity for ``value`` (milli-units where it is not whole)."""
    return str(int(value)) if float(value).is_integer() else f"{math.ceil(value * 1000)}m"


def scaled_object(w: K8sWorkload, opts: K8sOptions) -> Manifest:
    """A KEDA ``ScaledObject`` (keda.sh/v1alpha1): Prometheus trigger on in-flight requests (or CPU).

    With ``min_replicas`` 0, KEDA scales the deployment to zero when no request is in flight."""
    if opts.metric == "cpu":
        trigger: Manifest = {
            "type": "cpu",
            "metricType": "Utilization",
            "metadata": {"value": str(opts.cpu_target_percent)},
        }
    else:
        trigger = {
            "type": "prometheus",
            "metadata": {
                "serverAddress": opts.prometheus_url,
                "query": _inflight_query(w),
                "threshold": f"{w.target_concurrency:g}",
            },
        }
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": object_meta(w, opts),
        "spec": {
            "scaleTargetRef": {"name": k8s_name(w.name)},
            "minReplicaCount": w.min_replicas,
            "maxReplicaCount": max(1, w.min_replicas, w.max_replicas),
            "cooldownPeriod": 300,
            "triggers": [trigger],
        },
    }


def models_claim(opts: K8sOptions) -> Manifest:
    """The shared model volume (``ReadWriteMany``: NFS, CephFS, EFS, Filestore and the like)."""
    size = f"{max(1, math.ceil(opts.models_bytes * 1.1 / _GIB))}Gi"
    meta: Manifest = {"name": opts.models_claim, "labels": {"app.kubernetes.io/part-of": "lamina"}}
    if opts.namespace:
        meta["namespace"] = opts.namespace
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": meta,
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": size}}},
    }


def models_loader(opts: K8sOptions) -> Manifest:
    """A Pod that mounts the model volume writable and waits, for ``kubectl cp`` to fill it once."""
    meta: Manifest = {
        "name": f"{opts.models_claim}-loader",
        "labels": {"app.kubernetes.io/part-of": "lamina", "app.kubernetes.io/component": "models-loader"},
    }
    if opts.namespace:
        meta["namespace"] = opts.namespace
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": UID,
                "fsGroup": UID,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "loader",
                    "image": opts.image,
                    "command": ["sleep", "3600"],
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "volumeMounts": [{"name": "models", "mountPath": MODELS_MOUNT}],
                }
            ],
            "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": opts.models_claim}}],
        },
    }


def workload_manifests(w: K8sWorkload, opts: K8sOptions) -> list[Manifest]:
    """Everything one workload needs: its ConfigMap (if it has files), Deployment, Service, autoscaler."""
    out = [config_map(w, opts)] if w.files else []
    out += [deployment(w, opts), service(w, opts)]
    out.append(scaled_object(w, opts) if opts.autoscaler == "keda" else hpa(w, opts))
    return out


def k8s_manifests(workloads: Sequence[K8sWorkload], opts: K8sOptions) -> dict[str, list[Manifest]]:
    """The manifests of ``workloads`` by file name (``<object name>.yaml``), plus the model volume's claim
    when a workload needs models. Names must stay unique once made DNS-safe."""
    files: dict[str, list[Manifest]] = {}
    for w in workloads:
        name = k8s_name(w.name)
        if f"{name}.yaml" in files:
            raise ConfigError(
                f"two workloads map to the Kubernetes name {name!r}; rename one of the deployments"
            )
        files[f"{name}.yaml"] = workload_manifests(w, opts)
    if any(w.needs_models for w in workloads):
        files["models-volume.yaml"] = [models_claim(opts)]
    return files
