"""The config's deployments, and the gateway, as Kubernetes manifests written to a folder.

Each deployment becomes the same replica worker that runs locally (its WorkerSpec, with the model files'
paths as the pod sees them on the shared model volume), sized by the will-it-fit estimate; the gateway
runs ``lamina up`` on a copy of the config in which each of those deployments is a relay (the ``openai``
engine) to its Service. Deployments that already are relays (engine ``openai``) stay in the gateway and
get no pods. The generator itself (``lamina.orchestration``) is pure; this module reads the registry and
writes the files:

    DIR/<object>.yaml               one file per workload (ConfigMap, Deployment, Service, autoscaler)
    DIR/models-volume.yaml          the shared model volume's claim
    DIR/models-loader/              a Pod and a script that copy the model files onto it once
                                    (a sub-folder, so ``kubectl apply -f DIR`` leaves it out)
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from lamina.config import DeploymentConfig, LaminaConfig
from lamina.errors import ConfigError
from lamina.logs import LOG_FORMAT_ENV
from lamina.models import Registry, deploy, engine_descriptor, register_bundled
from lamina.orchestration import (
    FILES_MOUNT,
    MODELS_MOUNT,
    SECRET_ENV,
    SECRET_HEADER,
    K8sAutoscaler,
    K8sOptions,
    K8sScaleMetric,
    K8sWorkload,
    WorkloadSpec,
    k8s_manifests,
    k8s_name,
    models_loader,
)
from lamina.stack._data import checked_config, open_registry
from lamina.stack._fit import workload_needs

#: the port every replica and the gateway listen on inside their pods
WORKER_PORT = 8080
GATEWAY_PORT = 8000
_GATEWAY_STATE = "/var/lib/lamina"
_RELAY = "openai"
_MIB = 1 << 20


@dataclass(frozen=True)
class ModelCopy:
    """A model file to copy onto the shared volume: from this machine, to its path in the pods."""

    local: Path
    pod_path: str
    size_bytes: int


@dataclass(frozen=True)
class K8sSettings:
    """What the manifests are made with, beyond the config (``lamina k8s manifests`` options)."""

    autoscaler: K8sAutoscaler = "hpa"
    metric: K8sScaleMetric = "inflight"
    image: str = "lamina:0.1.0"
    namespace: str | None = None
    #: each deployment scales between its ``replicas`` and this many times them (at least 1)
    max_replicas_factor: int = 4
    target_concurrency: float = 4.0


def _pod_path(local: Path, sha256: str | None) -> str:
    """Where a model file lies on the shared volume: under its sha256 (content-addressed), by its name."""
    folder = sha256 or "unverified"
    return str(PurePosixPath(MODELS_MOUNT) / folder / local.name)


def _worker_spec(workload: WorkloadSpec) -> tuple[dict[str, Any], list[ModelCopy]]:
    """The WorkerSpec that ``deploy`` wrote for ``workload``, its file paths moved onto the model volume."""
    spec_path = Path(workload.argv[workload.argv.index("--spec") + 1])
    spec: dict[str, Any] = json.loads(spec_path.read_text(encoding="utf-8"))
    copies: list[ModelCopy] = []

    def moved(path: str, sha256: str | None) -> str:
        local = Path(path)
        copies.append(ModelCopy(local, _pod_path(local, sha256), local.stat().st_size))
        return copies[-1].pod_path

    if spec.get("path"):
        spec["path"] = moved(spec["path"], spec.get("sha256"))
    extra_sha = spec.get("extra_sha256", {})
    spec["extra_files"] = {role: moved(p, extra_sha.get(role)) for role, p in spec["extra_files"].items()}
    return spec, copies


def _service_names(name: str, namespace: str | None) -> list[str]:
    """The names a Service is called by inside the cluster (what requests to it carry as ``Host``)."""
    service = k8s_name(name)
    tails = (".svc", ".svc.cluster.local") if namespace else ()
    return [service, *(f"{service}.{namespace}{tail}" for tail in tails)]


def _command(workload: WorkloadSpec, hosts: list[str]) -> tuple[str, ...]:
    """The worker's argv as the pod runs it: the image's python, its spec mounted, serving on all of the
    pod's interfaces at a fixed port (the Service's target) instead of a loopback port of its choosing,
    answering to its Service's names."""
    argv, rest = ["python"], list(workload.argv[1:])
    while rest:
        arg = rest.pop(0)
        if arg in ("--host", "--port", "--spec"):
            rest.pop(0)  # replaced below
        else:
            argv.append(arg)
    spec = f"{FILES_MOUNT}/worker-spec.json"
    allowed = [arg for host in hosts for arg in ("--allow-host", host)]
    return (*argv, "--host", "0.0.0.0", "--port", str(WORKER_PORT), "--spec", spec, *allowed)


