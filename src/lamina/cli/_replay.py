"""``lamina replay TRACE_ID``: send a kept request again, pinned, and show what differs.

The request comes from the state directory's store (``replay_requests``, kept when
``observability.keep_requests`` is on); it goes to the running gateway (``--url``, an admin key from
``--api-key``/``LAMINA_API_KEY``) with the model pinned to the version that answered (``NAME@VERSION``
where the catalog routes it, else the deployment that served it), a RAG request's dataset pinned to the
exact version it retrieved from (the body's ``rag`` names its version id), the template already rendered
and the same ``seed``. A request that had no seed was sampled freely: its answer may differ by sampling
alone, and the report says so.

What differs: the answer text (a unified diff), the citations (chunk ids, in order), and the time per layer
(the original trace's spans against the replay's ``x-lamina-layers`` header).
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Annotated, Any

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
    state_store,
)
from lamina.cli._gateway_client import (
    ApiKeyOption,
    UrlOption,
    auth_headers,
    checked_json,
    gateway_url,
    unreachable,
)
from lamina.errors import LaminaError, ModelNotFoundError
from lamina.observability import check_trace_id, layer_times_ms, parse_header, read_trace

if TYPE_CHECKING:
    from lamina.application import ReplayRecord

TRACE_HEADER = "x-lamina-trace-id"
LAYERS_HEADER = "x-lamina-layers"


def _text(answer: dict[str, Any] | None) -> str | None:
    return None if answer is None else answer.get("text")


def _chunks(citations: Any) -> list[str]:
    return [str(c.get("chunk_id")) for c in citations or [] if isinstance(c, dict)]


def _send(url: str, route: str, body: dict[str, Any], headers: dict[str, str]) -> httpx.Response:
    try:
        return httpx.post(f"{url}{route}", json=body, headers=headers, timeout=300)
    except httpx.TransportError as exc:
        raise unreachable(url, exc) from exc


def _replayed(
    url: str, record: ReplayRecord, headers: dict[str, str]
) -> tuple[dict[str, Any], httpx.Response, str]:
    """Send the pinned body: by model version first, by deployment when the catalog routes no version."""
    body = record.pinned(routable=True)
    response = _send(url, record.route, body, headers)
    if response.status_code == 404 and body["model"] != record.versions.get("deployment"):
        try:
            checked_json(response)
        except ModelNotFoundError:
            body = record.pinned(routable=False)
            response = _send(url, record.route, body, headers)
        except LaminaError:
            pass
    return checked_json(response), response, str(body["model"])


def replay(
    trace_id: Annotated[str, typer.Argument(help="The trace id of the request to send again.")],
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_out: JsonOption = False,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Send a traced request again, pinned to the same versions and seed, and show what differs."""
    from lamina.application import read_replay

    cfg, _ = load(config, state_dir)
    with state_store(config, state_dir) as store:
        record = read_replay(store, check_trace_id(trace_id))
        before_layers = layer_times_ms(read_trace(store, record.trace_id))
    base = gateway_url(cfg, url)
    try:
        answer, response, model = _replayed(base, record, auth_headers(cfg, api_key))
    except LaminaError as exc:
        fail(exc)
    report = _report(record, answer, response, model, before_layers)
    if json_out:
        print_json(report)
        return
    _print(report)


def _report(
    record: ReplayRecord,
    answer: dict[str, Any],
    response: httpx.Response,
    model: str,
    before_layers: dict[str, float],
) -> dict[str, Any]:
    from lamina.application import answer_summary

    after = answer_summary(answer) or {}
    before = record.answer or {}
    old_text, new_text = _text(before), after.get("text")
    diff = (
        ""
        if old_text is None or new_text is None
        else "\n".join(
            difflib.unified_diff(
                old_text.splitlines(), new_text.splitlines(), "original", "replay", lineterm=""
            )
        )
    )
    try:
        after_layers = parse_header(response.headers.get(LAYERS_HEADER, ""))
    except ValueError:
        after_layers = {}
    old_chunks, new_chunks = _chunks(before.get("citations")), _chunks(after.get("citations"))
    return {
        "trace_id": record.trace_id,
        "replay_trace_id": response.headers.get(TRACE_HEADER),
        "route": record.route,
        "pinned": {
            **{k: v for k, v in record.versions.items() if v is not None and k != "model"},
            "model": model,
            "asked": record.versions.get("model"),
        },
        "seeded": record.versions.get("seed") is not None,
        # False: the catalog no longer routes the recorded NAME@VERSION; the deployment answered instead
        "version_pinned": record.versions.get("model_version") in (None, model),
        "answer": {
            "original": old_text,
            "replay": new_text,
            "same": old_text == new_text if old_text is not None else None,
            "diff": diff,
        },
        "citations": {"original": old_chunks, "replay": new_chunks, "same": old_chunks == new_chunks},
        "layers_ms": {"original": before_layers, "replay": after_layers},
    }


def _print(report: dict[str, Any]) -> None:
    pinned = ", ".join(f"{k}={v}" for k, v in report["pinned"].items() if k != "stream")
    out_console.print(f"replayed {report['trace_id']} as {report['replay_trace_id']}", highlight=False)
    out_console.print(f"  pinned: {pinned}", highlight=False, soft_wrap=True)
    if not report["version_pinned"]:
        out_console.print(
            f"  [yellow]the gateway no longer routes {report['pinned']['model_version']}: sent to the "
            f"deployment {report['pinned']['model']} (whatever version it serves now)[/]"
        )
    if not report["seeded"]:
        out_console.print("  [yellow]the original named no seed: its answer may differ by sampling alone[/]")
    answer = report["answer"]
    if answer["original"] is None:
        out_console.print("  answer: the original was streamed or not kept; the replay answered:")
        out_console.print(answer["replay"] or "", highlight=False, markup=False)
    elif answer["same"]:
        out_console.print("  answer: [green]the same[/]")
    else:
        out_console.print("  answer: [red]differs[/]")
        out_console.print(answer["diff"], highlight=False, markup=False)
    citations = report["citations"]
    if citations["original"] or citations["replay"]:
        verdict = "[green]the same[/]" if citations["same"] else "[red]differ[/]"
        out_console.print(f"  citations: {verdict}")
        if not citations["same"]:
            out_console.print(f"    original: {citations['original']}\n    replay:   {citations['replay']}")
    layers = report["layers_ms"]
    table = Table("layer", "original ms", "replay ms")
    for layer in sorted(set(layers["original"]) | set(layers["replay"])):
        old, new = layers["original"].get(layer), layers["replay"].get(layer)
        table.add_row(layer, "-" if old is None else f"{old:.1f}", "-" if new is None else f"{new:.1f}")
    print_table(table)
