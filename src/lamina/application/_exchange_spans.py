"""The gateway's own steps of one request as spans, made only when its trace is kept.

While a request runs, :class:`~lamina.application._tracing.Exchange` keeps its steps as timestamps (a
span object per step cost more than the rest of the tracing); :func:`deferred_spans` turns them into the
spans a kept trace stores, under the root unless said otherwise:

- ``auth``, ``parse``, ``cache`` and the policies' steps (application): before routing under the root,
  between routing and the first dispatch under ``admission``, after the reply under ``respond``;
- ``route`` (models), ``admission`` (application, routing to the first dispatch);
- per reply, under its ``dispatch`` span: ``engine`` (models, the replica's clock, same host) with
  ``queue``, then ``prefill`` up to the first token and ``decode`` after it (``embed`` for an embedding),
  and ``device`` (compute: the device and its utilisation then);
- ``respond`` (application: output guards, cache store, settling, sending, after the reply).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.util.types import AttributeValue

from lamina.observability import LAYER, Deferred, Layer

_APPLICATION: dict[str, AttributeValue] = {LAYER: Layer.APPLICATION.value}
_MODELS: dict[str, AttributeValue] = {LAYER: Layer.MODELS.value}

#: one reply: its dispatch span, the replica's ``lamina`` extension, the prefill ms, whether it generates
#: tokens, and the device span's attributes
Reply = tuple[Any, Mapping[str, Any], float | None, bool, dict[str, AttributeValue]]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _span_id() -> int:
    return random.getrandbits(64) or 1


def deferred_spans(
    steps: Sequence[tuple[str, int, int]],
    route: tuple[int, int, dict[str, AttributeValue], str | None] | None,
    admission: tuple[int, int],
    respond: tuple[int, int],
    replies: Sequence[Reply],
) -> list[Deferred]:
    """The spans of a kept trace's gateway steps (see the module doc); ``admission`` and ``respond`` are
    (start_ns, end_ns), 0 when the request never got there."""
    out: list[Deferred] = []
    admitted_id = _span_id() if admission[0] and admission[1] else None
    respond_id = _span_id() if respond[0] else None
    if route is not None:
        out.append(("route", route[2], route[0], route[1], 0, None, route[3]))
    if admitted_id is not None:
        out.append(("admission", _APPLICATION, admission[0], admission[1], admitted_id, None, None))
    if respond_id is not None:
        out.append(("respond", _APPLICATION, respond[0], respond[1], respond_id, None, None))
    for step, start, end in steps:
        parent = None
        if respond_id is not None and start >= respond[0]:
            parent = respond_id
        elif admitted_id is not None and admission[0] <= start < admission[1] + 1:
            parent = admitted_id
        out.append((step, _APPLICATION, start, end, 0, parent, None))
    for reply in replies:
        out.extend(_engine(*reply))
    return out


def _engine(
    dispatch: Any,
    ext: Mapping[str, Any],
    prefill_ms: float | None,
    generates: bool,
    device: dict[str, AttributeValue],
) -> list[Deferred]:
    """The replica's work as spans timed by the replica's clock (same host): ``engine`` (models) from
    receipt to the end, with ``queue``, then ``prefill`` up to the first token and ``decode`` after it
    (``embed`` for an embedding), and ``device`` (compute): the device and its utilisation then."""
    start, end = ext.get("start_ns"), ext.get("end_ns")
    if not (isinstance(start, int) and isinstance(end, int)) or isinstance(start, bool) or end < start:
        return []
    queue_ms = _number(ext.get("queue_ms")) or 0.0
    received = max(start - int(queue_ms * 1e6), 0)
    attrs: dict[str, AttributeValue] = {LAYER: Layer.MODELS.value}
    for key in ("queue_ms", "ttft_ms", "engine_ms", "compute_ms"):
        value = _number(ext.get(key))
        if value is not None:
            attrs[f"lamina.{key}"] = value
    if isinstance(ext.get("model_version"), str):
        attrs["lamina.model_version"] = ext["model_version"]
    engine_id = _span_id()
    out: list[Deferred] = [("engine", attrs, received, end, engine_id, dispatch.span_id, None)]
    if start > received:
        out.append(("queue", _MODELS, received, start, 0, engine_id, None))
    if generates and prefill_ms is not None:
        first = min(max(start + int(prefill_ms * 1e6), start), end)
        out.append(("prefill", _MODELS, start, first, 0, engine_id, None))
        if end > first:
            out.append(("decode", _MODELS, first, end, 0, engine_id, None))
    else:
        out.append(("embed" if not generates else "generate", _MODELS, start, end, 0, engine_id, None))
    out.append(("device", device, start, start, 0, engine_id, None))
    return out
