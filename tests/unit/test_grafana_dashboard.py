"""The Grafana dashboard in deploy/grafana queries only series that Lamina exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from lamina.observability import DriftMetrics, Telemetry

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "lamina.json"
_SERIES = re.compile(r"\blamina_[a-z0-9_]+")
#: the sample names each metric type exposes, by suffix
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def _queries(node: Any) -> list[str]:
    """Every PromQL string of the dashboard: panel targets and template variable queries."""
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        if isinstance(node.get("definition"), str):
            found.append(node["definition"])
        return found + [q for value in node.values() for q in _queries(value)]
    if isinstance(node, list):
        return [q for item in node for q in _queries(item)]
    return []


def _exported() -> set[str]:
    registry = CollectorRegistry()
    telemetry = Telemetry(service_name="t", registry=registry)
    DriftMetrics(registry)
    names = {
        family.name + suffix for family in registry.collect() for suffix in _SUFFIXES.get(family.type, ("",))
    }
    telemetry.shutdown()
    return names


def test_every_series_the_dashboard_queries_is_exported() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = _queries(dashboard)
    assert len(queries) >= 30
    used = {name for q in queries for name in _SERIES.findall(q)}
    exported = _exported()
    assert used - exported == set(), f"the dashboard queries series Lamina does not export: {used - exported}"
    # and it shows the engine's vLLM-named series, the layers, and the devices
    for name in (
        "lamina_time_to_first_token_seconds_bucket",
        "lamina_inter_token_latency_seconds_bucket",
        "lamina_request_queue_time_seconds_bucket",
        "lamina_e2e_request_latency_seconds_bucket",
        "lamina_num_requests_running",
        "lamina_num_requests_waiting",
        "lamina_prefix_cache_hits_total",
        "lamina_layer_seconds_total",
        "lamina_device_gpu_utilization_percent",
    ):
        assert name in used, name


def test_the_dashboard_panels_have_unique_ids_and_a_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource", "model"]
