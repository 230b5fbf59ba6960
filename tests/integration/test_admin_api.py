"""The admin API's ingestion over real HTTP (uvicorn on 127.0.0.1): the real pipeline, the real MiniLM
embedder and LanceDB in a temporary state directory.

The embedder is wrapped (the real one inside): a gate holds a run inside its first embedding batch, so a
second request meets a running ingest without any timing, and a switch makes it crash mid-run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from lamina.application import ThreadedIngestService, admin_router
from lamina.application._auth import StaticKeys, authenticated
from lamina.application._errors import install_error_handlers
from lamina.application._tracing_middleware import TelemetryMiddleware
from lamina.config import DataConfig, LaminaConfig
from lamina.data import IngestPipeline, Retriever
from lamina.errors import EngineCrashedError
from lamina.models import EngineEmbedder, ThreadQueryEmbedder
from lamina.observability import Telemetry
from lamina.stack import DataStack, open_data_stack
from tests.support import prose

DATA = DataConfig(chunk_size=48, chunk_overlap=8, embed_batch_size=4)


class Wrapped:
    """The real embedder behind a gate (``hold``) and a crash switch (``crash``)."""

    def __init__(self, inner: EngineEmbedder) -> None:
        self.inner = inner
        self.hold: threading.Event | None = None
        self.entered = threading.Event()
        self.crash = False

    dim = property(lambda self: self.inner.dim)
    name = property(lambda self: self.inner.name)
    sha256 = property(lambda self: self.inner.sha256)
    max_tokens = property(lambda self: self.inner.max_tokens)

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.entered.set()
        if self.hold is not None:
            assert self.hold.wait(30), "the test never released the gate"
        if self.crash:
            raise EngineCrashedError("the embedding engine crashed (test)")
        return self.inner.embed(texts)

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def token_offsets(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        return self.inner.token_offsets(texts)


@dataclass
class Admin:
    client: httpx.Client
    data: DataStack
    embedder: Wrapped
    root: Path

    def ingest(self, dataset: str = "docs", **body: Any) -> httpx.Response:
        return self.client.post(f"/admin/v1/datasets/{dataset}/ingest", json={"paths": ["*.md"]} | body)

    def wait(self, run_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status: dict[str, Any] = self.client.get(f"/admin/v1/ingest-runs/{run_id}").json()
            if status["state"] != "running":
                return status
            time.sleep(0.05)  # polling a worker thread, not waiting out a policy
        raise AssertionError(f"run {run_id} still running: {status}")


def _serve(app: FastAPI) -> Iterator[str]:
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def make_admin(tmp_path: Path, real_embedder: EngineEmbedder) -> Iterator[Any]:
    root = tmp_path / "docs"
    root.mkdir()
    for i in range(3):
        (root / f"note{i}.md").write_text(f"# Note {i}\n\n{prose(i, 80)}\n")
    (root / "empty.md").write_text("")
    data = open_data_stack(LaminaConfig(data=DATA), tmp_path / "state")
    embedder = Wrapped(real_embedder)
    cleanups: list[Any] = []

    def pipeline() -> IngestPipeline:
        return IngestPipeline(data.catalog, data.vectors, embedder, data.lineage)

    def make(roots: Sequence[Path] = (root,), keys: Sequence[str] = ()) -> Admin:
        service = ThreadedIngestService(pipeline, data.catalog, DATA, roots)
        telemetry = Telemetry(service_name="admin-test")
        app = FastAPI()
        app.add_middleware(TelemetryMiddleware, telemetry=telemetry)
        install_error_handlers(app)
        app.include_router(admin_router(service, authenticated(StaticKeys(keys), admin=True)))
        serving = _serve(app)
        client = httpx.Client(base_url=next(serving), timeout=30)
        cleanups.append((client, service, serving, telemetry))
        return Admin(client, data, embedder, root)

    yield make
    if embedder.hold is not None:
        embedder.hold.set()
    for client, service, serving, telemetry in cleanups:
        client.close()
        service.close()
        next(serving, None)
        telemetry.shutdown()
    data.close()


def test_without_ingest_roots_the_endpoint_is_forbidden(make_admin: Any) -> None:
    admin = make_admin(roots=())
    r = admin.ingest()
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "permission_denied"
    assert "data.ingest_roots" in r.json()["error"]["message"]


def test_paths_outside_the_roots_are_refused_before_anything_runs(make_admin: Any, tmp_path: Path) -> None:
    admin = make_admin()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.md").write_text("secret")
    (admin.root / "link").symlink_to(outside)
    for path in [
        "/etc/passwd",
        "../x",
        f"{admin.root}/../outside/secret.md",
        "sub/../../outside/*.md",
        "link/*.md",
        "link/secret.md",
    ]:
        r = admin.ingest(paths=["*.md", path])
        assert r.status_code == 400, path
        error = r.json()["error"]
        assert error["param"] == "paths" and repr(path) in error["message"]
    assert admin.data.catalog.names() == []  # nothing started


def test_bad_bodies_and_names_are_400(make_admin: Any) -> None:
    admin = make_admin()
    assert admin.ingest(paths=[]).json()["error"]["param"] == "paths"
    assert admin.ingest(shard=3).json()["error"]["code"] == "invalid_request"
    assert admin.ingest(chunk_size=16, chunk_overlap=16).json()["error"]["param"] == "chunk_overlap"
    assert admin.ingest(dataset="bad name!").json()["error"]["param"] == "dataset"
    assert admin.client.get("/admin/v1/ingest-runs/nope").status_code == 404


def test_ingest_commits_a_listed_searchable_version_then_unchanged(make_admin: Any) -> None:
    admin = make_admin()
    r = admin.ingest()
    assert r.status_code == 202
    started = r.json()
    assert started["state"] == "running" and started["dataset"] == "docs"
    assert r.headers["location"] == started["status_url"] == f"/admin/v1/ingest-runs/{started['run_id']}"
    done = admin.wait(started["run_id"])
    assert done["state"] == "completed", done
    assert done["version"]["seq"] == 1 and len(done["version"]["version_id"]) == 64
    assert done["counts"]["chunks"] > 0 and done["counts"]["chunks_embedded"] > 0
    assert any(s["path"].endswith("empty.md") for s in done["skipped"])

    listed = admin.client.get("/admin/v1/datasets").json()
    assert [(d["dataset"], d["versions"], d["latest"]["version_id"]) for d in listed] == [
        ("docs", 1, done["version"]["version_id"])
    ]
    retriever = Retriever(admin.data.catalog, admin.data.vectors, ThreadQueryEmbedder(lambda: admin.embedder))
    hits = anyio.run(lambda: retriever.retrieve("docs@1", prose(1, 80)[:60], k=3, mode="vector"))
    assert hits.citations[0].source_uri == (admin.root / "note1.md").as_uri()

    again = admin.wait(admin.ingest(paths=[str(admin.root)]).json()["run_id"])
    assert again["state"] == "unchanged" and again["version"]["seq"] == 1
    # a pipeline run id (as `lamina data ingest --json` prints it) is found in the catalog
    stored = admin.client.get(f"/admin/v1/ingest-runs/{again['ingest_run_id']}").json()
    assert stored["state"] == "unchanged" and stored["version"]["seq"] == 1


def test_a_second_ingest_of_a_running_dataset_is_a_conflict(make_admin: Any) -> None:
    admin = make_admin()
    admin.embedder.hold = threading.Event()
    first = admin.ingest().json()["run_id"]
    assert admin.embedder.entered.wait(30)
    # the event loop answers while the ingest is held in its worker thread
    assert admin.client.get(f"/admin/v1/ingest-runs/{first}").json()["state"] == "running"
    r = admin.ingest()
    assert r.status_code == 409
    assert r.json()["error"]["details"]["run_id"] == first and first in r.json()["error"]["message"]
    admin.embedder.hold.set()
    assert admin.wait(first)["state"] == "completed"
    assert admin.ingest().status_code == 202  # free again


def test_a_crashing_embedder_fails_the_run_and_keeps_the_previous_version(make_admin: Any) -> None:
    admin = make_admin()
    first = admin.wait(admin.ingest().json()["run_id"])
    (admin.root / "note0.md").write_text(f"# Changed\n\n{prose(9, 80)}\n")
    admin.embedder.crash = True
    failed = admin.wait(admin.ingest().json()["run_id"])
    assert failed["state"] == "failed" and "crashed" in failed["error"] and failed["version"] is None
    newest = admin.data.catalog.resolve("docs")
    assert (newest.seq, newest.version_id) == (1, first["version"]["version_id"])
    assert admin.data.catalog.runs.of("docs")[0].state == "failed"


def test_admin_routes_need_a_key_when_keys_are_set(make_admin: Any) -> None:
    admin = make_admin(keys=["sekret"])
    assert admin.client.get("/admin/v1/datasets").status_code == 401
    assert admin.ingest().status_code == 401
    ok = admin.client.get("/admin/v1/datasets", headers={"Authorization": "Bearer sekret"})
    assert ok.status_code == 200 and ok.json() == []
