"""One local trace while its root runs: its spans (kept as they are, made ``ReadableSpan`` objects only if
the trace is kept) and the per-layer time so far, summed as each span ends.

The breakdown is the self time of the spans per layer (``_breakdown.py`` defines it over a finished
trace). Summed as spans end, it costs a few dict operations per span and per answer instead of a walk
over the trace: a span of layer L whose parent has layer P adds its duration to L and takes it from P,
so each layer ends up with the time of its spans less the parts their children cover. A span still
running counts up to now. A span's duration is clipped to its parent's interval as far as that is known
when it ends (its start, and its end if the parent ended first); records timed by another process (the
replica's engine) are clipped to now.
"""

from __future__ import annotations

import time
from typing import Any

from opentelemetry.trace import SpanContext
from opentelemetry.util.types import Attributes

from lamina.observability._breakdown import LAYERS, Breakdown

#: the layer of a local root that names none
ROOT_LAYER = "application"
#: every layer's time at 0 (a trace's ``net`` starts as a copy)
_ZERO = dict.fromkeys(LAYERS, 0)
#: a layer's place in LAYERS (and in ``net``)
_INDEX = {layer: i for i, layer in enumerate(LAYERS)}

#: a child known only after the fact, made with its parent: ``(name, attributes, start_ns, end_ns)``
Later = tuple[str, Attributes, int, int]


class Record:
    """A span known only after the fact (``TraceKeeper.add``), until its trace is kept; ``later`` are its
    children of the same kind, given their ids only if the trace is kept."""

    __slots__ = ("attributes", "end_time", "later", "name")

    def __init__(self, name: str, attributes: Attributes, end_time: int, later: tuple[Later, ...]) -> None:
        self.name = name
        self.attributes = attributes
        self.end_time: int | None = end_time
        self.later = later


#: a span kept as timestamps until its trace is kept: ``(name, attributes, start_ns, end_ns, span_id,
#: parent_id, error)`` (span id 0: it gets one then; parent id None: the root; error: the description of
#: its ERROR status, None for none)
Deferred = tuple[str, Attributes, int, int, int, int | None, str | None]

#: a span (a LightSpan, an SDK span or a Record) of an open trace: it, its id, its parent's id, its start
Held = tuple[Any, int, int | None, int]


