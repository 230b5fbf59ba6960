"""``lamina k8s manifests --out DIR [--autoscaler hpa|keda] [--apply]``: the config's deployments and the
gateway as Kubernetes manifests (see ``lamina.stack._k8s`` for what is written, and why)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lamina.cli._common import ConfigOption, JsonOption, StateDirOption, fail, load, out_console, print_json
from lamina.config import DeploymentConfig
from lamina.errors import ConfigError, LaminaError
from lamina.orchestration import K8sAutoscaler, K8sScaleMetric
from lamina.stack import K8sSettings, kubectl_apply, write_k8s_manifests

k8s_app = typer.Typer(help="Run Lamina on Kubernetes: manifests for the deployments and the gateway.")

OutOption = Annotated[Path, typer.Option("--out", "-o", help="Folder to write the manifests to.")]
AutoscalerOption = Annotated[
    str, typer.Option(help="hpa (autoscaling/v2 HorizontalPodAutoscaler) or keda (KEDA ScaledObject).")
]
MetricOption = Annotated[
    str,
    typer.Option(
        help="inflight (the gateway's lamina_requests_in_flight, through a metrics adapter or KEDA's "
        "Prometheus scaler) or cpu (no adapter needed)."
    ),
]


def _choice(value: str, allowed: tuple[str, ...], option: str) -> str:
    if value not in allowed:
        fail(f"{option} must be one of {', '.join(allowed)}, not {value!r}", exit_code=2)
    return value


def write_manifests_command(
    config: Path | None,
    state_dir: Path | None,
    out: Path,
    settings: K8sSettings,
    apply: bool = False,
    as_json: bool = False,
    extra: DeploymentConfig | None = None,
) -> list[Path]:
    """Write (and, with ``apply``, apply) the manifests; prints what was written. For ``lamina deploy
    --target k8s`` as well, whose ``extra`` deployment joins the config's."""
    cfg, sdir = load(config, state_dir)
    if extra is not None:
        kept = [d for d in cfg.deployments if d.name != extra.name]
        cfg = cfg.model_copy(update={"deployments": [*kept, extra]})
    try:
        written = write_k8s_manifests(cfg, sdir, out, settings)
    except LaminaError as exc:
        fail(exc, exit_code=2 if isinstance(exc, ConfigError) else 1)
    if as_json:
        print_json({"out": str(out), "files": [str(p) for p in written]})
    else:
        out_console.print(f"wrote {len(written)} file(s) to {out}:")
        for path in written:
            out_console.print(f"  {path}", highlight=False)
        out_console.print(
            "  before applying: `kubectl create secret generic lamina-replica-secret "
            "--from-literal=secret=$(openssl rand -hex 32)`; copy the models with "
            f"{out / 'models-loader' / 'load-models.sh'} (when there are models to copy)",
            highlight=False,
            soft_wrap=True,
        )
    if apply:
        try:
            result = kubectl_apply(out)
        except ConfigError as exc:
            fail(exc, exit_code=2)
        typer.echo(result.stdout, nl=False)
        if result.returncode != 0:
            fail(f"kubectl apply -f {out} failed (exit {result.returncode}): {result.stderr.strip()}")
    return written


@k8s_app.command("manifests")
def manifests(
    out: OutOption,
    config: ConfigOption = None,
    state_dir: StateDirOption = None,
    autoscaler: AutoscalerOption = "hpa",
    metric: MetricOption = "inflight",
    image: Annotated[str, typer.Option(help="The container image with Lamina installed.")] = "lamina:0.1.0",
    namespace: Annotated[str | None, typer.Option(help="Namespace of every object (default: none).")] = None,
    max_factor: Annotated[
        int, typer.Option("--max-factor", min=1, help="Each deployment scales up to its replicas x this.")
    ] = 4,
    target_concurrency: Annotated[
        float, typer.Option(min=0.1, help="In-flight requests per replica the autoscaler aims at.")
    ] = 4.0,
    apply: Annotated[bool, typer.Option("--apply", help="Run `kubectl apply -f OUT` afterwards.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Write a Deployment, Service and autoscaler (HPA or KEDA) per deployment and for the gateway."""
    settings = K8sSettings(
        autoscaler=_autoscaler(_choice(autoscaler, ("hpa", "keda"), "--autoscaler")),
        metric=_metric(_choice(metric, ("inflight", "cpu"), "--metric")),
        image=image,
        namespace=namespace,
        max_replicas_factor=max_factor,
        target_concurrency=target_concurrency,
    )
    write_manifests_command(config, state_dir, out, settings, apply=apply, as_json=as_json)


def _autoscaler(value: str) -> K8sAutoscaler:
    return "keda" if value == "keda" else "hpa"


def _metric(value: str) -> K8sScaleMetric:
    return "cpu" if value == "cpu" else "inflight"
