"""``lamina deploy``, ``lamina deployments``, ``lamina undeploy``, ``lamina rollout``: deployments of the
running stack.

These talk to the admin API of a running ``lamina up`` over HTTP (``/admin/v1/deployments``): the gateway's
URL comes from --url, else from the config's server host and port; the admin key from --api-key or
$LAMINA_API_KEY. A deployment made here is stored by the stack and restored when it starts again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import typer
from rich.table import Table

from lamina.cli._common import (
    ConfigOption,
    JsonOption,
    StateDirOption,
    fail,
    load,
    out_console,
    print_json,
    print_table,
)
from lamina.cli._gateway_client import UrlOption, gateway_url
from lamina.config import DeploymentConfig
from lamina.errors import ConfigError, LaminaError, NotFoundError

Target = Literal["local", "k8s"]

PATH = "/admin/v1/deployments"

KeyOption = Annotated[
    str | None,
    typer.Option("--api-key", envvar="LAMINA_API_KEY", help="An admin API key (default: $LAMINA_API_KEY)."),
]
TimeoutOption = Annotated[float, typer.Option("--timeout", help="Seconds to wait for the gateway's answer.")]


def _base_url(url: str | None, config: ConfigOption) -> str:
    return url.rstrip("/") if url else gateway_url(load(config, None)[0], None)


def _call(method: str, base: str, path: str, key: str | None, timeout_s: float, body: Any = None) -> Any:
    """The JSON answer of the admin API; any failure exits with one line saying what to do."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.request(method, base + path, json=body, headers=headers, timeout=timeout_s)
    except httpx.ConnectError:
        fail(f"no Lamina stack answers at {base}; start it with `lamina up` (or pass its address with --url)")
    except httpx.HTTPError as exc:
        fail(f"{method} {base}{path} failed: {type(exc).__name__}: {exc}")
    try:
        data = response.json()
    except ValueError:
        data = None
    if response.status_code >= 400:
        error = data.get("error", {}) if isinstance(data, dict) else {}
        message = error.get("message") or f"HTTP {response.status_code}: {response.text[:300]}"
        code = error.get("code") or "http_error"
        exit_code = 2 if response.status_code in (400, 404, 409, 413, 422) else 1
        fail(_Remote(str(message), str(code)), exit_code=exit_code)
    return data


class _Remote(LaminaError):
    """An error the gateway answered with, for ``fail``'s one line."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code  # type: ignore[misc]


def deploy(
    model: Annotated[str, typer.Argument(help="Registry reference NAME, NAME@VERSION or NAME@ALIAS.")],
    name: Annotated[
        str | None, typer.Option(help="The name clients ask for (default: the model's name).")
    ] = None,
    replicas: Annotated[
        str,
        typer.Option(
            help="N replicas, or MIN..MAX to autoscale on in-flight requests (0..N scales to zero)."
        ),
    ] = "1",
    target_concurrency: Annotated[
        float, typer.Option(help="Requests in flight per replica the autoscaler aims at.")
    ] = 2.0,
    engine: Annotated[str | None, typer.Option(help="Engine plugin (default: the file format's).")] = None,
    options: Annotated[
        str | None, typer.Option(help='Engine options as JSON by engine, e.g. \'{"gguf": {"n_ctx": 4096}}\'.')
    ] = None,
    window: Annotated[float | None, typer.Option(help="Seconds the load is averaged over.")] = None,
    upscale_delay: Annotated[float | None, typer.Option(help="Seconds of need before scaling up.")] = None,
    downscale_delay: Annotated[
        float | None, typer.Option(help="Seconds of slack before scaling down.")
    ] = None,
    idle_delay: Annotated[float | None, typer.Option(help="Idle seconds before scaling to zero.")] = None,
    cold_start_budget: Annotated[
        float | None, typer.Option(help="Seconds a request at zero replicas waits for one.")
    ] = None,
    url: UrlOption = None,
    api_key: KeyOption = None,
    config: ConfigOption = None,
    timeout: TimeoutOption = 120.0,
    json_out: JsonOption = False,
    target: Annotated[
        Target, typer.Option(help="local: the running stack; k8s: Kubernetes manifests in --out instead.")
    ] = "local",
    out: Annotated[Path | None, typer.Option(help="With --target k8s: the folder for the manifests.")] = None,
    state_dir: StateDirOption = None,
) -> None:
    """Deploy a registered model on the running stack (it serves once a replica is ready), or write it with
    the config's deployments as Kubernetes manifests (``--target k8s --out DIR``)."""
    body = _deployment_body(model, name, replicas, target_concurrency, engine, options)
    if target == "k8s":
        _to_k8s(body, out, config, state_dir, json_out)
        return
    timings = zip(
        _TIMINGS, (window, upscale_delay, downscale_delay, idle_delay, cold_start_budget), strict=True
    )
    body |= {k: v for k, v in timings if v is not None}
    described = _call("POST", _base_url(url, config), PATH, api_key, timeout, body)
    if json_out:
        print_json(described)
        return
    out_console.print(
        f"deployed [bold]{described['name']}[/] ({described['model']}, replicas "
        f"{described['min_replicas']}..{described['max_replicas']}): {described['state']}; "
        "`lamina deployments` shows when it is ready"
    )