def _worker(
    d: DeploymentConfig, registry: Registry, run_dir: Path, config: LaminaConfig, s: K8sSettings
) -> tuple[K8sWorkload, list[ModelCopy]]:
    timeout = config.orchestration.ready_timeout_s
    served, workload = deploy(d, registry, run_dir, timeout)
    spec, copies = _worker_spec(workload)
    (need,) = workload_needs(registry, [(served.model_ref, workload)])
    est = need.estimate
    # a GPU replica holds its weights and KV cache in GPU memory; RAM holds the process around them
    memory = est.total_bytes if need.gpus == 0 else max(est.runtime_bytes, 512 * _MIB)
    return (
        K8sWorkload(
            name=d.name,
            command=_command(workload, _service_names(d.name, s.namespace)),
            port=WORKER_PORT,
            health_path=workload.health_path,
            cpus=workload.resources.cpus,
            memory_bytes=memory,
            gpus=need.gpus,
            min_replicas=d.replicas,
            max_replicas=max(1, d.replicas) * s.max_replicas_factor,
            target_concurrency=s.target_concurrency,
            files={"worker-spec.json": json.dumps(spec, indent=2)},
            needs_models=bool(copies),
            ready_timeout_s=timeout,
            secret_header=SECRET_HEADER,
            env={LOG_FORMAT_ENV: config.observability.log_format},  # the gateway's log format
        ),
        copies,
    )


def _relay(d: DeploymentConfig, url: str) -> DeploymentConfig:
    """``d`` as the gateway serves it in the cluster: one relay process to the deployment's Service."""
    options = {"base_url": url, "model": d.name, "api_key_env": SECRET_ENV}
    return DeploymentConfig(name=d.name, engine=_RELAY, replicas=1, options={_RELAY: options})


def _gateway(config: LaminaConfig, in_pods: list[K8sWorkload], s: K8sSettings) -> K8sWorkload:
    urls = {w.name: f"http://{k8s_name(w.name)}:{WORKER_PORT}/v1" for w in in_pods}
    deployments = [_relay(d, urls[d.name]) if d.name in urls else d for d in config.deployments]
    names = _service_names("gateway", s.namespace)
    server = config.server.model_copy(update={"allowed_hosts": [*config.server.allowed_hosts, *names]})
    update = {"deployments": deployments, "state_dir": None, "server": server}
    gateway_config = config.model_copy(update=update)
    data = gateway_config.model_dump(mode="json", exclude_defaults=True)
    # never a secret in a ConfigMap: keys come from the gateway's key store (`lamina keys create`)
    data.get("server", {}).pop("api_keys", None)
    # a gateway's SQLite store is its own: more than one gateway pod needs a shared store (PostgreSQL)
    shared_store = config.store.url is not None and not config.store.url.startswith("sqlite")
    command = ("lamina", "up", "--config", f"{FILES_MOUNT}/lamina.yaml", "--host", "0.0.0.0")
    return K8sWorkload(
        name="gateway",
        command=(*command, "--port", str(GATEWAY_PORT)),
        port=GATEWAY_PORT,
        health_path="/healthz",
        ready_path="/readyz",
        cpus=1.0,
        memory_bytes=1024 * _MIB,
        min_replicas=1,
        max_replicas=s.max_replicas_factor if shared_store else 1,
        target_concurrency=s.target_concurrency * max(1, len(in_pods)) * 4,
        files={"lamina.yaml": yaml.safe_dump(data, sort_keys=False)},
        env={"LAMINA_STATE_DIR": _GATEWAY_STATE},
        role="gateway",
        ready_timeout_s=config.orchestration.ready_timeout_s,
    )


