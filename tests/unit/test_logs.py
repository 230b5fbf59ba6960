"""Log lines as JSON with their trace, the root logger's set-up, and the gateway's access log."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from opentelemetry import trace

from lamina.application import GatewayDeps, create_app
from lamina.config import load_config
from lamina.errors import ConfigError
from lamina.logs import LOG_FORMAT_ENV, JsonFormatter, configure_logging, start_line
from lamina.observability import Telemetry
from tests.support import CHAT, ReplayDispatcher, StaticCatalog, chat_scope, client_leaving, stalled_stream


def _record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("lamina.test", logging.WARNING, __file__, 1, message, args, None)
    record.__dict__.update(extra)
    return record


def test_a_json_line_has_the_time_level_logger_message_and_the_fields_given() -> None:
    line = json.loads(JsonFormatter().format(_record("café %s", "ouvert", fields={"status": 200}, kind="x")))
    assert line["time"].endswith("Z") and len(line["time"]) == len("2026-12-02T05:00:28.088Z")
    assert (line["level"], line["logger"], line["message"]) == ("WARNING", "lamina.test", "café ouvert")
    assert (line["status"], line["kind"]) == (200, "x")
    assert "trace_id" not in line and "fields" not in line


def test_a_line_written_inside_a_span_carries_its_trace_and_an_extra_trace_id_wins() -> None:
    telemetry = Telemetry(service_name="t")
    with telemetry.tracer.start_as_current_span("work") as span:
        ctx = span.get_span_context()
        line = json.loads(JsonFormatter().format(_record("inside")))
        given = json.loads(JsonFormatter().format(_record("given", trace_id="ab" * 16)))
    assert line["trace_id"] == format(ctx.trace_id, "032x") and line["span_id"] == format(ctx.span_id, "016x")
    assert given["trace_id"] == "ab" * 16 and "span_id" not in given
    assert not trace.get_current_span().get_span_context().is_valid
    telemetry.shutdown()


def test_an_exception_is_its_traceback_in_one_field() -> None:
    try:
        raise ValueError("the reason")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    line = json.loads(JsonFormatter().format(record))
    assert line["exception"].startswith("Traceback") and "ValueError: the reason" in line["exception"]


@pytest.fixture
def root_handlers() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("root_handlers")
def test_configuring_twice_leaves_one_handler_of_its_own_and_the_others(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    assert configure_logging("text") == "text"
    others = root.handlers[:-1]  # pytest's log capture (and any other's): its own is added last
    monkeypatch.setenv(LOG_FORMAT_ENV, "json")
    assert configure_logging() == "json"  # the environment's, as a replica worker reads it
    mine = [h for h in root.handlers if h not in others]
    assert len(mine) == 1 and isinstance(mine[0].formatter, JsonFormatter)  # the text one replaced
    logging.getLogger("lamina.test").info("to stderr")
    assert json.loads(capsys.readouterr().err.strip())["message"] == "to stderr"
    assert logging.getLogger("httpx").level == logging.WARNING
    with pytest.raises(ValueError, match="use text or json"):
        configure_logging("xml")


def test_the_config_names_the_formats_it_takes(tmp_path: Path) -> None:
    path = tmp_path / "lamina.yaml"
    path.write_text("observability: {log_format: xml}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"observability.log_format.*'text' or 'json'"):
        load_config(path)


def test_a_process_that_never_loads_opentelemetry_logs_json_without_it() -> None:
    """The replica workers configure their logs without loading the observability stack."""
    code = (
        "import logging, sys\n"
        "from lamina.logs import configure_logging\n"
        "configure_logging('json')\n"
        "logging.getLogger('w').info('up')\n"
        "print(any(m.startswith('opentelemetry') for m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "False"
    assert json.loads(done.stderr.strip())["message"] == "up"


def _app(access_log: bool, dispatcher: ReplayDispatcher | None = None) -> FastAPI:
    telemetry = Telemetry(service_name="t")
    replica = dispatcher or ReplayDispatcher()
    return create_app(
        GatewayDeps(StaticCatalog(), replica, lambda: {CHAT: True}, telemetry, access_log=access_log)
    )


def _client(access_log: bool) -> TestClient:
    return TestClient(_app(access_log), base_url="http://127.0.0.1")


def test_the_access_log_has_a_line_per_api_request_with_its_trace(caplog: pytest.LogCaptureFixture) -> None:
    body = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}]}
    with caplog.at_level(logging.INFO, logger="lamina.access"), _client(access_log=True) as client:
        answer = client.post("/v1/chat/completions", json=body)
        refused = client.post("/v1/chat/completions", content=b"{}", headers={"content-type": "text/plain"})
        missing = client.post("/v1/chat/completions", json={**body, "model": "nope"})
        client.get("/healthz")
        client.get("/metrics")
    lines = [r for r in caplog.records if r.name == "lamina.access"]
    assert [r.__dict__["fields"]["status"] for r in lines] == [200, 415, 404]  # no probe, no scrape
    fields = lines[0].__dict__["fields"]
    assert (fields["method"], fields["path"], fields["model"]) == ("POST", "/v1/chat/completions", CHAT)
    assert fields["bottleneck"] in ("application", "models", "orchestration") and fields["duration_ms"] > 0
    assert lines[0].__dict__["trace_id"] == answer.headers["x-lamina-trace-id"]
    assert lines[2].__dict__["trace_id"] == missing.headers["x-lamina-trace-id"]
    # refused at the door (the site guard, before any trace): the line still says what and when
    assert refused.status_code == 415 and lines[1].__dict__["trace_id"] is None
    assert (
        lines[0].getMessage().startswith("POST /v1/chat/completions 200 ")
        and f"model={CHAT} " in lines[0].getMessage()
        and lines[0].getMessage().endswith(f"trace={answer.headers['x-lamina-trace-id']}")
    )


def test_without_the_access_log_no_line_is_written(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lamina.access"), _client(access_log=False) as client:
        client.post(
            "/v1/chat/completions", json={"model": CHAT, "messages": [{"role": "user", "content": "x"}]}
        )
    assert not [r for r in caplog.records if r.name == "lamina.access"]


def test_a_process_logs_first_line_is_in_the_format_it_will_write(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LOG_FORMAT_ENV, raising=False)
    text = start_line("chat-0", ["python", "-m", "w"]).decode()
    assert text.startswith("--- lamina ") and text.endswith(": starting chat-0: python -m w\n")
    monkeypatch.setenv(LOG_FORMAT_ENV, "json")
    line = json.loads(start_line("chat-0", ["python", "-m", "w"]))
    assert (line["message"], line["argv"], line["logger"]) == (
        "starting chat-0",
        ["python", "-m", "w"],
        "lamina",
    )


@pytest.mark.anyio
async def test_a_stream_whose_client_left_is_logged_as_499(caplog: pytest.LogCaptureFixture) -> None:
    """The status of the access log is the one the metrics count (nginx's 499), not the 200 sent first."""
    stream = ReplayDispatcher(reply=lambda path, body: httpx.Response(200, content=stalled_stream(CHAT)))
    app = _app(True, stream)
    body = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    receive, send, _ = client_leaving(body)
    scope = chat_scope()
    with caplog.at_level(logging.INFO, logger="lamina.access"), anyio.fail_after(30):
        await app(scope, receive, send)
    (line,) = [r for r in caplog.records if r.name == "lamina.access"]
    assert line.__dict__["fields"]["status"] == 499 and " 499 " in line.getMessage()
