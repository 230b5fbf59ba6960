"""The dashboard rendered by the real gateway app (FastAPI's TestClient), over sources the test fills.

What is checked: every page renders, a missing or failing source shows as "not available" on its own panel
only, an admin key is required when keys are on (the login form, the cookie's flags, JSON only), the
playground asks the gateway's own /v1 with the caller's key, and the figures' arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Literal

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request

from lamina.application import CostLine, GatewayDeps, Principal, create_app
from lamina.application.dashboard import (
    DashboardSources,
    DeploymentView,
    FigureHistory,
    Link,
    ReplicaView,
    SpanView,
    Table,
    TraceSummary,
    Verdict,
    figures,
    parse_sample,
    quantile,
    self_time_by_layer,
)
from lamina.application.dashboard._pages import STATIC
from lamina.errors import AuthenticationError, NotFoundError
from lamina.observability import Telemetry
from tests.support.gateway import CHAT, ReplayDispatcher, StaticCatalog

ADMIN = "admin-secret"
TRACE = "0123456789abcdef0123456789abcdef"
PAGES = (
    "/",
    "/ui/traces",
    f"/ui/traces/{TRACE}",
    "/ui/deployments",
    "/ui/jobs",
    "/ui/datasets",
    "/ui/datasets/docs@1",
    "/ui/models",
    "/ui/costs",
    "/ui/drift",
    "/ui/playground",
)


class Traces:
    def recent(self, limit: int) -> list[TraceSummary]:
        return [
            TraceSummary(TRACE, "POST /v1/chat/completions", datetime(2026, 1, 1, tzinfo=UTC), 42.0, "ok", 3)
        ]

    def spans(self, trace_id: str) -> list[SpanView]:
        if trace_id != TRACE:
            return []
        return [
            SpanView("a" * 16, None, "POST /v1/chat/completions", "application", 0, 40_000_000, "ok"),
            SpanView("b" * 16, "a" * 16, "retrieve", "data", 1_000_000, 11_000_000, "ok", {"k": 2}),
            SpanView("c" * 16, "a" * 16, "dispatch", "orchestration", 12_000_000, 39_000_000, "ok"),
        ]

    def layer_ms(self, window_s: float) -> dict[str, float]:
        return {"orchestration": 27.0, "data": 10.0, "application": 3.0}


class Ledger:
    def summary(self, by: Literal["key", "model", "day"], since: datetime) -> list[CostLine]:
        return [CostLine(f"{by}-one", 3, 30, 12, 0.5, 0.000123)]


def failing() -> Table:
    raise RuntimeError("the catalog is locked")


async def verdict() -> Verdict:
    return Verdict("orchestration", "dispatch p95 27 ms", ("both replicas busy",), "add a replica")


def _lineage(ref: str) -> Table:
    if not ref.startswith("docs@"):
        raise NotFoundError(f"dataset {ref.partition('@')[0]!r} has no versions")
    return Table(("source",), [(f"file:///{ref}/tea.md",)])


def full_sources(registry: CollectorRegistry) -> DashboardSources:
    replicas = (ReplicaView("chat-0", "ready", 123, "http://127.0.0.1:9", 0),)
    return DashboardSources(
        metrics=lambda: generate_latest(registry),
        deployments=lambda: [DeploymentView("chat", 2, replicas)],
        models=lambda: Table(("model",), [("smollm2@1",)]),
        chat_models=lambda: ["docs-bot", CHAT],
        playground_model="docs-bot",
        datasets=lambda: Table(("dataset", "version"), [("docs", Link("@1", "/ui/datasets/docs@1"))]),
        lineage=_lineage,
        drift=failing,
        costs=Ledger(),
        traces=Traces(),
        doctor=verdict,
    )


def client_for(sources: DashboardSources, keys: Sequence[str] = ()) -> TestClient:
    telemetry = Telemetry(service_name="test")
    deps = GatewayDeps(
        catalog=StaticCatalog(),
        dispatcher=ReplayDispatcher(),
        readiness=lambda: {CHAT: True},
        telemetry=telemetry,
        api_keys=keys,
        dashboard=sources,
    )
    return TestClient(create_app(deps), base_url="http://127.0.0.1")


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def client(registry: CollectorRegistry) -> Iterator[TestClient]:
    with client_for(full_sources(registry)) as c:
        yield c


@pytest.mark.parametrize("path", PAGES)
def test_every_page_renders_with_the_dashboards_headers(client: TestClient, path: str) -> None:
    page = client.get(path)
    assert page.status_code == 200, page.text
    assert page.headers["content-type"].startswith("text/html")
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert "<script" not in page.text.split("</head>")[1]  # no inline script: the CSP allows none


def test_the_overview_shows_layers_figures_breakdown_and_the_doctor(client: TestClient) -> None:
    page = client.get("/").text
    for layer in ("application", "models", "data", "orchestration", "compute"):
        assert f"<strong>{layer}</strong>" in page
    assert "chat 1/2" in page  # replicas ready of desired
    assert "width: 67.5%" in page  # orchestration's share of the breakdown (27 of 40 ms)
    assert "dispatch p95 27 ms" in page and "add a replica" in page


def test_a_failing_source_is_shown_on_its_own_panel(client: TestClient) -> None:
    page = client.get("/ui/drift")
    assert page.status_code == 200
    assert "could not be read: the catalog is locked" in page.text


def test_a_missing_source_says_not_available(registry: CollectorRegistry) -> None:
    with client_for(DashboardSources(metrics=lambda: generate_latest(registry))) as c:
        for path in PAGES:
            assert c.get(path).status_code == 200, path
        assert "Not available: the job queue is not available" in c.get("/ui/jobs").text
        assert "the doctor is not available here" in c.get("/").text
        assert "traces are not stored here" in c.get("/ui/traces").text


def test_the_waterfall_places_each_span_on_the_traces_timeline(client: TestClient) -> None:
    page = client.get(f"/ui/traces/{TRACE}").text
    assert page.count('class="span"') == 3
    assert "margin-left: 2.50%; width: 25.00%" in page  # retrieve: 1..11 ms of 0..40 ms
    assert "padding-left: 1.5em" in page  # a child is indented under its parent


def test_an_unknown_trace_is_a_page_that_looks_again(client: TestClient) -> None:
    page = client.get("/ui/traces/" + "F" * 32)
    assert page.status_code == 200
    assert 'http-equiv="refresh"' in page.text
    assert "f" * 32 in page.text  # the id as stored: lower case


def test_what_is_not_a_trace_id_is_a_404_saying_what_one_looks_like(client: TestClient) -> None:
    """A mistyped id must not wait forever on the page that looks again."""
    page = client.get("/ui/traces/cf17cc37")
    assert page.status_code == 404
    assert "32 hex digits" in page.text
    assert 'http-equiv="refresh"' not in page.text


def test_tables_link_and_costs_come_from_the_ledger(client: TestClient) -> None:
    assert 'href="/ui/datasets/docs@1"' in client.get("/ui/datasets").text
    assert "file:///docs@1/tea.md" in client.get("/ui/datasets/docs@1").text
    missing = client.get("/ui/datasets/nope@1")
    assert missing.status_code == 404
    assert "dataset &#39;nope&#39; has no versions" in missing.text and 'href="/ui/datasets"' in missing.text
    costs = client.get("/ui/costs").text
    assert "key-one" in costs and "model-one" in costs and "0.000123" in costs


def test_the_summary_gives_what_lamina_top_shows(client: TestClient, registry: CollectorRegistry) -> None:
    summary = client.get("/ui/api/summary").json()
    assert summary["deployments"] == [{"name": "chat", "desired": 2, "ready": 1}]
    assert summary["cost_usd_24h"] == pytest.approx(0.000123)
    assert summary["bottleneck"]["layer"] == "orchestration"
    assert summary["bottleneck"]["source"] == "doctor"


def test_keys_on_a_page_without_a_key_is_the_login_form(registry: CollectorRegistry) -> None:
    with client_for(full_sources(registry), keys=[ADMIN]) as c:
        page = c.get("/ui/models")
        assert page.status_code == 401
        assert 'id="login"' in page.text
        assert "smollm2@1" not in page.text
        assert c.get("/ui/api/summary").status_code == 401
        assert c.get("/ui/static/dashboard.css").status_code == 200  # the login page's own style


def test_keys_on_login_sets_a_strict_httponly_cookie_that_opens_the_pages(
    registry: CollectorRegistry,
) -> None:
    with client_for(full_sources(registry), keys=[ADMIN]) as c:
        wrong = c.post("/ui/login", json={"key": "nope"})
        assert wrong.status_code == 401
        assert "invalid API key" in wrong.json()["error"]["message"]
        ok = c.post("/ui/login", json={"key": ADMIN})
        assert ok.status_code == 204
        cookie = ok.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
        assert "smollm2@1" in c.get("/ui/models").text
        c.post("/ui/logout", json={})
        c.cookies.clear()  # the browser drops the cookie the logout expired
        assert c.get("/ui/models").status_code == 401


def test_a_bearer_key_opens_the_pages_too(registry: CollectorRegistry) -> None:
    with client_for(full_sources(registry), keys=[ADMIN]) as c:
        assert c.get("/ui/api/summary", headers={"authorization": f"Bearer {ADMIN}"}).status_code == 200


class _UserKey:
    """An authenticator that knows one admin key and one user key."""

    async def __call__(self, request: Request) -> Principal:
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        if token == ADMIN:
            return Principal(key_id="key_a", name="root", scope="admin")
        if token == "user-secret":
            return Principal(key_id="key_u", name="alice", scope="user")
        raise AuthenticationError("invalid API key; pass a key created with `lamina keys create`")


def test_the_json_summary_answers_the_api_errors_not_the_login_form(registry: CollectorRegistry) -> None:
    """``/ui/api/summary`` is read by programs (``lamina top``): 401 without a valid key, 403 with a
    key that is not an admin's, each as the admin API's JSON error that says what to do."""
    deps = GatewayDeps(
        catalog=StaticCatalog(),
        dispatcher=ReplayDispatcher(),
        readiness=lambda: {CHAT: True},
        telemetry=Telemetry(service_name="test"),
        authenticator=_UserKey(),
        dashboard=full_sources(registry),
    )
    with TestClient(create_app(deps), base_url="http://127.0.0.1") as c:
        missing = c.get("/ui/api/summary")
        assert missing.status_code == 401
        assert "invalid API key" in missing.json()["error"]["message"]
        user = c.get("/ui/api/summary", headers={"authorization": "Bearer user-secret"})
        assert user.status_code == 403
        assert "--scope admin" in user.json()["error"]["message"]
        assert c.get("/ui/models", headers={"authorization": "Bearer user-secret"}).status_code == 401
        admin = c.get("/ui/api/summary", headers={"authorization": f"Bearer {ADMIN}"})
        assert admin.status_code == 200 and "deployments" in admin.json()


def test_login_takes_json_only_so_no_other_site_can_post_it(registry: CollectorRegistry) -> None:
    with client_for(full_sources(registry), keys=[ADMIN]) as c:
        form = c.post("/ui/login", data={"key": ADMIN})
        assert form.status_code == 415
        cross = c.post("/ui/login", json={"key": ADMIN}, headers={"origin": "https://evil.example"})
        assert cross.status_code == 403
        assert "set-cookie" not in form.headers and "set-cookie" not in cross.headers


def test_the_playground_asks_the_gateway_and_shows_the_answer_and_its_trace(client: TestClient) -> None:
    page = client.post("/ui/chat", json={"model": CHAT, "message": "hello?"})
    assert page.status_code == 200
    assert "Hello world" in page.text  # what the replica answered
    assert 'class="trace-link" href="/ui/traces/' in page.text


def test_the_playground_shows_the_gateways_error(client: TestClient) -> None:
    page = client.post("/ui/chat", json={"model": "no-such-model", "message": "hello?"})
    assert "does not exist" in page.text
    bad = client.post("/ui/chat", json={"model": CHAT})
    assert bad.status_code == 400
    assert "message" in bad.json()["error"]["message"]


def _metrics(samples: Sequence[tuple[str, float]]) -> CollectorRegistry:
    registry = CollectorRegistry()
    requests = Counter("lamina_requests", "r", ("endpoint", "model", "status"), registry=registry)
    duration = Histogram(
        "lamina_request_duration_seconds", "d", ("endpoint", "model"), buckets=(0.1, 1.0), registry=registry
    )
    for status, seconds in samples:
        requests.labels("/v1/chat/completions", "chat", status).inc()
        duration.labels("/v1/chat/completions", "chat").observe(seconds)
    return registry


def test_figures_from_the_exposition_rate_errors_and_interpolated_quantiles() -> None:
    registry = _metrics([("200", 0.05)] * 8 + [("500", 0.5), ("429", 0.5)])
    sample = parse_sample(generate_latest(registry).decode(), at=10.0)
    assert (sample.requests, sample.errors, sample.refused) == (10, 1, 1)
    shown = figures(sample, parse_sample("", at=5.0))
    assert shown.requests_per_s == pytest.approx(2.0)
    assert shown.error_ratio == pytest.approx(0.1)
    assert shown.p50_ms == pytest.approx(62.5)  # rank 5 of 8 in (0, 0.1]
    assert shown.p95_ms == pytest.approx(775.0)  # rank 9.5: halfway through (0.1, 1.0]


def test_quantile_edges() -> None:
    assert quantile({}, 0.5) is None
    assert quantile({0.1: 0.0, float("inf"): 0.0}, 0.5) is None
    assert quantile({0.1: 0.0, float("inf"): 4.0}, 0.5) == 0.1  # beyond the last bound: that bound


def test_the_history_rates_against_an_older_sample() -> None:
    counts = iter([0, 4, 10])
    now = iter([0.0, 1.0, 11.0])

    def text() -> str:
        return generate_latest(_metrics([("200", 0.05)] * next(counts))).decode()

    history = FigureHistory(text, window_s=10.0, clock=lambda: next(now))
    assert history.sample().requests_per_s is None
    assert history.sample().requests_per_s == pytest.approx(4.0)
    assert history.sample().requests_per_s == pytest.approx(0.6)  # against the sample at 1.0 s: 6 in 10 s


def test_self_time_counts_each_millisecond_once() -> None:
    ms = 1_000_000
    rows = [
        ("root", None, "application", 0, 100 * ms),
        ("dispatch", "root", "orchestration", 10 * ms, 90 * ms),
        ("engine", "dispatch", "models", 20 * ms, 80 * ms),
    ]
    assert self_time_by_layer(rows) == {"models": 60.0, "application": 20.0, "orchestration": 20.0}


def test_cache_hit_rate_counts_lookups_only_and_the_queue_reads_waiting_requests() -> None:
    registry = CollectorRegistry()
    cache = Counter("lamina_cache_requests", "c", ("result",), registry=registry)
    cache.labels("hit").inc(3)
    cache.labels("miss").inc(1)
    cache.labels("bypass").inc(10)  # never looked up: not in the rate
    Gauge("lamina_num_requests_waiting", "w", ("model",), registry=registry).labels("chat").set(2)
    shown = figures(parse_sample(generate_latest(registry).decode(), at=1.0), None)
    assert shown.cache_hit_ratio == pytest.approx(0.75)
    assert shown.waiting == 2
    assert figures(parse_sample("", at=1.0), None).cache_hit_ratio is None


def test_the_vendored_files_are_served_and_nothing_else(client: TestClient) -> None:
    for name, media in STATIC.items():
        served = client.get(f"/ui/static/{name}")
        assert served.status_code == 200, name
        assert served.headers["content-type"].startswith(media)
        assert len(served.content) > 500
    assert client.get("/ui/static/../_router.py").status_code == 404
    assert client.get("/ui/static/vendor/SOURCES.md").status_code == 404


def test_the_cpu_busy_share_is_the_mean_of_the_nodes_last_periods() -> None:
    registry = CollectorRegistry()
    busy = Gauge("lamina_device_cpu_utilization_percent", "b", ("node",), registry=registry)
    busy.labels("a").set(90.0)
    busy.labels("b").set(40.0)
    memory = Gauge("lamina_device_memory_total_bytes", "m", ("node",), registry=registry)
    memory.labels("a").set(100.0)
    Gauge("lamina_device_memory_available_bytes", "m", ("node",), registry=registry).labels("a").set(75.0)
    shown = figures(parse_sample(generate_latest(registry).decode(), at=1.0), None)
    assert (shown.cpu_busy_ratio, shown.memory_used_ratio) == (0.65, 0.25)
    assert shown.to_json()["cpu_busy_ratio"] == 0.65
    assert figures(parse_sample("", at=1.0), None).cpu_busy_ratio is None  # before the first sample


def test_the_compute_layer_shows_the_cpu_busy_beside_the_memory(registry: CollectorRegistry) -> None:
    Gauge("lamina_device_cpu_utilization_percent", "b", ("node",), registry=registry).labels("a").set(88.0)
    Gauge("lamina_device_memory_total_bytes", "m", ("node",), registry=registry).labels("a").set(100.0)
    Gauge("lamina_device_memory_available_bytes", "m", ("node",), registry=registry).labels("a").set(60.0)
    with client_for(full_sources(registry)) as c:
        assert "CPU 88% busy, memory 40% used" in c.get("/").text
