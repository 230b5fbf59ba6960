"""The web dashboard served by the gateway at ``/``: the five layers, live figures, traces, and a playground.

Pages are rendered on the server (Jinja2, templates in this package) and refreshed with htmx; the chart is
uPlot. Both are vendored under ``static/vendor`` with their licences, so the dashboard works offline and
needs no build step. What the pages show comes through the ports of :class:`DashboardSources`.
"""

from lamina.application.dashboard._figures import FigureHistory, Figures, figures, parse_sample, quantile
from lamina.application.dashboard._ports import (
    CostSource,
    DashboardSources,
    DeploymentView,
    Link,
    ReplicaView,
    SpanView,
    Table,
    TraceSource,
    TraceSummary,
    Verdict,
)
from lamina.application.dashboard._router import dashboard_router
from lamina.application.dashboard._traces import StoreTraces, self_time_by_layer

__all__ = [
    "CostSource",
    "DashboardSources",
    "DeploymentView",
    "FigureHistory",
    "Figures",
    "Link",
    "ReplicaView",
    "SpanView",
    "StoreTraces",
    "Table",
    "TraceSource",
    "TraceSummary",
    "Verdict",
    "dashboard_router",
    "figures",
    "parse_sample",
    "quantile",
    "self_time_by_layer",
]
