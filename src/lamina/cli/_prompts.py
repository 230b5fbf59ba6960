"""``lamina prompts``: prompt templates: add (a new version when the content changed), list, show, render.

Templates live in the metadata store of the state directory, so these commands work beside a running
stack: a gateway sees a new version of ``NAME`` within two seconds (``NAME@N`` at once).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml
from pydantic import ValidationError
from rich.table import Table

from lamina.cli._common import (
    ConfigOption,
    JsonOption,
    StateDirOption,
    fail,
    out_console,
    print_json,
    print_table,
    state_store,
)

if TYPE_CHECKING:
    from lamina.application import PromptSpec, PromptStore, PromptVersion

prompts_app = typer.Typer(
    help="Prompt templates (Jinja2, versioned): add, list, show, render.", no_args_is_help=True
)

RefArgument = Annotated[
    str, typer.Argument(help="NAME (the newest version) or NAME@VERSION.", show_default=False)
]


@contextmanager
def _prompts(config: ConfigOption, state_dir: StateDirOption) -> Iterator[PromptStore]:
    """The templates of the state directory; a bad input exits 2, any other Lamina error 1, on one line."""
    from lamina.application import PromptStore  # the web stack: only for the commands that need it

    with state_store(config, state_dir) as store:
        yield PromptStore(store)


def _spec(
    file: Path | None, messages: str | None, variables: str | None, description: str | None
) -> PromptSpec:
    """The template from --file (YAML or JSON) or --messages, or exit 2 saying what is wrong."""
    from lamina.application import PromptSpec

    if (file is None) == (messages is None):
        raise typer.BadParameter("give the template with --file F.yaml or with --messages JSON (one of them)")
    try:
        if file is not None:
            data = yaml.safe_load(file.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise typer.BadParameter(f"{file} must hold a mapping with `messages` or `prompt`")
        else:
            data = {"messages": json.loads(messages or "")}
        if variables is not None:
            data["variables"] = json.loads(variables)
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {file}: {exc.strerror}") from None
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise typer.BadParameter(f"not valid YAML/JSON: {exc}") from None
    if description is not None:
        data["description"] = description
    try:
        return PromptSpec.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'the template'}: {e['msg']}" for e in exc.errors()[:3]
        )
        fail(f"the template is not valid: {problems}", exit_code=2)


@prompts_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="The template's name, e.g. support.", show_default=False)],
    file: Annotated[
        Path | None,
        typer.Option("--file", "-f", help="YAML (or JSON): messages or prompt, variables, description."),
    ] = None,
    messages: Annotated[
        str | None, typer.Option(help='The messages as JSON: [{"role": "system", "content": "..."}].')
    ] = None,
    variables: Annotated[
        str | None,
        typer.Option(
            help='JSON Schema per variable as JSON: {"name": {"type": "string"}} (default: inferred).'
        ),
    ] = None,
    description: Annotated[str | None, typer.Option(help="What the template is for.")] = None,
    json_output: JsonOption = False,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Add a version of NAME: 1 for a new name, N+1 when the content differs from the newest."""
    spec = _spec(file, messages, variables, description)
    with _prompts(config, state_dir) as prompts:
        version, created = prompts.add(name, spec)
    if json_output:
        print_json({**version.to_json(), "created": created})
        return
    what = "added" if created else "unchanged: the newest version already holds this content,"
    out_console.print(f"{what} [bold]{version.ref}[/] (sha256 {version.sha256[:12]})", highlight=False)


@prompts_app.command("list")
def list_(
    json_output: JsonOption = False, state_dir: StateDirOption = None, config: ConfigOption = None
) -> None:
    """Every template: its newest version, its kind and variables."""
    with _prompts(config, state_dir) as prompts:
        listed = prompts.list()
    if json_output:
        print_json([{**v.to_json(), "versions": n} for v, n in listed])
        return
    if not listed:
        out_console.print("no prompt templates; add one with `lamina prompts add NAME --file F.yaml`")
        return
    table = Table("name", "latest", "versions", "kind", "variables", "description", "created")
    for v, n in listed:
        names = ", ".join(f"{k}" if k in v.required() else f"{k}?" for k in v.spec.variables) or "none"
        table.add_row(
            v.name, str(v.version), str(n), v.kind, names, v.spec.description, v.created_at.isoformat()[:16]
        )
    print_table(table)


def _shown(version: PromptVersion) -> None:
    out_console.print(
        f"[bold]{version.ref}[/] ({version.kind}, sha256 {version.sha256[:12]}, "
        f"{version.created_at:%Y-%m-%d %H:%M})",
        highlight=False,
    )
    if version.spec.description:
        out_console.print(version.spec.description, highlight=False, markup=False)
    for var, schema in version.spec.variables.items():
        out_console.print(f"  {var}: {json.dumps(schema)}", highlight=False, markup=False)
    for m in version.spec.messages or ():
        out_console.print(f"--- {m.role}\n{m.content}", highlight=False, markup=False)
    if version.spec.prompt is not None:
        out_console.print(f"--- prompt\n{version.spec.prompt}", highlight=False, markup=False)


@prompts_app.command("show")
def show(
    ref: RefArgument,
    json_output: JsonOption = False,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """One version: its templates, variables and checksum (NAME: the newest)."""
    with _prompts(config, state_dir) as prompts:
        version = prompts.get(ref)
        versions = [v.version for v in prompts.versions(version.name)]
    if json_output:
        print_json({**version.to_json(), "versions": versions})
        return
    _shown(version)


def _variables(pairs: list[str], version: PromptVersion) -> dict[str, Any]:
    """``--var k=v``: the text as it is for a string variable, else its JSON value (5, true, [1, 2])."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--var")
        if version.spec.variables.get(key, {}).get("type") == "string":
            values[key] = text
            continue
        try:
            values[key] = json.loads(text)
        except json.JSONDecodeError:
            values[key] = text
    return values


@prompts_app.command("render")
def render(
    ref: RefArgument,
    var: Annotated[
        list[str] | None,
        typer.Option("--var", help="A variable, KEY=VALUE (repeat it); JSON for non-strings."),
    ] = None,
    json_output: JsonOption = False,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Fill a template in, as the gateway would for `lamina_template` (nothing is sent anywhere)."""
    with _prompts(config, state_dir) as prompts:
        version = prompts.get(ref)
        rendered = prompts.render(version.ref, _variables(var or [], version))
    if json_output:
        print_json({"ref": rendered.ref, "messages": rendered.messages, "prompt": rendered.prompt})
        return
    out_console.print(rendered.text, highlight=False, markup=False, soft_wrap=True)
