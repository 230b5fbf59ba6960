"""``lamina data`` commands through Typer, and an ingest killed with SIGKILL in a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lamina.cli._data import data_app
from lamina.data import DatasetCatalog, LanceDBStore
from lamina.store import Store
from tests.support import prose

runner = CliRunner()


def cli(*args: str, state: Path) -> dict:  # type: ignore[type-arg]
    result = runner.invoke(data_app, [*args, "--state-dir", str(state), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_ingest_log_show_diff_tag_lineage_gc(tmp_path: Path) -> None:
    state, corpus = tmp_path / "state", tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"f{i}.md").write_text(prose(i, 150))
    (corpus / "rows.csv").write_text("body,lang\n" + prose(7, 30) + ",en\n")
    options = ("--text-field", "body", "--meta-field", "lang", "--chunk-size", "40", "--overlap", "5")
    first = cli("ingest", str(corpus), "--dataset", "docs", *options, state=state)
    assert first["state"] == "completed" and first["version"]["seq"] == 1
    (corpus / "f0.md").write_text(prose(10, 150))
    second = cli("ingest", str(corpus), "--dataset", "docs", *options, state=state)
    assert second["version"]["seq"] == 2 and second["counts"]["files_reused"] == 3

    assert [d["dataset"] for d in cli("list", state=state)] == ["docs"]
    assert [v["seq"] for v in cli("log", "docs", state=state)] == [2, 1]
    diff = cli("diff", "docs@1", "docs@2", state=state)
    assert [Path(u).name for u in diff["changed"]] == ["f0.md"] and diff["added"] == diff["removed"] == []
    assert runner.invoke(data_app, ["tag", "docs@1", "prod", "--state-dir", str(state)]).exit_code == 0
    shown = cli("show", "docs@prod", state=state)
    assert shown["seq"] == 1 and shown["tags"] == ["prod"]
    prefix = shown["version_id"][:8]
    assert cli("show", f"docs@{prefix}", state=state)["seq"] == 1

    chunk = cli("show", "docs", state=state)["chunk_ids"][0]
    row = cli("lineage", chunk, state=state)
    assert row["chunk_id"] == chunk and row["embedding_model"].startswith("minilm-l6-v2@")
    text = runner.invoke(data_app, ["lineage", chunk, "--state-dir", str(state)]).stdout
    assert "pipeline version" in text and "model sha256" in text

    assert cli("gc", "docs", "--keep", "1", state=state)["versions"] == []  # v1 is tagged
    missing = runner.invoke(data_app, ["show", "docs@9", "--state-dir", str(state)])
    assert missing.exit_code == 1 and "data log docs" in missing.output


@pytest.mark.timeout(240)
def test_sigkill_mid_ingest_leaves_previous_version_and_next_ingest_completes(tmp_path: Path) -> None:
    state, corpus = tmp_path / "state", tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "first.txt").write_text(prose(1, 150))
    config = tmp_path / "lamina.yaml"
    config.write_text("data:\n  embed_batch_size: 8\n  chunk_size: 32\n  chunk_overlap: 4\n")
    base = ["ingest", str(corpus), "--dataset", "docs", "--config", str(config)]
    cli(*base, state=state)
    lance = LanceDBStore(state / "vectors")
    before = lance.count("docs")
    for i in range(16):
        (corpus / f"more{i:02d}.txt").write_text(prose(i + 2, 200))
    command = [
        sys.executable,
        "-c",
        "from lamina.cli._data import main; main()",
        *base,
        "--state-dir",
        str(state),
    ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while lance.count("docs") <= before and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # polling a real process, not waiting on a policy
    assert proc.poll() is None, "the ingest finished before it could be killed; give it more files"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    meta = Store(f"sqlite:///{state / 'lamina.db'}")
    catalog = DatasetCatalog(meta)
    assert [v.seq for v in catalog.log("docs")] == [1]
    assert catalog.runs.of("docs")[0].state == "running"
    ids = catalog.members(catalog.resolve("docs"))
    hits = lance.search("docs", query_text=prose(1, 150).split()[0], mode="keyword", k=5, chunk_ids=ids)
    assert hits and all(h.chunk.chunk_id in ids for h in hits)

    after = cli(*base, state=state)
    assert after["state"] == "completed" and after["version"]["seq"] == 2
    assert after["counts"]["abandoned_runs"] == 1 and after["counts"]["chunks_reused"] > 0
    assert catalog.runs.of("docs")[1].state == "abandoned"
    meta.close()


def test_the_progress_bar_shows_files_chunks_and_throughput(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from rich.console import Console

    from lamina.cli import _data

    out = io.StringIO()
    monkeypatch.setattr(_data, "err_console", Console(file=out, force_terminal=True, width=120))
    with _data._Bar(enabled=True) as bar:
        bar.files(2, 2)
        bar.chunks(0, 10)
        time.sleep(0.05)
        bar.chunks(5, 10)
    text = out.getvalue()
    assert "files" in text and "2/2" in text
    assert "chunks embedded" in text and "5/10" in text and "chunks/s" in text
    quiet = io.StringIO()
    monkeypatch.setattr(_data, "err_console", Console(file=quiet, force_terminal=True, width=120))
    with _data._Bar(enabled=False) as bar:  # --json, or stderr not a terminal
        bar.files(1, 1)
    assert quiet.getvalue() == ""


def test_the_cli_ingests_into_and_searches_pgvector_when_configured(tmp_path: Path, pg_database: str) -> None:
    from lamina.config import load_config
    from lamina.data import PgVectorStore
    from lamina.stack import open_data_stack

    state, corpus = tmp_path / "state", tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"f{i}.md").write_text(prose(i, 150))
    config = tmp_path / "lamina.yaml"
    config.write_text(f"data: {{vector_backend: pgvector, pgvector_url: '{pg_database}'}}\n")
    where = ["--config", str(config), "--state-dir", str(state), "--json"]
    ingest = runner.invoke(data_app, ["ingest", str(corpus), "--dataset", "docs", *where])
    assert ingest.exit_code == 0, ingest.output
    assert json.loads(ingest.stdout)["version"]["seq"] == 1
    found = runner.invoke(data_app, ["search", "docs", prose(1, 150)[:80], "-k", "1", *where])
    assert found.exit_code == 0, found.output
    assert json.loads(found.stdout)["data"][0]["source_uri"].endswith("/f1.md")
    stack = open_data_stack(load_config(config), state)  # the chunks are in PostgreSQL
    try:
        assert isinstance(stack.vectors, PgVectorStore) and stack.vectors.count("docs") > 0
        assert stack.vectors.graphs is not None
        assert stack.vectors.graphs.root.parent == state / "graphs"
    finally:
        stack.close()