def k8s_plan(
    config: LaminaConfig, registry: Registry, run_dir: Path, settings: K8sSettings
) -> tuple[list[K8sWorkload], list[ModelCopy]]:
    """The workloads to run in the cluster (one per deployment with pods, then the gateway) and the model
    files their pods need on the shared volume."""
    workloads: list[K8sWorkload] = []
    copies: dict[str, ModelCopy] = {}
    for d in config.deployments:
        if d.engine is not None and engine_descriptor(d.engine).name == _RELAY:
            continue  # already a relay to a remote API: the gateway runs it
        worker, needed = _worker(d, registry, run_dir, config, settings)
        workloads.append(worker)
        copies.update((c.pod_path, c) for c in needed)
    workloads.append(_gateway(config, workloads, settings))
    return workloads, list(copies.values())


def _loader_script(copies: list[ModelCopy], opts: K8sOptions) -> str:
    pod = f"{opts.models_claim}-loader"
    ns = f" -n {shlex.quote(opts.namespace)}" if opts.namespace else ""
    lines = [
        "#!/bin/sh",
        "# Copies the model files onto the shared model volume once; run it from the machine that wrote",
        "# these manifests (the files are read from its Lamina state directory).",
        "set -eu",
        'cd "$(dirname "$0")"',
        f"kubectl{ns} apply -f ../models-volume.yaml -f models-loader.yaml",
        f"kubectl{ns} wait --for=condition=Ready pod/{pod} --timeout=300s",
    ]
    for c in copies:
        folder = str(PurePosixPath(c.pod_path).parent)
        lines.append(f"kubectl{ns} exec {pod} -- mkdir -p {shlex.quote(folder)}")
        lines.append(f"kubectl{ns} cp {shlex.quote(str(c.local))} {pod}:{shlex.quote(c.pod_path)}")
    lines.append(f"kubectl{ns} delete pod {pod}")
    return "\n".join(lines) + "\n"


def write_k8s_manifests(
    config: LaminaConfig, state_dir: Path, out_dir: Path, settings: K8sSettings | None = None
) -> list[Path]:
    """Write the manifests of ``config``'s deployments and gateway under ``out_dir``; the files written.

    Raises ConfigError (a deployment that cannot be made: unknown model or engine, bad options)."""
    settings = settings or K8sSettings()
    config = checked_config(config)
    store, registry = open_registry(config, state_dir)
    try:
        if config.register_bundled:
            register_bundled(registry, [d.model_ref for d in config.deployments])
        with tempfile.TemporaryDirectory(prefix="lamina-k8s-") as tmp:
            workloads, copies = k8s_plan(config, registry, Path(tmp), settings)
    finally:
        store.close()
    opts = K8sOptions(
        image=settings.image,
        namespace=settings.namespace,
        autoscaler=settings.autoscaler,
        metric=settings.metric,
        models_bytes=sum(c.size_bytes for c in copies) or (1 << 30),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, manifests in k8s_manifests(workloads, opts).items():
        path = out_dir / name
        path.write_text(yaml.safe_dump_all(manifests, sort_keys=False), encoding="utf-8")
        written.append(path)
    # a deployment removed from the config leaves no file behind for `kubectl apply -f DIR` to revive
    for stale in sorted({*out_dir.glob("lamina-*.yaml"), out_dir / "models-volume.yaml"} - set(written)):
        stale.unlink(missing_ok=True)
    if copies:
        loader = out_dir / "models-loader"
        loader.mkdir(exist_ok=True)
        (loader / "models-loader.yaml").write_text(yaml.safe_dump(models_loader(opts), sort_keys=False))
        script = loader / "load-models.sh"
        script.write_text(_loader_script(copies, opts), encoding="utf-8")
        script.chmod(0o755)
        written += [loader / "models-loader.yaml", script]
    return written


def kubectl_apply(out_dir: Path) -> subprocess.CompletedProcess[str]:
    """``kubectl apply -f out_dir``; a ConfigError when kubectl is not installed."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise ConfigError(
            f"kubectl is not on PATH, so the manifests in {out_dir} were written but not applied; install "
            f"kubectl (and point it at your cluster), or apply them with `kubectl apply -f {out_dir}`"
        )
    return subprocess.run([kubectl, "apply", "-f", str(out_dir)], capture_output=True, text=True, check=False)
