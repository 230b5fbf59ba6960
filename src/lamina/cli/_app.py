"""``lamina``: start the stack, inspect its config, manage models."""

from __future__ import annotations

import inspect
import json
import logging
import os
import shlex
from typing import Annotated

import typer

from lamina.cli._common import ConfigOption, StateDirOption, err_console, fail, load, out_console
from lamina.cli._compute import compute_app
from lamina.cli._costs import costs
from lamina.cli._data import data_app
from lamina.cli._deployments import deploy, deployments, rollout, undeploy
from lamina.cli._doctor import doctor
from lamina.cli._drift import drift
from lamina.cli._engines import engines
from lamina.cli._jobs import jobs_app
from lamina.cli._k8s import k8s_app
from lamina.cli._keys import keys_app, refuse_open_bind
from lamina.cli._models import models_app
from lamina.cli._prompts import prompts_app
from lamina.cli._replay import replay
from lamina.cli._top import top
from lamina.cli._traces import trace, traces
from lamina.config import LaminaConfig
from lamina.errors import ConfigError, LaminaError
from lamina.logs import LOG_FORMAT_ENV, configure_logging
from lamina.models import Catalog

log = logging.getLogger("lamina")

app = typer.Typer(
    name="lamina",
    help="Lamina: a self-hostable AI infrastructure stack. `lamina up` serves the bundled models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show the effective config or its JSON schema.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")
app.add_typer(keys_app, name="keys")
app.add_typer(prompts_app, name="prompts")
app.add_typer(compute_app, name="compute")
app.add_typer(jobs_app, name="jobs")
app.add_typer(k8s_app, name="k8s")
data_app.command("drift")(drift)
app.command("engines")(engines)
app.command("deploy")(deploy)
app.command("deployments")(deployments)
app.command("undeploy")(undeploy)
app.command("rollout")(rollout)
app.command("costs")(costs)
app.command("traces")(traces)
app.command("trace")(trace)
app.command("replay")(replay)
app.command("doctor")(doctor)
app.command("top")(top)


def one_line_summaries(group: typer.Typer) -> None:
    """Give every command whose docstring's first paragraph spans lines a one-line summary: Typer's rich
    help keeps single line breaks in the list of commands, which breaks the table's rows."""
    for info in group.registered_commands:
        doc = inspect.cleandoc(info.help or (info.callback.__doc__ if info.callback else None) or "")
        first = doc.split("\n\n")[0]
        if info.short_help is None and "\n" in first:
            info.short_help = " ".join(first.split())
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            one_line_summaries(sub.typer_instance)


def _example(base: str, catalog: Catalog) -> str:
    chat = next((m.id for m in catalog.models() if "chat" in m.capabilities), None)
    if chat is None:
        return f"curl {base}/models"
    body = {"model": chat, "messages": [{"role": "user", "content": "Say hello in five words."}]}
    return (
        f"curl {base}/chat/completions -H 'Content-Type: application/json' \\\n"
        f"       -d {shlex.quote(json.dumps(body))}"
    )


@app.command()
def up(
    config: ConfigOption = None,
    state_dir: StateDirOption = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default: server.host).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: server.port, 8000).")] = None,
    insecure_no_auth: Annotated[
        bool, typer.Option(help="Serve a non-loopback address even though no API key exists.")
    ] = False,
) -> None:
    """Start the whole stack in the foreground; Ctrl-C or SIGTERM stops it and every process it started."""
    from lamina.stack.gateway import bind_gateway, build_stack, serve  # the web stack, only for this command

    cfg, sdir = load(config, state_dir)
    # the replicas it starts inherit the format through the environment
    log_format = os.environ[LOG_FORMAT_ENV] = configure_logging(cfg.observability.log_format)
    bind_host, bind_port = host or cfg.server.host, port if port is not None else cfg.server.port
    refuse_open_bind(cfg, sdir, bind_host, insecure_no_auth)
    try:
        sock = bind_gateway(bind_host, bind_port)  # before the models load: a port in use fails at once
        bind_port = sock.getsockname()[1]  # --port 0: the one the OS chose
        stack = build_stack(cfg, sdir)
    except LaminaError as exc:
        fail(exc, exit_code=2 if isinstance(exc, ConfigError) else 1)  # a config that cannot run: 2
    base = f"http://{bind_host}:{bind_port}/v1"
    names = ", ".join(f"{d.name} ({d.engine or 'auto'} x{d.replicas})" for d in cfg.deployments)
    if log_format == "json":  # every line a log shipper reads is JSON: the banner is a log line too
        log.info("Lamina is starting at %s (state: %s), serving: %s", base, sdir, names)
    else:
        out_console.print(f"[bold]Lamina[/] is starting at [link={base}]{base}[/]  (state: {sdir})")
        out_console.print(f"  serving: {names}")
        out_console.print(f"  try:\n    {_example(base, stack.catalog)}", highlight=False, soft_wrap=True)
        out_console.print("  Ctrl-C stops the stack and every replica it started.")

    def ready() -> None:
        if log_format == "json":
            log.info("ready: every deployment has a ready replica")
        else:
            err_console.print("[green]ready:[/] every deployment has a ready replica")

    serve(stack, sock, bind_host, on_ready=ready)


@config_app.command("show")
def config_show(config: ConfigOption = None, state_dir: StateDirOption = None) -> None:
    """Print the effective config (file + defaults) as YAML, with keys and passwords shown as ***."""
    import yaml

    cfg, sdir = load(config, state_dir)
    data = cfg.redacted()
    data["state_dir"] = str(sdir)
    typer.echo(yaml.safe_dump(data, sort_keys=False))


@config_app.command("schema")
def config_schema() -> None:
    """Print the JSON schema of lamina.yaml."""
    typer.echo(json.dumps(LaminaConfig.model_json_schema(), indent=2))


one_line_summaries(app)


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
