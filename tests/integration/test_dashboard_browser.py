"""The dashboard in a real browser (headless Chromium through Playwright) on a real `lamina up`.

One stack for the module: a fake-engine chat deployment, an admin key, and the demo on, so the stack
ingests Lamina's own documentation as `lamina-docs` in the background (the small dataset the playground's
RAG alias answers from). The browser signs in through the login form, opens every page without a console
error, asks the playground a question, sees the answer and its citations, and opens the answer's trace.
`lamina top --once` reads the same stack.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright
from typer.testing import CliRunner, Result

from lamina.cli import app
from tests.support import RunningStack, start_stack, stop_stack

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)"),
]

ADMIN = "dashboard-admin-key"
CONFIG = f"""
register_bundled: false
server: {{api_keys: ["{ADMIN}"]}}
deployments:
  - {{name: chat, engine: fake, fake: {{mode: echo}}}}
orchestration: {{health_interval_s: 0.2}}
observability: {{}}
demo: {{enabled: true}}
"""
PAGES = [
    "/",
    "/ui/traces",
    "/ui/deployments",
    "/ui/jobs",
    "/ui/datasets",
    "/ui/datasets/lamina-docs@1",
    "/ui/models",
    "/ui/costs",
    "/ui/drift",
    "/ui/playground",
]
AUTH = {"authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    running = start_stack(tmp_path_factory.mktemp("dashboard"), CONFIG, timeout_s=120)
    try:
        deadline = time.monotonic() + 90
        while "lamina-docs" not in httpx.get(f"{running.base_url}/admin/v1/datasets", headers=AUTH).text:
            assert time.monotonic() < deadline, f"the demo dataset never arrived:\n{running.log()}"
            time.sleep(0.5)
        yield running
    finally:
        assert stop_stack(running) == []


@pytest.fixture(scope="module")
def browser(stack: RunningStack) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser, stack: RunningStack) -> Iterator[tuple[Page, list[str]]]:
    """A signed-in page, and the console errors and uncaught exceptions it collects from then on."""
    context = browser.new_context(base_url=stack.base_url)
    page = context.new_page()
    page.goto("/")
    page.fill("#key", ADMIN)
    page.click("button[type=submit]")
    page.wait_for_selector("text=Layers")
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page, errors
    context.close()


def test_the_login_cookie_is_httponly_and_strict(page: tuple[Page, list[str]]) -> None:
    cookies = page[0].context.cookies()
    assert [(c["name"], c["httpOnly"], c["sameSite"]) for c in cookies] == [
        ("lamina_dashboard", True, "Strict")
    ]


def test_the_login_page_refuses_a_wrong_key_and_shows_why(browser: Browser, stack: RunningStack) -> None:
    context = browser.new_context(base_url=stack.base_url)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    response = tab.goto("/ui/models")
    assert response is not None and response.status == 401
    assert "minilm" not in tab.content()
    tab.fill("#key", "not-the-key")
    tab.click("button[type=submit]")
    tab.wait_for_selector("#login-error:has-text('invalid API key')")
    assert context.cookies() == []
    # the browser reports each 401 answer (the page itself, the refused key); nothing else went wrong
    assert errors and all("401" in e for e in errors), errors
    context.close()


def test_every_page_loads_without_console_errors(page: tuple[Page, list[str]]) -> None:
    tab, errors = page
    for path in PAGES:
        response = tab.goto(path)
        assert response is not None and response.status == 200, path
        tab.wait_for_load_state("networkidle")
        assert "Not available: could not be read" not in tab.content(), path
    tab.goto("/")
    tab.wait_for_selector("#chart .uplot")  # the chart library ran
    assert "the doctor is not available" not in tab.content()
    tab.wait_for_timeout(2500)  # one htmx refresh of the live figures
    assert "replicas ready" in tab.inner_text("#live")
    assert errors == []


def test_the_playground_answers_with_citations_and_its_trace_opens(
    page: tuple[Page, list[str]],
) -> None:
    tab, errors = page
    tab.goto("/ui/playground")
    assert tab.input_value("#pg-model") == "lamina-docs"  # the demo's RAG alias by default
    tab.click("#pg-send")
    tab.wait_for_selector(".citations li", timeout=60_000)
    assert "curl" in tab.inner_text(".reply")  # the fake engine echoes the grounded question
    sources = tab.locator(".citations .source").all_inner_texts()
    assert any(s.endswith("demo_docs/quickstart.md") for s in sources), sources
    tab.click("a.trace-link")
    tab.wait_for_selector(".waterfall tr.span", timeout=30_000)  # spans are written in batches
    names = tab.locator(".waterfall tr.span td.name").all_inner_texts()
    assert "POST /v1/chat/completions" in names
    assert {"retrieve", "dispatch"} <= set(names), names
    assert errors == []


def test_the_demo_alias_answers_with_citations_over_http(stack: RunningStack) -> None:
    body = {"model": "lamina-docs", "messages": [{"role": "user", "content": "How do I ask with curl?"}]}
    reply = httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert reply.status_code == 200, reply.text
    assert any(c["source_uri"].endswith(".md") for c in reply.json()["citations"])


def top(*args: str, key: str | None = None) -> Result:
    """`lamina top` in this process (the CLI's start-up would cost more than the command)."""
    env = {"LAMINA_API_KEY": key} if key is not None else {"LAMINA_API_KEY": ""}
    return CliRunner().invoke(app, ["top", "--once", *args], env=env)


def test_lamina_top_once_prints_the_key_figures(stack: RunningStack) -> None:
    done = top("--url", stack.base_url, "--interval", "0.5", key=ADMIN)
    assert done.exit_code == 0, done.output
    figures = (
        "requests/s",
        "latency p50 / p95",
        "errors",
        "queue",
        "cost (24 h)",
        "cache hit rate",
        "CPU / memory",
    )
    for figure in figures:
        assert figure in done.stdout
    assert "chat 1/1" in done.stdout  # replicas ready of desired, from the summary (the key was used)
    assert "bottleneck layer" in done.stdout


def test_lamina_top_without_a_key_says_what_it_needs(stack: RunningStack) -> None:
    done = top("--url", stack.base_url, "--interval", "0.2")
    assert done.exit_code == 0, done.output
    assert "need an admin key" in done.stdout
    assert "chat ready" in done.stdout  # replicas from /readyz
    wrong = top("--url", stack.base_url, "--interval", "0.2", key="not-a-key")
    assert "need an admin key" in wrong.stdout and "invalid API key" in wrong.stdout, wrong.stdout


def test_lamina_top_names_a_gateway_that_is_not_there() -> None:
    done = top("--url", "http://127.0.0.1:9")
    assert done.exit_code == 1
    assert "is `lamina up` running there?" in done.output
