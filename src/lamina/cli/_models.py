"""``lamina models``: add model files to the registry, list, show, alias, verify and remove versions."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.table import Column, Table

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
from lamina.cli._quantize import quantize
from lamina.errors import LaminaError
from lamina.models import ModelVersion, Registry
from lamina.stack import open_registry

models_app = typer.Typer(
    help="The model registry: add GGUF and ONNX files, list, show, alias, verify and remove versions.",
    no_args_is_help=True,
)

models_app.command("quantize")(quantize)

RefArgument = Annotated[str, typer.Argument(help="NAME, NAME@VERSION or NAME@ALIAS.", show_default=False)]


@contextmanager
def _registry(config: ConfigOption, state_dir: StateDirOption) -> Iterator[Registry]:
    """The registry of the state directory; any Lamina error becomes one line on stderr and exit 1."""
    cfg, root = load(config, state_dir)
    try:
        store, registry = open_registry(cfg, root)
    except LaminaError as exc:
        fail(exc)
    try:
        yield registry
    except LaminaError as exc:
        fail(exc)
    finally:
        store.close()


@models_app.command("add")
def add(
    source: Annotated[
        str,
        typer.Argument(
            help="A local path, package:DIST/path/in/dist, or hf:ORG/REPO/FILE.", show_default=False
        ),
    ],
    name: Annotated[str, typer.Option("--name", "-n", help="Registry name, e.g. smollm2-135m.")],
    version: Annotated[
        str | None, typer.Option("--version", help="Version label (default: the next integer).")
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option("--tokenizer", help="The tokenizer.json (any source form); ONNX text models need it."),
    ] = None,
    json_output: JsonOption = False,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Register a GGUF or ONNX model file (pickle-based formats are refused)."""
    with _registry(config, state_dir) as registry:
        before = {mv.ref for mv in registry.list()}
        mv = registry.add(source, name, version, {"tokenizer": tokenizer} if tokenizer else None)
    if json_output:
        print_json(mv.to_json())
        return
    what = "already registered as" if mv.ref in before else "registered"
    out_console.print(
        f"{what} [bold]{mv.ref}[/]: {mv.format}, {_size(mv.size_bytes)}, sha256 {mv.sha256[:12]}",
        highlight=False,
    )


@models_app.command("list")
def list_(
    json_output: JsonOption = False,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Every registered version."""
    with _registry(config, state_dir) as registry:
        versions = registry.list()
    if json_output:
        print_json([mv.to_json() for mv in versions])
        return
    if not versions:
        out_console.print("no models registered; add one with `lamina models add SOURCE --name NAME`")
        return
    table = Table("model", "aliases", "format", "size", "gate", "created", Column("source", overflow="fold"))
    for mv in versions:
        created = f"{mv.created_at:%Y-%m-%d %H:%M}"
        gate = "-" if mv.gate is None else f"{mv.gate.status} ({mv.gate.method})"
        table.add_row(
            mv.ref, ", ".join(mv.aliases), mv.format, _size(mv.size_bytes), gate, created, mv.source
        )
    print_table(table)


@models_app.command("show")
def show(
    ref: RefArgument,
    json_output: JsonOption = False,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """One version: its file, checksum, accuracy gate (for a quantized variant) and what the file says
    about itself."""
    with _registry(config, state_dir) as registry:
        mv = registry.get(ref, refused_ok=True)
    if json_output:
        print_json(mv.to_json())
        return
    table = Table("field", Column("value", overflow="fold"), show_header=False)
    for key, value in _details(mv):
        table.add_row(key, value)
    print_table(table)


@models_app.command("alias")
def alias(
    name: Annotated[str, typer.Argument(help="The model name.", show_default=False)],
    alias_name: Annotated[
        str, typer.Argument(metavar="ALIAS", help="e.g. latest, prod.", show_default=False)
    ],
    version: Annotated[str, typer.Argument(help="The version it points at.", show_default=False)],
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Point NAME@ALIAS at VERSION (moving it if it pointed elsewhere)."""
    with _registry(config, state_dir) as registry:
        mv = registry.alias(name, alias_name, version)
    out_console.print(f"{mv.name}@{alias_name.lower()} -> {mv.ref}", highlight=False)


@models_app.command("verify")
def verify(
    ref: RefArgument,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Hash the version's files again (the model file and its companions: tokenizer, external data) and
    compare with the sha256 recorded when it was added."""
    with _registry(config, state_dir) as registry:
        mv = registry.get(ref, refused_ok=True)
        registry.verify(mv)
    n = len(mv.extra_files)
    companions = f"; {n} companion file{'s' if n != 1 else ''} intact too" if n else ""
    out_console.print(f"{mv.ref}: intact (sha256 {mv.sha256[:12]}{companions})", highlight=False)


@models_app.command("rm")
def rm(
    ref: Annotated[str, typer.Argument(metavar="NAME@VERSION", help="The version to remove.")],
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Remove one version, the aliases that point at it, and its files unless another version uses them."""
    name, _, version = ref.partition("@")
    if not version:
        fail(f"say which version to remove: {name}@VERSION (`lamina models list` shows them)")
    with _registry(config, state_dir) as registry:
        mv = registry.remove(name, version)
    out_console.print(f"removed {mv.ref}", highlight=False)


def _details(mv: ModelVersion) -> list[tuple[str, str]]:
    rows = [
        ("model", mv.ref),
        ("aliases", ", ".join(mv.aliases) or "-"),
        ("format", mv.format),
        ("size", f"{_size(mv.size_bytes)} ({mv.size_bytes} bytes)"),
        ("sha256", mv.sha256),
        ("source", mv.source),
        ("path", str(mv.path)),
        ("created", mv.created_at.isoformat(timespec="seconds")),
    ]
    if mv.gate is not None:
        rows.append(("gate", mv.gate.summary()))
    rows += [(f"file: {role}", _companion(mv, role)) for role in mv.extra_files]
    rows += [(key, _describe(value)) for key, value in mv.meta.items()]
    return rows


def _companion(mv: ModelVersion, role: str) -> str:
    sha = mv.extra_sha256.get(role)
    return f"{mv.extra_files[role]} (sha256 {sha[:12]})" if sha else str(mv.extra_files[role])


def _describe(value: Any) -> str:
    """A metadata value on one short line: long strings by length, tensors as ``name: TYPE [dims]``."""
    if value is None:
        return "-"
    if isinstance(value, str) and len(value) > 80:
        return f"({len(value)} characters; `--json` shows it)"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
        return f"{value:,}"
    if isinstance(value, list) and all(isinstance(v, dict) and "name" in v for v in value):
        return "\n".join(f"{v['name']}: {v.get('type')} {v.get('shape')}" for v in value)
    return str(value)


def _size(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    size = n / 1000
    for unit in ("KB", "MB"):
        if size < 1000:
            return f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"
