"""Ingestion against hostile and broken input: loops, FIFOs, files swapped after discovery, bad records,
PDFs that break the parser, large files, and runs that find nothing to read.

The embedder is ``HashingEmbedder``, a fake that implements the data layer's ``EmbeddingTokenizer`` for
real (whitespace tokens, a vector from a hash of the text): what is tested is the pipeline, not a model.
The stores are real (SQLite, LanceDB; pgvector where the backend matters).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypedDict

import psycopg
import pytest
from psycopg import sql

from lamina.data import DatasetCatalog, LanceDBStore, PgVectorStore, VectorStore
from lamina.data.ingest import (
    IngestOptions,
    IngestPipeline,
    IngestReport,
    LineageEmitter,
    LoadOptions,
    clean_text,
    content_sha256,
)
from lamina.errors import InvalidRequestError
from lamina.store import Store
from tests.support import HashingEmbedder, pdf_bytes

OPTIONS = IngestOptions(chunk_size=48, chunk_overlap=8, embed_batch_size=64)


def prose(seed: int, n: int = 150) -> str:
    return " ".join(f"w{(seed * 7919 + i * 104729) % 100003}" for i in range(n)) + "."


class Env:
    def __init__(self, tmp_path: Path, vectors: VectorStore) -> None:
        self.tmp = tmp_path
        self.root = tmp_path / "corpus"
        self.root.mkdir()
        self.meta = Store(f"sqlite:///{tmp_path / 'lamina.db'}")
        self.meta.migrate()
        self.catalog = DatasetCatalog(self.meta)
        self.vectors = vectors
        self.pipeline = IngestPipeline(
            self.catalog, vectors, HashingEmbedder(), LineageEmitter(tmp_path / "lineage.jsonl")
        )

    def write(self, name: str, text: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
        return path

    def ingest(
        self, *patterns: str, options: IngestOptions = OPTIONS, progress: object = None
    ) -> IngestReport:
        return self.pipeline.ingest(list(patterns) or [str(self.root)], "docs", options, progress)  # type: ignore[arg-type]

    def texts(self) -> list[str]:
        return [c.text for c in self.vectors.get("docs", self.catalog.members(self.catalog.resolve("docs")))]

    def reasons(self, report: IngestReport) -> dict[str, str]:
        return {s.path.rsplit("/", 1)[-1]: s.reason for s in report.skipped}


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path, LanceDBStore(tmp_path / "vectors"))
    yield e
    e.meta.close()


@pytest.fixture(params=["lancedb", "pgvector"])
def any_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    if request.param == "lancedb":
        e = Env(tmp_path, LanceDBStore(tmp_path / "vectors"))
        yield e
        e.meta.close()
        return
    pg_url = request.getfixturevalue("pg_url")
    schema = f"hardening_{uuid.uuid4().hex[:10]}"
    e = Env(tmp_path, PgVectorStore(pg_url, schema=schema))
    yield e
    e.vectors.close()
    e.meta.close()
    with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


class OnFile:
    """Progress that runs ``action`` just before the run reads file number ``n`` (after discovery)."""

    def __init__(self, n: int, action: Callable[[], None]) -> None:
        self.n, self.action = n, action

    def files(self, done: int, total: int) -> None:
        if done == self.n:
            self.action()

    def chunks(self, done: int, total: int) -> None:
        pass


DISCOVER = """
import json, sys
from lamina.data.ingest import discover
found = discover(sys.argv[1:])
refused = [[s.path, s.reason] for s in found.refused]
print(json.dumps({"files": [f.uri for f in found.files], "refused": refused}))
"""


class Discovery(TypedDict):
    files: list[str]
    refused: list[tuple[str, str]]


def discover_in_subprocess(*patterns: str, prefix: Sequence[str] = ()) -> Discovery:
    """Run discovery in a child with a deadline: a walk that loops is killed, not waited for."""
    done = subprocess.run(
        [*prefix, sys.executable, "-c", DISCOVER, *patterns],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    result: Discovery = json.loads(done.stdout)
    return result


def test_directory_links_to_a_parent_are_refused_and_never_walked(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    (root / "a" / "b").mkdir(parents=True)
    (root / "top.md").write_text("top")
    (root / "a" / "b" / "deep.md").write_text("deep")
    (root / "a" / "b" / "up").symlink_to("..")  # a loop, twice: a glob that followed them would not end
    (root / "a" / "b" / "root").symlink_to(root)
    for pattern in (str(root), f"{root}/**/*.md"):
        found = discover_in_subprocess(pattern)
        assert sorted(Path(str(u)).name for u in found["files"]) == ["deep.md", "top.md"]
        refused = {Path(p).name: r for p, r in found["refused"]}
        assert "symbolic link" in refused["up"] and "symbolic link" in refused["root"]


def test_a_directory_bind_mounted_inside_itself_is_walked_once(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    (root / "sub" / "loop").mkdir(parents=True)
    (root / "a.md").write_text("a")
    probe = (
        subprocess.run(["unshare", "--mount", "--map-root-user", "true"], capture_output=True, check=False)
        if shutil.which("unshare")
        else None
    )
    if probe is None or probe.returncode != 0:
        pytest.skip("cannot make a private mount namespace here (unshare --mount) to bind-mount in")
    mount = f'mount --bind {root} {root / "sub" / "loop"} && exec "$@"'
    found = discover_in_subprocess(
        str(root), prefix=["unshare", "--mount", "--map-root-user", "sh", "-c", mount, "sh"]
    )
    assert [Path(str(u)).name for u in found["files"]] == ["a.md"]
    assert any("bind mount" in r for _, r in found["refused"])


def test_a_fifo_named_like_a_text_file_is_skipped_without_blocking_the_run(env: Env) -> None:
    env.write("good.txt", prose(1))
    fifo = env.root / "x.md"
    os.mkfifo(fifo)
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["report"] = env.ingest()
        except BaseException as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=60)
    if worker.is_alive():  # it opened the FIFO to read: a writer lets it go, then the test fails
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(timeout=10)
        pytest.fail("the ingest blocked reading a FIFO")
    report = outcome["report"]
    assert isinstance(report, IngestReport) and report.state == "completed"
    assert "FIFO" in env.reasons(report)["x.md"]
    assert [Path(s.uri).name for s in env.catalog.sources(env.catalog.resolve("docs"))] == ["good.txt"]


@pytest.mark.parametrize("swap", ["symlink", "fifo", "another file"])
def test_a_file_swapped_after_discovery_is_refused_and_not_read(env: Env, swap: str) -> None:
    secret = env.tmp / "secret.txt"
    secret.write_text("topsecret " * 20)
    env.write("a.txt", prose(1))
    target = env.write("b.txt", prose(2))

    def replace() -> None:
        if swap != "another file":
            target.unlink()
        if swap == "symlink":
            target.symlink_to(secret)
        elif swap == "fifo":
            os.mkfifo(target)
        else:  # another file put in its place (made first, so it cannot reuse the listed one's inode)
            fresh = env.tmp / "fresh.txt"
            fresh.write_text("topsecret " * 20)
            fresh.replace(target)

    report = env.ingest(progress=OnFile(2, replace))  # files are read in order: a.txt, then b.txt
    assert "replaced" in env.reasons(report)["b.txt"] or "regular file" in env.reasons(report)["b.txt"]
    assert report.state == "completed" and not any("topsecret" in t for t in env.texts())
    assert [Path(s.uri).name for s in env.catalog.sources(env.catalog.resolve("docs"))] == ["a.txt"]


def test_bad_records_are_skipped_alone_and_the_run_goes_on(any_env: Env) -> None:
    env = any_env
    lines = [
        {"text": "first good record " + prose(1, 20), "lang": "en", "score": 1.5},
        {"text": "not a number " + prose(2, 20), "lang": "en", "score": float("nan")},
        {"text": "infinite " + prose(3, 20), "score": float("inf")},
        {"text": "nul in metadata " + prose(4, 20), "lang": "e\u0000n"},
        {"text": "reserved key " + prose(5, 20), "source_uri": "file:///forged"},
        {"text": "second good record " + prose(6, 20), "lang": "de"},
    ]
    env.write(
        "r.jsonl", "\n".join(json.dumps(line) for line in lines) + "\n"
    )  # NaN and Infinity as JSON allows
    env.write("t.csv", f'text,lang\n"csv good {prose(7, 20)}",en\n"csv nul {prose(8, 20)}",x\u0000y\n')
    options = IngestOptions(
        chunk_size=48, chunk_overlap=8, load=LoadOptions(meta_fields=("lang", "score", "source_uri"))
    )
    report = env.ingest(options=options)
    assert report.state == "completed"
    reasons = env.reasons(report)
    assert "finite" in reasons["r.jsonl#line=2"] and "finite" in reasons["r.jsonl#line=3"]
    assert "NUL" in reasons["r.jsonl#line=4"] and "NUL" in reasons["t.csv#row=2"]
    assert "reserved" in reasons["r.jsonl#line=5"]
    texts = env.texts()
    for kept in ("first good record", "second good record", "csv good"):
        assert any(t.startswith(kept) for t in texts)
    assert not any(t.startswith(("not a number", "infinite", "nul in", "reserved", "csv nul")) for t in texts)


def broken_pdf() -> bytes:
    """A PDF whose trailer makes pypdf raise AttributeError (not one of its own error types)."""
    page = "BT /F1 12 Tf 72 720 Td (Hello) Tj ET"
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R >>",
        f"<< /Length {len(page)} >>\nstream\n{page}\nendstream",
    ]
    return pdf_bytes(objects, trailer=" 0 R /Size {size} /Root 1 0 R >>")


def test_a_pdf_that_breaks_the_parser_is_skipped_and_the_others_ingest(env: Env) -> None:
    env.write("good.txt", prose(1))
    env.write("bad.pdf", broken_pdf())
    report = env.ingest()
    assert report.state == "completed" and "unreadable PDF" in env.reasons(report)["bad.pdf"]
    assert [Path(s.uri).name for s in env.catalog.sources(env.catalog.resolve("docs"))] == ["good.txt"]


def test_a_first_ingest_that_reads_nothing_fails_and_creates_no_version(env: Env) -> None:
    env.write("empty.txt", "")
    env.write("image.png", "not text")
    with pytest.raises(InvalidRequestError, match="nothing to ingest") as caught:
        env.ingest()
    assert (
        "empty.txt: empty file" in caught.value.message and "no version was created" in caught.value.message
    )
    assert env.catalog.log("docs") == []
    run = env.catalog.runs.of("docs")[0]
    assert run.state == "failed" and "nothing to ingest" in (run.error or "")
    with pytest.raises(InvalidRequestError, match="matches nothing"):
        env.ingest(f"{env.root}/**/*.nothing")
    events = [json.loads(line)["eventType"] for line in (env.tmp / "lineage.jsonl").read_text().splitlines()]
    assert events == ["START", "FAIL", "START", "FAIL"]


def test_a_later_ingest_that_reads_nothing_keeps_the_previous_version(env: Env) -> None:
    good = env.write("good.txt", prose(1))
    first = env.ingest()
    assert first.version is not None and first.version.seq == 1
    good.write_bytes(b"\x00\x01 binary now")
    with pytest.raises(InvalidRequestError, match="binary") as caught:
        env.ingest()
    assert "docs@1 stays the newest" in caught.value.message
    assert [v.seq for v in env.catalog.log("docs")] == [1]
    assert env.catalog.runs.of("docs")[0].state == "failed"
    assert env.texts() and all(t.startswith("w") for t in env.texts())


def test_a_large_file_is_read_in_segments_and_lineage_points_at_its_bytes(env: Env) -> None:
    words = ["alpha", "beta", "café", "ﬁne", "naïve", "x\u00a0y", "日本語", "Ωmega"]
    lines = [
        " ".join(words[(i * 7 + j) % len(words)] + str(i % 997) for j in range(12)) for i in range(40_000)
    ]
    text = "\ufeff" + "".join(line + ("\r\n\r\n" if i % 9 == 8 else "\r\n") for i, line in enumerate(lines))
    path = env.write("big.md", text)
    raw = path.read_bytes()
    assert len(raw) > 3_000_000  # three segments and more at the default segment size
    report = env.ingest(options=IngestOptions(chunk_size=200, chunk_overlap=32, embed_batch_size=512))
    assert report.state == "completed"
    version = env.catalog.resolve("docs")
    chunks = env.vectors.get("docs", env.catalog.members(version))
    assert len(chunks) > 1000
    for chunk in chunks:
        row = env.catalog.lineage(chunk.chunk_id)
        assert (row.byte_start, row.byte_end) == (chunk.byte_start, chunk.byte_end)
        assert clean_text(raw[row.byte_start : row.byte_end].decode("utf-8")).text == chunk.text
    # the segments join into the document the whole file cleans to: the recorded hash is the whole's
    (source,) = env.catalog.sources(version)
    assert source.documents[0][1] == content_sha256(clean_text(raw[3:].decode("utf-8"), base=3).text)


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("*.md", ["a.md"]),
        ("**/*.md", ["a.md", "c.md", "d.md"]),
        ("sub/*", ["c.md", "d.md", "e.txt"]),  # a matched directory is walked whole
        ("*/deeper/*.md", ["d.md"]),
        ("s?b/**", ["c.md", "d.md", "e.txt"]),
    ],
)
def test_globs_match_as_glob_does_below_their_literal_root(
    tmp_path: Path, pattern: str, expected: list[str]
) -> None:
    from lamina.data.ingest import discover

    root = tmp_path / "corpus"
    for name in ("a.md", "b.png", ".hidden.md", "sub/c.md", "sub/deeper/d.md", "sub/e.txt", ".git/x.md"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x")
    found = discover([f"{root}/{pattern}"])
    assert sorted(f.path.name for f in found.files) == expected
    assert found.refused == [] and Path(found.roots[0]).is_relative_to(root.resolve())