class OpenTrace:
    """The spans of one local trace and its per-layer time, from its root's start to its decision."""

    __slots__ = (
        "caller",
        "closed",
        "extra",
        "failed",
        "flags",
        "held",
        "known",
        "net",
        "parent",
        "root_id",
        "running",
        "sdk",
        "trace_id",
    )

    def __init__(self, trace_id: int, flags: int, parent: Any = None) -> None:
        self.trace_id = trace_id
        self.flags = flags
        #: the root's remote parent (a SpanContext), if any
        self.parent = parent
        #: the caller's span of a request that came with a ``traceparent`` (``_caller.py``): the trace is
        #: exported as part of the caller's, and kept when the caller sampled it
        self.caller: SpanContext | None = None
        self.root_id = 0
        self.held: list[Held] = []
        #: span id -> [start, end or None, its layer, its parent's layer or None for the root]
        self.known: dict[int, list[Any]] = {}
        #: finished spans' self time per layer so far (nanoseconds, may dip below 0 until children end)
        self.net: dict[str, int] = _ZERO.copy()
        #: spans started and not ended: span id -> its entry in ``known``
        self.running: dict[int, list[Any]] = {}
        #: decided (kept or dropped): nothing more is recorded
        self.closed = False
        #: a light span of it was marked ERROR
        self.failed = False
        #: it holds SDK spans (their status is read at the decision)
        self.sdk = False
        #: spans kept as plain timestamps by their owner (the gateway's own steps), made only if the trace
        #: is kept: a function that returns the root's further attributes and those spans (``Deferred``)
        self.extra: Any = None

    def begin(self, obj: Any, span_id: int, parent_id: int | None, layer: str | None, start: int) -> str:
        """``obj`` starts (the first span to start is the root); returns its layer (its own or its
        parent's; a parent not in this trace is taken as the root)."""
        if not self.held:
            return self.begin_root(obj, span_id, layer or ROOT_LAYER, start)
        parent = self.known.get(parent_id if parent_id is not None else self.root_id)
        if parent is None:
            parent = self.known[self.root_id]
        entry = [max(start, parent[0]), None, layer or parent[2], parent[2]]
        self.known[span_id] = entry
        self.running[span_id] = entry
        self.held.append((obj, span_id, parent_id, start))
        return str(entry[2])

    def begin_root(self, obj: Any, span_id: int, layer: str, start: int) -> str:
        """:meth:`begin` for the root (the first span), whose layer is known: ``layer``."""
        self.root_id = span_id
        self.known[span_id] = self.running[span_id] = [start, None, layer, None]
        self.held.append((obj, span_id, None, start))
        return layer

    def end(self, span_id: int, end: int) -> None:
        """The span ``span_id`` ended at ``end``."""
        entry = self.running.pop(span_id, None)
        if entry is not None:
            entry[1] = max(end, entry[0])
            self._count(entry)

    def _count(self, entry: list[Any]) -> None:
        duration = entry[1] - entry[0]
        net = self.net
        if entry[2] in net:
            net[entry[2]] += duration
        if entry[3] in net:
            net[entry[3]] -= duration

    def begin_step(self, key: int, start: int, layer: str, parent_layer: str) -> None:
        """A span its owner keeps as timestamps (``extra``) starts: it counts up to now until :meth:`end`
        (with ``key``) ends it."""
        if not self.closed:
            self.running[key] = [start, None, layer, parent_layer]

    def shift(self, layer: str, parent_layer: str, ns: int) -> None:
        """A span of ``layer`` under one of ``parent_layer`` took ``ns`` (a span whose owner keeps it as
        timestamps, made only if the trace is kept: ``extra``)."""
        if ns > 0 and layer != parent_layer and not self.closed:
            net = self.net
            net[layer] += ns
            net[parent_layer] -= ns

    def record(
        self,
        span_id: int,
        parent_id: int,
        name: str,
        attributes: Attributes,
        start: int,
        end: int,
        later: tuple[Later, ...] = (),
    ) -> None:
        """A finished span under ``parent_id`` timed after the fact, with its children ``later`` (which
        count in the breakdown now and become spans only if the trace is kept). ``span_id`` 0: it gets one
        if the trace is kept (nothing can name it as a parent before)."""
        if self.closed:
            return
        parent = self.known.get(parent_id) or self.known[self.root_id]
        hi = min(end, time.time_ns() if parent[1] is None else parent[1])
        lo = min(max(start, parent[0]), hi)
        hi = max(hi, lo)
        layer = (attributes or {}).get("lamina.layer")
        own = layer if isinstance(layer, str) else parent[2]
        net = self.net
        if own != parent[2]:
            net[own] += hi - lo
            net[parent[2]] -= hi - lo
        if span_id:
            self.known[span_id] = [lo, hi, own, parent[2]]
        self.held.append((Record(name, attributes, end, later), span_id, parent_id, start))
        for _, attrs, c_start, c_end in later:
            c_lo, c_hi = max(c_start, lo), min(c_end, hi)
            if c_hi > c_lo:
                c_layer = (attrs or {}).get("lamina.layer")
                if isinstance(c_layer, str) and c_layer != own:
                    net[c_layer] += c_hi - c_lo
                    net[own] -= c_hi - c_lo

    def breakdown(self, now: int) -> Breakdown:
        """The per-layer time of the trace so far, running spans up to ``now``."""
        root = self.known[self.root_id]
        running = self.running
        if len(running) == 1 and root[1] is None and root[2] == ROOT_LAYER:  # only the root runs: an answer
            app, data, models, orch, compute = self.net.values()  # the keys are LAYERS, in order
            app += now - root[0] if now > root[0] else 0
        else:  # a stream's header (its dispatch still runs), a span of the application's still open
            sums = list(self.net.values())
            for start, _, layer, parent in running.values():
                if now > start:
                    i, j = _INDEX.get(layer), _INDEX.get(parent)
                    if i is not None:
                        sums[i] += now - start
                    if j is not None:
                        sums[j] -= now - start
            app, data, models, orch, compute = sums
        total = (root[1] if root[1] is not None else now) - root[0]
        return Breakdown.of_us(  # whole microseconds
            (
                app // 1000 if app > 0 else 0,
                data // 1000 if data > 0 else 0,
                models // 1000 if models > 0 else 0,
                orch // 1000 if orch > 0 else 0,
                compute // 1000 if compute > 0 else 0,
            ),
            total // 1000 if total > 0 else 0,
        )
