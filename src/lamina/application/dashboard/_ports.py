"""What the dashboard reads, as small typed views and the ports that give them.

The dashboard owns no state: every page asks its :class:`DashboardSources` again. The composition root
fills each port from the object that holds the data (the controller, the registry, the data catalog, the
cost ledger, the spans table...); a port left ``None`` shows as "not available" on its page, so the
dashboard renders whatever part of the stack exists. Ports are called from a worker thread (they may block
on the metadata store), and a port that raises shows its error on its own panel only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol

from lamina.application._budgets import CostLine

Health = Literal["ok", "degraded", "down", "unknown"]


@dataclass(frozen=True)
class Link:
    """A table cell that links to another page of the dashboard."""

    text: str
    href: str


Cell = str | int | float | Link | None


@dataclass(frozen=True)
class Table:
    """A panel's rows, already in the words and units the page shows."""

    columns: tuple[str, ...]
    rows: Sequence[tuple[Cell, ...]]
    #: a line under the table (what it covers, where it comes from)
    note: str = ""


@dataclass(frozen=True)
class ReplicaView:
    replica_id: str
    state: str
    pid: int | None
    url: str | None
    restarts: int
    last_error: str | None = None


@dataclass(frozen=True)
class DeploymentView:
    name: str
    desired: int
    replicas: tuple[ReplicaView, ...]

    @property
    def ready(self) -> int:
        return sum(1 for r in self.replicas if r.state == "ready")


@dataclass(frozen=True)
class TraceSummary:
    """One request's trace, by its root span."""

    trace_id: str
    name: str
    started: datetime
    duration_ms: float
    status: str
    spans: int
    model: str | None = None


@dataclass(frozen=True)
class SpanView:
    span_id: str
    parent_span_id: str | None
    name: str
    layer: str | None
    start_ns: int
    end_ns: int
    status: str
    attributes: dict[str, object] = field(default_factory=dict)

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


@dataclass(frozen=True)
class Verdict:
    """The doctor's word: the layer to investigate, why, and what to do."""

    layer: str | None
    summary: str
    evidence: tuple[str, ...] = ()
    action: str = ""


class TraceSource(Protocol):
    def recent(self, limit: int) -> list[TraceSummary]:
        """The newest traces, newest first."""
        ...

    def spans(self, trace_id: str) -> list[SpanView]:
        """Every span of one trace, oldest first (empty: unknown trace)."""
        ...

    def layer_ms(self, window_s: float) -> dict[str, float]:
        """Time spent in each layer over the last ``window_s`` seconds (span self-time, ms)."""
        ...


class CostSource(Protocol):
    def summary(self, by: Literal["key", "model", "day"], since: datetime) -> list[CostLine]: ...


@dataclass(frozen=True)
class DashboardSources:
    """The ports of every page; ``None``: that part of the stack is not available here."""

    #: the Prometheus exposition of the gateway's metrics (live figures)
    metrics: Callable[[], bytes]
    deployments: Callable[[], Sequence[DeploymentView]] | None = None
    models: Callable[[], Table] | None = None
    #: names a chat request may use (deployments and RAG aliases), the playground's choices
    chat_models: Callable[[], Sequence[str]] | None = None
    #: the playground's model when the user picks none (a RAG alias answers with citations)
    playground_model: str | None = None
    datasets: Callable[[], Table] | None = None
    #: the lineage of one dataset version (``NAME@SEQ``): its source files and their chunks
    lineage: Callable[[str], Table] | None = None
    drift: Callable[[], Table] | None = None
    costs: CostSource | None = None
    traces: TraceSource | None = None
    jobs: Callable[[], Table] | None = None
    #: the doctor's verdict over the last 15 minutes (a coroutine: it may gather from several places)
    doctor: Callable[[], Awaitable[Verdict]] | None = None
