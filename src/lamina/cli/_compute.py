"""``lamina compute [--json]``: each node's devices; ``lamina compute fit MODEL[@V]``: will it fit.

No GPU or no NVIDIA driver is a normal state: the listing says so and exits 0. ``fit`` exits 0 when the
replicas asked for fit now and 1 when they do not, after printing the numbers either way.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

import typer
from rich.markup import escape
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
from lamina.compute import FitReport, GPUInfo, NodeInventory, gib, probe_inventory
from lamina.errors import ConfigError, LaminaError
from lamina.stack import ReplicaNeed, model_need, open_registry

compute_app = typer.Typer(
    help="This machine's devices (CPU, RAM, NVIDIA GPUs) and whether a model fits on them.",
    invoke_without_command=True,
)


def _node_json(node: NodeInventory) -> dict[str, Any]:
    data = asdict(node)
    data["cpu"]["usable"] = node.cpu.usable
    for gpu, out in zip(node.gpus, data["gpus"], strict=True):
        out["memory_free_bytes"] = gpu.memory_free_bytes
    return data


def _ranges(cpus: tuple[int, ...]) -> str:
    """``0-3,8`` for (0, 1, 2, 3, 8), as taskset prints a CPU list."""
    parts: list[str] = []
    for cpu in cpus:
        if parts and cpu == int(parts[-1].rpartition("-")[2]) + 1:
            parts[-1] = f"{parts[-1].partition('-')[0]}-{cpu}"
        else:
            parts.append(str(cpu))
    return ",".join(parts)


def _opt(value: float | None, unit: str) -> str:
    return "-" if value is None else f"{value:.0f}{unit}"


def _links(gpu: GPUInfo) -> str:
    pcie = [f"PCIe gen{g.generation or '?'} x{g.width or '?'}" for g in gpu.links if g.kind == "pcie"]
    nvlink = [g for g in gpu.links if g.kind == "nvlink"]
    return ", ".join([*pcie, *([f"NVLink x{len(nvlink)}"] if nvlink else [])]) or "-"


def print_node(node: NodeInventory) -> None:
    cpu = node.cpu
    load = " ".join(f"{x:.2f}" for x in cpu.load_avg)
    out_console.print(f"[bold]{escape(node.hostname)}[/]", highlight=False)
    out_console.print(
        f"  CPU  {escape(cpu.model)}: {cpu.physical} physical / {cpu.logical} logical cores; this process "
        f"may use CPUs {_ranges(cpu.affinity)} ({cpu.usable_physical} physical cores); load {load}",
        highlight=False,
        soft_wrap=True,
    )
    out_console.print(
        f"  RAM  {gib(node.memory_available_bytes)} available of {gib(node.memory_total_bytes)}",
        highlight=False,
    )
    if not node.gpus:
        out_console.print(f"  GPU  none: {escape(node.gpu_note or 'no GPUs found')}", highlight=False)
        return
    out_console.print(f"  NVIDIA driver {escape(node.nvidia_driver or '?')}", highlight=False)
    for g in node.gpus:
        _print_gpu(g)


def _print_gpu(g: GPUInfo) -> None:
    power = _opt(g.power_w, " W") + ("" if g.power_limit_w is None else f" / {g.power_limit_w:.0f} W")
    processes = ", ".join(
        str(p.pid) + ("" if p.used_memory_bytes is None else f" ({gib(p.used_memory_bytes)})")
        for p in g.processes
    )
    mig = ", ".join(f"{m.uuid} {gib(m.memory_total_bytes)}" for m in g.mig) if g.mig_enabled else "off"
    lines = (
        f"  GPU {g.index}  {g.name}  {g.uuid}  bus {g.pci_bus_id or '?'}",
        f"         memory {gib(g.memory_used_bytes)} / {gib(g.memory_total_bytes)} used; utilisation "
        f"{_opt(g.utilization_pct, '%')}; {_opt(g.temperature_c, ' C')}; power {power}",
        f"         processes {processes or '-'}; MIG {mig}; links {_links(g)}",
    )
    for line in lines:
        out_console.print(escape(line), highlight=False, soft_wrap=True)


@compute_app.callback()
def compute(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """Each node's devices: CPU model, cores and the affinity mask, load, RAM, and NVIDIA GPUs."""
    if ctx.invoked_subcommand is not None:
        return
    nodes = [probe_inventory()]
    if json_output:
        print_json({"nodes": [_node_json(n) for n in nodes]})
        return
    for node in nodes:
        print_node(node)


def _fit_json(report: FitReport, need: ReplicaNeed, engine: str, options: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": need.name,
        "engine": engine,
        "options": options,
        "estimate": {**asdict(report.estimate), "total_bytes": report.estimate.total_bytes},
        "gpus_per_replica": report.gpus,
        "replicas": report.replicas,
        "replicas_possible": report.replicas_possible,
        "fits": report.fits,
        "devices": [asdict(d) for d in report.devices],
        "message": report.explain(need.name),
        "notes": list(need.notes),
    }


def _print_fit(report: FitReport, need: ReplicaNeed, engine: str, options: dict[str, Any]) -> None:
    settings = ", ".join(f"{k}={v}" for k, v in options.items()) or "engine defaults"
    out_console.print(f"[bold]{escape(need.name)}[/] on {engine} ({escape(settings)})", highlight=False)
    table = Table("device", "total", "available", "replicas that fit")
    for d in report.devices:
        table.add_row(d.name, gib(d.total_bytes), gib(d.available_bytes), str(d.replicas))
    print_table(table)
    for note in need.notes:
        out_console.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)
    verdict = "[green]fits[/]" if report.fits else "[bold red]does not fit[/]"
    out_console.print(f"{verdict}: {escape(report.explain(need.name))}", highlight=False, soft_wrap=True)


@compute_app.command("fit")
def fit_command(
    model: Annotated[
        str, typer.Argument(help="A registered or bundled model: NAME, NAME@VERSION, NAME@ALIAS.")
    ],
    ctx: Annotated[int | None, typer.Option("--ctx", help="Context size per slot (gguf n_ctx).")] = None,
    parallel: Annotated[int | None, typer.Option(help="Parallel slots (gguf parallel).")] = None,
    replicas: Annotated[int, typer.Option(min=1, help="Replicas that must fit at once.")] = 1,
    gpu_layers: Annotated[
        int | None,
        typer.Option("--gpu-layers", help="Layers offloaded to a GPU (gguf n_gpu_layers; -1: all)."),
    ] = None,
    engine: Annotated[
        str | None, typer.Option(help="Engine (default: the one for the model's format).")
    ] = None,
    json_output: JsonOption = False,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Estimate a model's memory per replica (weights, KV cache and runtime, from its own metadata) and
    say which devices hold it and how many replicas fit; exit 1 when the replicas asked for do not fit."""
    flags = {"n_ctx": ctx, "parallel": parallel, "n_gpu_layers": gpu_layers}
    options = {name: value for name, value in flags.items() if value is not None}
    cfg, sdir = load(config, state_dir)
    try:
        store, registry = open_registry(cfg, sdir)
        try:
            need, engine_name = model_need(registry, model, engine=engine, options=options, replicas=replicas)
        finally:
            store.close()
        report = need.report([probe_inventory()])
    except LaminaError as exc:
        fail(exc, exit_code=2 if isinstance(exc, ConfigError) else 1)
    if json_output:
        print_json(_fit_json(report, need, engine_name, options))
    else:
        _print_fit(report, need, engine_name, options)
    if not report.fits:
        raise typer.Exit(1)
