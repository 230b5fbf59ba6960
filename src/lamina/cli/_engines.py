"""``lamina engines [--json]``: the engine plugins installed, with what they can do and their options."""

from __future__ import annotations

from typing import Any

from rich.table import Column, Table

from lamina.cli._common import JsonOption, fail, out_console, print_json, print_table
from lamina.errors import LaminaError
from lamina.models import EngineDescriptor, engine_descriptors


def describe(descriptor: EngineDescriptor) -> dict[str, Any]:
    """An engine as ``--json`` prints it: its options as their JSON schema (type, default, description)."""
    schema = descriptor.options.model_json_schema()
    return {
        "name": descriptor.name,
        "description": descriptor.description,
        "capabilities": sorted(str(c) for c in descriptor.capabilities),
        "formats": sorted(descriptor.formats),
        "options": {
            name: {key: field[key] for key in ("type", "anyOf", "default", "description") if key in field}
            for name, field in schema.get("properties", {}).items()
        },
    }


def engines(json_output: JsonOption = False) -> None:
    """The engine plugins installed: what each serves, the model files it loads and its options."""
    try:
        described = [describe(d) for d in engine_descriptors()]
    except LaminaError as exc:
        fail(exc)
    if json_output:
        print_json(described)
        return
    table = Table(
        "engine",
        "serves",
        "loads",
        Column("options (default)", overflow="fold"),
        Column("about", overflow="fold"),
    )
    for d in described:
        options = ", ".join(f"{name} ({field.get('default')})" for name, field in d["options"].items())
        loads = ", ".join(d["formats"]) or "no model file"
        table.add_row(d["name"], ", ".join(d["capabilities"]), loads, options or "-", d["description"])
    print_table(table)
    out_console.print(
        "set options per deployment in lamina.yaml, e.g. `gguf: {n_ctx: 4096}`; --json for details"
    )
