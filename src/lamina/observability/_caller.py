"""The caller's trace: a request's W3C ``traceparent``, and the request's spans exported as part of it.

An application that calls the gateway inside its own OpenTelemetry trace (OpenLLMetry, an instrumented
LangChain app, any OpenTelemetry HTTP client) sends ``traceparent: 00-<trace id>-<its span id>-<flags>``.
The gateway keeps its own trace per request, under its own id: that is what the ``x-lamina-trace-id``
header, the store, ``lamina trace``, ``lamina replay`` and the doctor work on, one request each (a caller's
trace may hold many requests: an agent's model calls). What it exports over OTLP joins the caller's
trace instead: the same spans under the caller's trace id, the request's root a child of the caller's
span, and ``lamina.trace_id`` on the root naming the gateway's own id. A caller that sampled its trace
(flag ``01``) gets the request's spans kept as the parent-based samplers of OpenTelemetry SDKs would, up
to a cap (``_sampling.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanContext, TraceFlags

#: the root's attribute that names the gateway's own trace id in an exported (joined) trace
LOCAL_TRACE_ID = "lamina.trace_id"
_HEX = frozenset(b"0123456789abcdef")


def caller_of(value: bytes) -> SpanContext | None:
    """The caller's span from a ``traceparent`` header value, or None when it is not a valid one (the
    W3C rules: lowercase hex, version ``ff`` refused, a later version read by its first four fields, an
    all-zero trace or parent id invalid)."""
    if len(value) < 55 or not _HEX.issuperset(value[:2]) or value[:2] == b"ff":
        return None
    if len(value) > 55 and (value[:2] == b"00" or value[55:56] != b"-"):
        return None
    trace_id, span_id, flags = value[3:35], value[36:52], value[53:55]
    if value[2:3] != b"-" or value[35:36] != b"-" or value[52:53] != b"-":
        return None
    if not (_HEX.issuperset(trace_id) and _HEX.issuperset(span_id) and _HEX.issuperset(flags)):
        return None
    tid, sid = int(trace_id, 16), int(span_id, 16)
    if tid == 0 or sid == 0:
        return None
    return SpanContext(tid, sid, is_remote=True, trace_flags=TraceFlags(int(flags, 16) & TraceFlags.SAMPLED))


def joined(spans: Sequence[ReadableSpan], caller: SpanContext) -> list[ReadableSpan]:
    """``spans`` (one kept trace of the gateway's, its root the one without a parent) as part of the
    caller's trace: the caller's trace id, the root under the caller's span, the gateway's id on the root."""
    out = []
    for s in spans:
        ctx = s.context
        assert ctx is not None
        own = SpanContext(caller.trace_id, ctx.span_id, False, ctx.trace_flags)
        attributes = dict(s.attributes or {})
        if s.parent is None:
            parent = caller
            attributes[LOCAL_TRACE_ID] = format(ctx.trace_id, "032x")
        else:
            parent = SpanContext(caller.trace_id, s.parent.span_id, False, s.parent.trace_flags)
        out.append(
            ReadableSpan(
                s.name,
                own,
                parent,
                s.resource,
                attributes,
                s.events,
                s.links,
                s.kind,
                None,
                s.status,
                s.start_time,
                s.end_time,
                s.instrumentation_scope,
            )
        )
    return out
