"""``lamina models quantize``: quantize a registered version and put the variant through the accuracy gate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

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
from lamina.config import GateTolerance
from lamina.errors import LaminaError
from lamina.models import GATE_LIMITS, QUANT_METHODS, GateResult, dataset_sample, quantize_and_gate
from lamina.stack import open_data_stack

ToleranceOption = Annotated[
    list[str] | None,
    typer.Option(
        "--tolerance",
        "-t",
        help=f"LIMIT=VALUE, repeatable; limits: {', '.join(GateTolerance.model_fields)} "
        "(e.g. min_cosine=0.98).",
    ),
]
DatasetOption = Annotated[
    str | None,
    typer.Option("--dataset", "-d", help="Embedding models: evaluate on a sample of this D@V's chunks."),
]
QueriesOption = Annotated[
    Path | None,
    typer.Option(
        "--queries",
        help='Embedding models: JSONL of {"query": TEXT, "relevant": [INDEX, ...]} labelled against the '
        "evaluated texts, for nDCG@10.",
    ),
]
SampleOption = Annotated[
    int | None,
    typer.Option("--sample", min=1, help="Chunks sampled from --dataset (default: quantization.sample)."),
]


def quantize(
    ref: Annotated[str, typer.Argument(metavar="NAME@VERSION", help="The version to quantize.")],
    method: Annotated[str, typer.Option("--method", "-m", help=f"One of: {', '.join(QUANT_METHODS)}.")],
    tolerance: ToleranceOption = None,
    dataset: DatasetOption = None,
    queries: QueriesOption = None,
    sample: SampleOption = None,
    version: Annotated[
        str | None, typer.Option("--version", help="The variant's version (default: PARENT-METHOD).")
    ] = None,
    json_output: JsonOption = False,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Quantize NAME@VERSION into a new version; it serves only if the accuracy gate passes."""
    overrides = _limits(tolerance or [])
    labelled = _queries(queries) if queries else None
    cfg, root = load(config, state_dir)
    limits = {**cfg.quantization.tolerance.model_dump(), **overrides}
    try:
        stack = open_data_stack(cfg, root)
    except LaminaError as exc:
        fail(exc)
    try:
        texts, label = None, None
        if dataset:
            size = sample or cfg.quantization.sample
            label, texts = dataset_sample(stack.catalog, stack.vectors, dataset, size)
        result = quantize_and_gate(
            stack.registry, ref, method, limits, texts=texts, queries=labelled, dataset=label, version=version
        )
    except LaminaError as exc:
        fail(exc)
    finally:
        stack.close()
    if json_output:
        print_json(result.to_json())
    else:
        _print(result)
    if not result.passed:
        raise typer.Exit(3)


def _limits(given: list[str]) -> dict[str, float]:
    limits = {}
    for item in given:
        key, sep, value = item.partition("=")
        try:
            limits[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or key.strip() not in GateTolerance.model_fields:
            fail(
                f"--tolerance {item!r}: write LIMIT=NUMBER with LIMIT one of "
                + ", ".join(GateTolerance.model_fields)
            )
    return limits


def _queries(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError) as exc:
        fail(f"--queries {path}: cannot read it as JSON lines ({exc})")


def _print(result: GateResult) -> None:
    table = Table("figure", "value", "limit", show_edge=False)
    limit_of = {GATE_LIMITS[key][0]: key for key in result.tolerance}
    for figure, value in result.figures.items():
        key = limit_of.get(figure)
        table.add_row(figure, f"{value:.5g}", f"{key} {result.tolerance[key]:g}" if key else "")
    print_table(table)
    verdict = "[green]passed[/]: it serves" if result.passed else "[red]failed[/]: recorded, never serves"
    out_console.print(
        f"{result.ref} ({result.method} of {result.parent}, {result.size_bytes:,} bytes, quantized in "
        f"{result.quantize_s:.1f} s, evaluated in {result.evaluate_s:.1f} s): {verdict}",
        highlight=False,
    )
    for reason in result.reasons:
        out_console.print(f"  {reason}", highlight=False)
