"""OpenLineage run events: valid RunEvents in the JSONL log, and POSTed to a real local HTTP endpoint."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from lamina.data.ingest._openlineage import LineageEmitter


class _Recorder(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, dict[str, Any]]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, json.loads(body)))
        self.send_response(201)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def endpoint() -> Iterator[tuple[str, list[tuple[str, dict[str, Any]]]]]:
    received: list[tuple[str, dict[str, Any]]] = []
    handler = type("Handler", (_Recorder,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    server.shutdown()
    server.server_close()


def check_run_event(event: dict[str, Any]) -> None:
    """The required fields of an OpenLineage 2-0-2 RunEvent, with their types."""
    assert event["eventType"] in {"START", "RUNNING", "COMPLETE", "ABORT", "FAIL", "OTHER"}
    assert datetime.fromisoformat(event["eventTime"]).tzinfo is not None
    uuid.UUID(event["run"]["runId"])
    assert event["job"]["namespace"] and event["job"]["name"]
    assert event["producer"].startswith("https://")
    assert event["schemaURL"].startswith("https://openlineage.io/spec/") and "RunEvent" in event["schemaURL"]
    for ds in event["inputs"] + event["outputs"]:
        assert ds["namespace"] and ds["name"]
        for facet in ds.get("facets", {}).values():
            assert facet["_producer"] and facet["_schemaURL"].startswith("https://openlineage.io/")


def test_events_go_to_the_jsonl_log_and_the_http_endpoint(
    tmp_path: Path, endpoint: tuple[str, list[tuple[str, dict[str, Any]]]]
) -> None:
    url, received = endpoint
    log = tmp_path / "lineage" / "openlineage.jsonl"
    emitter = LineageEmitter(log, url=url, namespace="team")
    run = str(uuid.uuid4())
    emitter.event("START", run, "docs", inputs=["/data/docs"])
    emitter.event("COMPLETE", run, "docs", inputs=["/data/docs"], version_id="ab" * 32)
    failed = str(uuid.uuid4())
    emitter.event("FAIL", failed, "docs", inputs=["/data/docs"], error="EngineCrashedError: boom")
    emitter.close()

    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["eventType"] for e in logged] == ["START", "COMPLETE", "FAIL"]
    assert [body for _, body in received] == logged
    assert {path for path, _ in received} == {"/api/v1/lineage"}
    for event in logged:
        check_run_event(event)
    complete = logged[1]
    assert complete["job"] == {"namespace": "team", "name": "ingest.docs", "facets": {}}
    assert complete["inputs"][0]["name"] == "/data/docs"
    assert complete["outputs"][0]["facets"]["version"]["datasetVersion"] == "ab" * 32
    assert logged[2]["run"]["facets"]["errorMessage"]["message"] == "EngineCrashedError: boom"


def test_an_unreachable_endpoint_never_fails_the_run(tmp_path: Path) -> None:
    log = tmp_path / "ol.jsonl"
    emitter = LineageEmitter(log, url="http://127.0.0.1:9")  # discard port: nothing listens
    event = emitter.event("START", str(uuid.uuid4()), "docs", inputs=[])
    emitter.close()
    check_run_event(event)
    assert json.loads(log.read_text()) == event
