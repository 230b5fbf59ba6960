"""Drift between a dataset version and live traffic: the sampled query window, the tests, the reports.

Imports ``lamina.data.vectors`` and ``lamina.data.versions`` among the data layer's sub-packages.
"""

from lamina.data.drift._coverage import coverage, top_terms
from lamina.data.drift._records import DriftMetricsJSON, DriftReport
from lamina.data.drift._report import (
    CatalogResolver,
    DriftChecker,
    DriftReports,
    DriftSettings,
    VersionResolver,
    publish_drift_metrics,
)
from lamina.data.drift._window import (
    MAX_SAMPLE_CHARS,
    DriftWindow,
    Sample,
    WindowPolicy,
    parse_window,
    since_of,
)

__all__ = [
    "MAX_SAMPLE_CHARS",
    "CatalogResolver",
    "DriftChecker",
    "DriftMetricsJSON",
    "DriftReport",
    "DriftReports",
    "DriftSettings",
    "DriftWindow",
    "Sample",
    "VersionResolver",
    "WindowPolicy",
    "coverage",
    "parse_window",
    "publish_drift_metrics",
    "since_of",
    "top_terms",
]