#: the autoscaler's timing options, as the admin API names them (in deploy's order)
_TIMINGS = ("window_s", "upscale_delay_s", "downscale_delay_s", "idle_delay_s", "cold_start_budget_s")


def _deployment_body(
    model: str,
    name: str | None,
    replicas: str,
    target_concurrency: float,
    engine: str | None,
    options: str | None,
) -> dict[str, Any]:
    """What ``deploy`` asks for, as the admin API (or the manifests) take it; --options must be JSON."""
    body: dict[str, Any] = {"model": model, "replicas": replicas, "target_concurrency": target_concurrency}
    body |= {"name": name} if name else {}
    body |= {"engine": engine} if engine else {}
    if options:
        try:
            body["options"] = json.loads(options)
        except ValueError as exc:
            fail(ConfigError(f'--options is not JSON ({exc}); e.g. \'{{"fake": {{"n_ctx": 512}}}}\''), 2)
    return body


def _to_k8s(
    body: dict[str, Any], out: Path | None, config: Path | None, state_dir: Path | None, js: bool
) -> None:
    """``deploy --target k8s``: the deployment joins the config's in manifests (``lamina k8s manifests``);
    MIN..MAX replicas become the manifests' replicas and their autoscaler's reach."""
    from lamina.application import parse_replicas  # here: `lamina data` never imports the web stack
    from lamina.cli._k8s import write_manifests_command
    from lamina.stack import K8sSettings

    if out is None:
        fail(ConfigError("--target k8s writes manifests: give the folder with --out DIR"), 2)
    try:
        low, high = parse_replicas(body["replicas"])
        deployment = DeploymentConfig.model_validate(
            {
                "name": body.get("name") or body["model"].partition("@")[0],
                "model": body["model"],
                "engine": body.get("engine"),
                "replicas": max(low, 1),
                "options": body.get("options") or {},
            }
        )
    except ValueError as exc:
        fail(ConfigError(f"cannot deploy {body['model']!r} to Kubernetes: {exc}"), 2)
    settings = K8sSettings(
        max_replicas_factor=max(1, -(-high // max(low, 1))), target_concurrency=body["target_concurrency"]
    )
    write_manifests_command(config, state_dir, out, settings, as_json=js, extra=deployment)


def deployments(
    url: UrlOption = None,
    api_key: KeyOption = None,
    config: ConfigOption = None,
    timeout: TimeoutOption = 30.0,
    json_out: JsonOption = False,
) -> None:
    """List the running stack's deployments: replicas desired and ready, state, the autoscaler's reason."""
    data = _call("GET", _base_url(url, config), PATH, api_key, timeout)["data"]
    if json_out:
        print_json(data)
        return
    table = Table("NAME", "SOURCE", "MODEL", "REPLICAS", "READY/DESIRED", "STATE", "AUTOSCALER", "ROLLOUT")
    for d in data:
        scaler = d.get("autoscaler") or {}
        roll = d.get("rollout") or {}
        table.add_row(
            d["name"],
            d["source"],
            d.get("model_version") or d["model"],
            f"{d['min_replicas']}..{d['max_replicas']}",
            f"{d['ready']}/{d['desired']}",
            d["state"] if not d.get("error") else f"{d['state']}: {d['error']}",
            scaler.get("reason", ""),
            _rollout_line(roll) if roll else "",
        )
    print_table(table)


def undeploy(
    name: Annotated[str, typer.Argument(help="The deployment to remove (one made with `lamina deploy`).")],
    url: UrlOption = None,
    api_key: KeyOption = None,
    config: ConfigOption = None,
    timeout: TimeoutOption = 120.0,
    json_out: JsonOption = False,
) -> None:
    """Stop routing to a deployment, let its in-flight requests finish, stop its replicas, forget it."""
    if not name.strip():
        fail(NotFoundError("give the name of a deployment (`lamina deployments` lists them)"), 2)
    done = _call("DELETE", _base_url(url, config), f"{PATH}/{name}", api_key, timeout)
    if json_out:
        print_json(done)
        return
    out_console.print(f"undeployed [bold]{name}[/] (drained in {done['drained_s']:g} s)")


def _rollout_line(roll: dict[str, Any]) -> str:
    share = f" at {roll['weight']}%" if roll["phase"] == "canary" else ""
    why = f" ({roll['reason']})" if roll.get("reason") else ""
    return f"{roll['stable']} -> {roll['target']}: {roll['phase']}{share}{why}"


def rollout(
    name: Annotated[str, typer.Argument(help="The deployment, the config's or a run-time one.")],
    model: Annotated[
        str | None, typer.Argument(help="The new version, NAME@VERSION or NAME@ALIAS (not with --promote).")
    ] = None,
    strategy: Annotated[
        str, typer.Option(help="rolling: replace replicas one by one; canary: run it beside with --weight.")
    ] = "rolling",
    weight: Annotated[int, typer.Option(help="A canary's share of the requests, in percent (1-99).")] = 10,
    auto_rollback: Annotated[
        bool, typer.Option(help="Roll a canary back when its error rate or p95 latency is worse.")
    ] = True,
    options: Annotated[
        str | None, typer.Option(help="The new version's engine options as JSON (default: the deployment's).")
    ] = None,
    promote: Annotated[bool, typer.Option("--promote", help="Move every replica to the canary.")] = False,
    rollback: Annotated[bool, typer.Option("--rollback", help="Stop the new version's replicas.")] = False,
    url: UrlOption = None,
    api_key: KeyOption = None,
    config: ConfigOption = None,
    timeout: TimeoutOption = 120.0,
    json_out: JsonOption = False,
) -> None:
    """Roll a new model version out to a deployment (rolling or canary), or promote or roll it back."""
    base = _base_url(url, config)
    if promote or rollback:
        if (promote and rollback) or model:
            fail(ConfigError("give either MODEL@VERSION, --promote or --rollback, one of them"), 2)
        action = "promote" if promote else "rollback"
        described = _call("POST", base, f"{PATH}/{name}/{action}", api_key, timeout)
    elif model is None:
        fail(ConfigError(f"name the version to roll out, e.g. `lamina rollout {name} MODEL@2`"), 2)
    else:
        if strategy not in ("rolling", "canary"):
            fail(ConfigError(f"--strategy is rolling or canary, not {strategy!r}"), 2)
        body: dict[str, Any] = {"model": model, "strategy": strategy, "weight": weight}
        body["auto_rollback"] = auto_rollback
        if options:
            try:
                body["options"] = json.loads(options)
            except ValueError as exc:
                fail(ConfigError(f"--options is not JSON ({exc})"), 2)
        described = _call("POST", base, f"{PATH}/{name}/rollout", api_key, timeout, body)
    if json_out:
        print_json(described)
        return
    roll = described.get("rollout") or {}
    out_console.print(f"[bold]{name}[/]: {_rollout_line(roll) if roll else described['state']}")
