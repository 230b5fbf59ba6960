"""Kubernetes manifests: every object validated offline against the Kubernetes schemas (kubernetes-validate,
strict: no unknown field), KEDA's ScaledObject against the fields of KEDA's CRD; GPU requests, probes,
the model volume, the security context, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from typer.testing import CliRunner

from lamina.cli import app
from lamina.config import LaminaConfig
from lamina.errors import ConfigError
from lamina.orchestration import (
    MODELS_MOUNT,
    SECRET_ENV,
    SECRET_HEADER,
    K8sOptions,
    K8sWorkload,
    k8s_manifests,
    k8s_name,
)
from lamina.stack import K8sSettings, kubectl_apply, open_registry, write_k8s_manifests
from tests.support.files import MakeGGUF
from tests.support.processes import ECHO_SERVER, free_port

#: the oldest Kubernetes release still supported upstream when this was written
K8S_VERSION = "1.32"

#: KEDA's ScaledObject (keda.sh/v1alpha1), the fields its CRD declares for what we write; unknown fields
#: are refused, as the API server's structural schema prunes them
_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
SCALED_OBJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        n: {"type": "string"}
                        for n in ("apiVersion", "kind", "name", "envSourceContainerName")
                    },
                },
                **{
                    n: _INT32
                    for n in (
                        "minReplicaCount",
                        "maxReplicaCount",
                        "cooldownPeriod",
                        "pollingInterval",
                        "idleReplicaCount",
                        "initialCooldownPeriod",
                    )
                },
                "advanced": {"type": "object"},
                "fallback": {"type": "object"},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "authenticationRef": {"type": "object"},
                            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                        },
                    },
                },
            },
        },
    },
}


def validate(manifest: dict[str, Any]) -> None:
    """Raise when ``manifest`` is not a valid object of its kind."""
    if manifest["kind"] == "ScaledObject":
        jsonschema.validate(manifest, SCALED_OBJECT_SCHEMA)
    else:
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def by_kind(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m["kind"]: m for m in manifests}


def gpu_worker(**changes: Any) -> K8sWorkload:
    base: dict[str, Any] = {
        "name": "Chat_Big",
        "command": ("python", "-m", "lamina.models._worker", "--port", "8080"),
        "port": 8080,
        "health_path": "/health",
        "cpus": 4.0,
        "memory_bytes": 3 << 30,
        "gpus": 2,
        "min_replicas": 1,
        "max_replicas": 3,
        "files": {"worker-spec.json": "{}"},
        "needs_models": True,
    }
    return K8sWorkload(**(base | changes))


@pytest.mark.parametrize("autoscaler", ["hpa", "keda"])
@pytest.mark.parametrize("metric", ["inflight", "cpu"])
def test_every_generated_object_is_valid(autoscaler: str, metric: str) -> None:
    opts = K8sOptions(autoscaler=autoscaler, metric=metric, namespace="ai")  # type: ignore[arg-type]
    files = k8s_manifests([gpu_worker(), gpu_worker(name="small", gpus=0, needs_models=False)], opts)
    assert set(files) == {"lamina-chat-big.yaml", "lamina-small.yaml", "models-volume.yaml"}
    kinds = [m["kind"] for manifests in files.values() for m in manifests]
    scaler = "ScaledObject" if autoscaler == "keda" else "HorizontalPodAutoscaler"
    assert kinds.count(scaler) == 2 and kinds.count("Deployment") == 2 and kinds.count("Service") == 2
    for manifests in files.values():
        for manifest in manifests:
            validate(manifest)
            assert manifest["metadata"]["namespace"] == "ai"


def test_a_broken_manifest_is_caught_by_the_validation() -> None:
    """The check can fail: a misspelt field and a wrong type are refused."""
    dep = by_kind(k8s_manifests([gpu_worker()], K8sOptions())["lamina-chat-big.yaml"])["Deployment"]
    dep["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(dep)
    so = by_kind(k8s_manifests([gpu_worker()], K8sOptions(autoscaler="keda"))["lamina-chat-big.yaml"])
    so["ScaledObject"]["spec"]["triggers"][0]["metadata"]["threshold"] = 4
    with pytest.raises(jsonschema.ValidationError):
        validate(so["ScaledObject"])


def test_gpu_worker_requests_its_gpus_and_probes_its_health_port() -> None:
    manifests = by_kind(k8s_manifests([gpu_worker()], K8sOptions())["lamina-chat-big.yaml"])
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["resources"]["requests"] == {"cpu": "4000m", "memory": "3072Mi"}
    assert container["resources"]["limits"]["memory"] == "3840Mi"  # the estimate and 25% headroom
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    (port,) = container["ports"]
    assert port == {"name": "http", "containerPort": 8080, "protocol": "TCP"}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] >= 120
    assert manifests["Service"]["spec"]["ports"][0]["targetPort"] == "http"
    cpu_only = k8s_manifests([gpu_worker(gpus=0)], K8sOptions())["lamina-chat-big.yaml"]
    limits = by_kind(cpu_only)["Deployment"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in limits["limits"]


def test_pods_run_unprivileged_with_the_secret_from_a_secret() -> None:
    pod = by_kind(k8s_manifests([gpu_worker()], K8sOptions())["lamina-chat-big.yaml"])["Deployment"]
    spec = pod["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False
    container = spec["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    (secret,) = [e for e in container["env"] if e["name"] == SECRET_ENV]
    assert secret["valueFrom"]["secretKeyRef"] == {"name": "lamina-replica-secret", "key": "secret"}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[MODELS_MOUNT]["readOnly"] is True and "/tmp" in mounts


def test_autoscalers_target_in_flight_requests_of_their_model() -> None:
    hpa = by_kind(k8s_manifests([gpu_worker(target_concurrency=2.5)], K8sOptions())["lamina-chat-big.yaml"])
    external = hpa["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["external"]
    assert external["metric"]["selector"]["matchLabels"] == {"model": "Chat_Big"}
    assert external["target"] == {"type": "AverageValue", "averageValue": "2500m"}
    keda = k8s_manifests([gpu_worker(min_replicas=0)], K8sOptions(autoscaler="keda"))
    so = by_kind(keda["lamina-chat-big.yaml"])["ScaledObject"]["spec"]
    assert so["minReplicaCount"] == 0  # KEDA scales to zero
    assert so["triggers"][0]["metadata"]["query"] == 'sum(lamina_requests_in_flight{model="Chat_Big"})'


def test_names_are_dns_safe_and_collisions_refused() -> None:
    assert k8s_name("Chat_Big.v2") == "lamina-chat-big-v2"
    assert len(k8s_name("x" * 100)) == 63
    with pytest.raises(ConfigError, match="rename one"):
        k8s_manifests([gpu_worker(), gpu_worker(name="chat-big")], K8sOptions())


# ---- the config's deployments, through the registry --------------------------------------------------


@pytest.fixture
def k8s_config(tmp_path: Path, make_gguf: MakeGGUF) -> tuple[LaminaConfig, Path]:
    state = tmp_path / "state"
    config = LaminaConfig.model_validate(
        {
            "register_bundled": False,
            "server": {"api_keys": ["sk-not-for-a-configmap-0123456789"]},
            "deployments": [
                {"name": "tiny", "model": "tiny", "replicas": 2, "gguf": {"n_gpu_layers": -1}},
                {"name": "echo", "engine": "fake"},
                {"name": "upstream", "engine": "openai", "openai": {"base_url": "http://x/v1", "model": "m"}},
            ],
        }
    )
    store, registry = open_registry(config, state)
    try:
        registry.add(str(make_gguf()), "tiny")
    finally:
        store.close()
    return config, state


def _load(out: Path) -> dict[str, list[dict[str, Any]]]:
    return {p.name: list(yaml.safe_load_all(p.read_text())) for p in sorted(out.glob("*.yaml"))}


def test_config_becomes_valid_manifests_with_models_on_the_volume(
    k8s_config: tuple[LaminaConfig, Path], tmp_path: Path
) -> None:
    config, state = k8s_config
    out = tmp_path / "out"
    written = write_k8s_manifests(config, state, out, K8sSettings(autoscaler="keda"))
    files = _load(out)
    assert set(files) == {"lamina-tiny.yaml", "lamina-echo.yaml", "lamina-gateway.yaml", "models-volume.yaml"}
    for manifests in files.values():
        for manifest in manifests:
            validate(manifest)
    tiny = by_kind(files["lamina-tiny.yaml"])
    container = tiny["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"  # n_gpu_layers -1: on a GPU
    command = container["command"]
    assert command[command.index("--spec") : command.index("--spec") + 2] == [
        "--spec",
        "/etc/lamina/worker-spec.json",
    ]
    assert command[command.index("--host") : command.index("--host") + 4] == [
        "--host",
        "0.0.0.0",
        "--port",
        "8080",
    ]
    # the gateway reaches the pod by its Service's name: the worker answers to it
    assert command[command.index("--allow-host") :] == ["--allow-host", "lamina-tiny"]
    assert "/health" in container["livenessProbe"]["exec"]["command"][-1]
    spec = json.loads(tiny["ConfigMap"]["data"]["worker-spec.json"])
    assert spec["path"] == f"{MODELS_MOUNT}/{spec['sha256']}/{Path(spec['path']).name}"
    assert tiny["ScaledObject"]["spec"]["minReplicaCount"] == 2
    echo = by_kind(files["lamina-echo.yaml"])["Deployment"]["spec"]["template"]["spec"]
    assert all(v["name"] != "models" for v in echo["volumes"])  # the fake engine has no model file
    env = {e["name"]: e.get("value") for e in echo["containers"][0]["env"]}
    assert env["LAMINA_LOG_FORMAT"] == "text"  # the config's: the replica's lines match the gateway's
    gateway = by_kind(files["lamina-gateway.yaml"])
    text = gateway["ConfigMap"]["data"]["lamina.yaml"]
    assert "sk-not-for-a-configmap" not in text
    relays = {d["name"]: d for d in yaml.safe_load(text)["deployments"]}
    assert relays["tiny"]["options"]["openai"]["base_url"] == "http://lamina-tiny:8080/v1"
    assert relays["upstream"]["options"]["openai"]["base_url"] == "http://x/v1"  # already remote: no pods
    probe = gateway["Deployment"]["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    assert probe["httpGet"]["path"] == "/readyz"
    loader = out / "models-loader" / "load-models.sh"
    assert loader in written and spec["sha256"] in loader.read_text()
    validate(yaml.safe_load((out / "models-loader" / "models-loader.yaml").read_text()))
    # written again without the model deployment: its objects and the model volume are gone
    fewer = config.model_copy(update={"deployments": [d for d in config.deployments if d.name != "tiny"]})
    write_k8s_manifests(fewer, state, out)
    assert set(_load(out)) == {"lamina-echo.yaml", "lamina-gateway.yaml"}


def test_cli_writes_manifests_and_apply_without_kubectl_says_what_to_do(
    k8s_config: tuple[LaminaConfig, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, state = k8s_config
    cfg_file = tmp_path / "lamina.yaml"
    cfg_file.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_defaults=True)))
    out = tmp_path / "cli-out"
    args = ["k8s", "manifests", "-c", str(cfg_file), "--state-dir", str(state), "--out", str(out), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["files"]) == 6
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(ConfigError, match="kubectl is not on PATH"):
        kubectl_apply(out)
    result = CliRunner().invoke(app, [*args[:-1], "--apply"])
    assert result.exit_code == 2 and "install kubectl" in result.output
    bad = CliRunner().invoke(app, [*args, "--autoscaler", "vpa"])
    assert bad.exit_code == 2 and "hpa, keda" in bad.output


def test_a_replicas_probe_sends_its_secret_to_loopback() -> None:
    """The exec probe of a replica that wants its secret, run for real against a replica stand-in."""
    port = free_port()
    env = {**os.environ, SECRET_ENV: "s3cret"}
    server = subprocess.Popen([sys.executable, str(ECHO_SERVER), "--port", str(port)], env=env)
    try:
        w = gpu_worker(port=port, secret_header=SECRET_HEADER)
        container = by_kind(k8s_manifests([w], K8sOptions())["lamina-chat-big.yaml"])["Deployment"]
        probe = container["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]
        command = [sys.executable, *probe["exec"]["command"][1:]]
        deadline = time.monotonic() + 30
        while subprocess.run(command, env=env, capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, "the probe never passed against a healthy replica"
            time.sleep(0.2)
        wrong = subprocess.run(command, env={**env, SECRET_ENV: "wrong"}, capture_output=True, text=True)
        assert wrong.returncode != 0 and "401" in wrong.stderr
    finally:
        server.terminate()
        server.wait(10)


def test_deploy_target_k8s_writes_the_model_beside_the_configs_deployments(
    k8s_config: tuple[LaminaConfig, Path], tmp_path: Path
) -> None:
    """`lamina deploy MODEL --target k8s --out DIR`: the model joins the config's deployments in the
    manifests; MIN..MAX replicas become its replicas and its autoscaler's reach."""
    config, state = k8s_config
    cfg_file = tmp_path / "lamina.yaml"
    cfg_file.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_defaults=True)))
    out = tmp_path / "deploy-out"
    args = ["deploy", "tiny", "--name", "tiny-b", "--replicas", "2..6", "--target", "k8s", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "-c", str(cfg_file), "--state-dir", str(state), "--json"])
    assert result.exit_code == 0, result.output
    files = _load(out)
    assert {"lamina-tiny.yaml", "lamina-tiny-b.yaml", "lamina-gateway.yaml"} <= set(files)
    for manifest in files["lamina-tiny-b.yaml"]:
        validate(manifest)
    objects = by_kind(files["lamina-tiny-b.yaml"])
    assert objects["Deployment"]["spec"]["replicas"] == 2
    assert objects["HorizontalPodAutoscaler"]["spec"]["maxReplicas"] == 6
    missing = CliRunner().invoke(app, ["deploy", "tiny", "--target", "k8s", "-c", str(cfg_file)])
    assert missing.exit_code == 2 and "--out DIR" in missing.output
