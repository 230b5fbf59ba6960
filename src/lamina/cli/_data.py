"""``lamina data``: ingest files into versioned datasets; list, log, show, diff, tag, gc; chunk lineage.

Every command works whether or not a stack is running: the embedder runs in this process unless
``--gateway URL`` sends texts to a running stack.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import Annotated

import anyio
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from lamina.cli._common import (
    ConfigOption,
    JsonOption,
    StateDirOption,
    err_console,
    fail,
    load,
    out_console,
    print_json,
    print_table,
)
from lamina.cli._gateway_client import http_url
from lamina.data import (
    DatasetVersion,
    IngestOptions,
    IngestReport,
    LoadOptions,
    collect_garbage,
    lineage_chain,
)
from lamina.errors import LaminaError
from lamina.stack import DataStack, open_data_stack

data_app = typer.Typer(
    help="Datasets: ingest files into immutable versions, inspect, diff, tag, collect, trace chunks.",
    no_args_is_help=True,
)


class SearchModeOption(StrEnum):
    vector = "vector"
    keyword = "keyword"
    hybrid = "hybrid"


RefArgument = Annotated[str, typer.Argument(help="NAME (newest), NAME@SEQ, NAME@TAG or NAME@ID-PREFIX.")]


@contextmanager
def _data(config: ConfigOption, state_dir: StateDirOption, gateway: str | None = None) -> Iterator[DataStack]:
    """The data layer of the state directory; any Lamina error becomes one line on stderr and exit 1."""
    cfg, root = load(config, state_dir)
    try:
        stack = open_data_stack(cfg, root, gateway_url=gateway)
    except LaminaError as exc:
        fail(exc)
    try:
        yield stack
    except LaminaError as exc:
        fail(exc)
    except KeyboardInterrupt:
        fail("interrupted; the previous version is intact and the next ingest starts cleanly", exit_code=130)
    finally:
        stack.close()


class _Bar:
    """Files and chunks on stderr with throughput; nothing when not a terminal or with --json."""

    def __init__(self, enabled: bool) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[rate]}"),
            console=err_console,
            disable=not enabled,
            transient=False,
        )
        self._files: TaskID | None = None
        self._chunks: TaskID | None = None

    def __enter__(self) -> _Bar:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def files(self, done: int, total: int) -> None:
        if self._files is None:
            self._files = self._progress.add_task("files", total=total, rate="")
        self._progress.update(self._files, completed=done)

    def chunks(self, done: int, total: int) -> None:
        if self._chunks is None:
            self._chunks = self._progress.add_task("chunks embedded", total=total, rate="")
        task = self._progress.tasks[self._chunks]
        rate = f"{done / task.elapsed:.1f} chunks/s" if task.elapsed else ""
        self._progress.update(self._chunks, completed=done, rate=rate)


@data_app.command("ingest")
def ingest(
    paths: Annotated[list[str], typer.Argument(help="Files, directories or globs (quote globs).")],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="The dataset to add a version to.")],
    text_field: Annotated[str, typer.Option(help="JSONL/CSV: the field holding the text.")] = "text",
    meta_field: Annotated[
        list[str] | None, typer.Option(help="JSONL/CSV: a field to keep as chunk metadata (repeatable).")
    ] = None,
    chunk_size: Annotated[
        int | None, typer.Option(help="Tokens per chunk (default: data.chunk_size).")
    ] = None,
    overlap: Annotated[
        int | None, typer.Option(help="Tokens shared by neighbours (data.chunk_overlap).")
    ] = None,
    gateway: Annotated[
        str | None,
        typer.Option(help="Embed through a running stack, e.g. http://127.0.0.1:8000/v1.", callback=http_url),
    ] = None,
    json_output: JsonOption = False,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Ingest files into a new version of DATASET (nothing new if the content is unchanged)."""
    with _data(config, state_dir, gateway) as stack:
        options = IngestOptions.from_config(
            stack.config.data,
            chunk_size=chunk_size,
            chunk_overlap=overlap,
            load=LoadOptions(text_field=text_field, meta_fields=tuple(meta_field or ())),
        )
        pipeline = stack.pipeline()
        with _Bar(enabled=not json_output and err_console.is_terminal) as bar:
            report = pipeline.ingest(paths, dataset, options, progress=bar)
    if json_output:
        print_json(report.to_json())
        return
    _print_report(report)


def _print_report(report: IngestReport) -> None:
    version = report.version
    if report.state == "unchanged" and version is not None:
        out_console.print(f"unchanged: {version.ref} ({version.version_id[:12]}) already holds this content")
    elif version is not None:
        c = report.counts
        out_console.print(
            f"committed [bold]{version.ref}[/] ({version.version_id[:12]}): {c.get('chunks', 0)} chunks, "
            f"{c.get('chunks_embedded', 0)} embedded, {c.get('chunks_reused', 0)} reused, "
            f"{c.get('files_loaded', 0)} files read, {c.get('files_reused', 0)} unchanged",
            highlight=False,
        )
    for skipped in report.skipped:
        err_console.print(f"  skipped {skipped.path}: {skipped.reason}", highlight=False, soft_wrap=True)
    for warning in report.warnings:
        err_console.print(f"  warning: {warning}", highlight=False, soft_wrap=True)


@data_app.command("list")
def list_(
    json_output: JsonOption = False, state_dir: StateDirOption = None, config: ConfigOption = None
) -> None:
    """Every dataset with its newest version."""
    with _data(config, state_dir) as stack:
        rows = [(name, stack.catalog.log(name)) for name in stack.catalog.names()]
    if json_output:
        print_json(
            [{"dataset": n, "versions": len(v), "latest": v[0].to_json() if v else None} for n, v in rows]
        )
        return
    if not rows:
        out_console.print("no datasets; create one with `lamina data ingest PATH --dataset NAME`")
        return
    table = Table("dataset", "versions", "latest", "id", "chunks", "tags", "created")
    for name, versions in rows:
        if not versions:
            table.add_row(name, "0", "-", "-", "-", "-", "-")
            continue
        v = versions[0]
        tags = ", ".join(f"{t}->{x.seq}" for x in versions for t in x.tags)
        table.add_row(
            name,
            str(len(versions)),
            str(v.seq),
            v.version_id[:12],
            str(v.manifest["chunks"]),
            tags or "-",
            f"{v.created_at:%Y-%m-%d %H:%M}",
        )
    print_table(table)


@data_app.command("log")
def log(
    name: Annotated[str, typer.Argument(help="The dataset.")],
    json_output: JsonOption = False,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """The versions of a dataset, newest first."""
    with _data(config, state_dir) as stack:
        versions = stack.catalog.log(name)
        if not versions:
            stack.catalog.resolve(name)  # raises the not-found error with its hint
    if json_output:
        print_json([v.to_json() for v in versions])
        return
    table = Table("version", "id", "tags", "chunks", "sources", "model", "created")
    for v in versions:
        m = v.manifest
        table.add_row(
            v.ref,
            v.version_id[:12],
            ", ".join(v.tags) or "-",
            str(m["chunks"]),
            str(m["sources"]),
            v.embedding_model,
            f"{v.created_at:%Y-%m-%d %H:%M:%S}",
        )
    print_table(table)


@data_app.command("show")
def show(
    ref: RefArgument,
    json_output: JsonOption = False,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """One version: its manifest and its source files."""
    with _data(config, state_dir) as stack:
        version = stack.catalog.resolve(ref)
        sources = stack.catalog.sources(version)
        chunk_ids = stack.catalog.members(version) if json_output else []
    if json_output:
        print_json(version.to_json() | {"sources": [s.to_json() for s in sources], "chunk_ids": chunk_ids})
        return
    _print_version(version)
    table = Table(Column("source", overflow="fold"), "sha256", "size", "documents", "chunks")
    for s in sources:
        table.add_row(s.uri, s.sha256[:12], str(s.size_bytes), str(len(s.documents)), str(s.n_chunks))
    print_table(table)


def _print_version(v: DatasetVersion) -> None:
    m = v.manifest
    out_console.print(
        f"[bold]{v.ref}[/]  id {v.version_id}\n  tags: {', '.join(v.tags) or '-'}\n"
        f"  created: {v.created_at.isoformat(timespec='seconds')}  run: {v.run_id}\n"
        f"  chunks: {m['chunks']}  sources: {m['sources']}\n"
        f"  pipeline: {v.pipeline_version} {m['pipeline_config']}\n"
        f"  embedding model: {v.embedding_model} (sha256 {m['embedding_model']['sha256'][:12]})",
        highlight=False,
    )


@data_app.command("diff")
def diff(
    old: Annotated[str, typer.Argument(help="NAME@A, the older version.")],
    new: Annotated[str, typer.Argument(help="NAME@B, the newer version.")],
    json_output: JsonOption = False,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Source documents added, removed and changed between two versions."""
    with _data(config, state_dir) as stack:
        result = stack.catalog.diff(stack.catalog.resolve(old), stack.catalog.resolve(new))
    if json_output:
        print_json(result.to_json())
        return
    out_console.print(f"{result.old.ref} -> {result.new.ref}", highlight=False)
    for mark, uris in (("+", result.added), ("-", result.removed), ("~", result.changed)):
        for uri in uris:
            out_console.print(f"  {mark} {uri}", highlight=False, soft_wrap=True)
    if not (result.added or result.removed or result.changed):
        out_console.print("  no source changed")


@data_app.command("tag")
def tag(
    ref: Annotated[str, typer.Argument(help="NAME@V: the version to tag.")],
    tag_name: Annotated[str, typer.Argument(metavar="TAG", help="e.g. prod; moved if it exists.")],
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Point NAME@TAG at a version (tagged versions are never garbage-collected)."""
    with _data(config, state_dir) as stack:
        version = stack.catalog.tag(ref, tag_name)
    out_console.print(f"{version.dataset}@{tag_name} -> {version.ref}", highlight=False)


@data_app.command("gc")
def gc(
    name: Annotated[str, typer.Argument(help="The dataset.")],
    keep: Annotated[int, typer.Option("--keep", help="Newest versions to keep (tagged ones always stay).")],
    json_output: JsonOption = False,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Remove old versions, and the vectors of chunks no kept version holds."""
    with _data(config, state_dir) as stack:
        collected = collect_garbage(stack.catalog, stack.vectors, name, keep)
    if json_output:
        print_json(
            {
                "dataset": name,
                "versions": collected.versions,
                "chunks": len(collected.chunk_ids),
                "orphans": collected.orphans,
            }
        )
        return
    removed = ", ".join(f"{name}@{s}" for s in collected.versions) or "nothing"
    left = f" ({collected.orphans} left by interrupted ingests)" if collected.orphans else ""
    out_console.print(f"removed {removed}; {len(collected.chunk_ids)} chunks deleted{left}", highlight=False)


@data_app.command("lineage")
def lineage(
    chunk_id: Annotated[str, typer.Argument(help="A chunk id (from search results or `data show --json`).")],
    json_output: JsonOption = False,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Where a chunk came from: source, byte span, hashes, pipeline version, embedding model."""
    with _data(config, state_dir) as stack:
        row = stack.catalog.lineage(chunk_id)
    if json_output:
        print_json(row.to_json())
        return
    table = Table("link", Column("value", overflow="fold"), show_header=False)
    for label, value in lineage_chain(row):
        table.add_row(label, value)
    print_table(table)


@data_app.command("search")
def search(
    ref: RefArgument,
    query: Annotated[str, typer.Argument(help="What to search for.")],
    k: Annotated[int, typer.Option("-k", min=1, max=200, help="How many chunks.")] = 10,
    mode: Annotated[SearchModeOption, typer.Option(help="vector, keyword (BM25) or hybrid (RRF).")] = (
        SearchModeOption.hybrid
    ),
    json_output: JsonOption = False,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Search one dataset version; every hit names its chunk id, source and byte span."""
    with _data(config, state_dir) as stack:
        retriever = stack.retriever()  # loads the model only for vector and hybrid search
        result = anyio.run(lambda: retriever.retrieve(ref, query, k=k, mode=mode.value))
    if json_output:
        print_json(result.to_json())
        return
    out_console.print(
        f"{result.version.ref} ({result.version.version_id[:12]}), {mode.value} search", highlight=False
    )
    table = Table("#", "score", Column("source", overflow="fold"), "bytes", Column("text", overflow="fold"))
    for c in result.citations:
        snippet = c.text if len(c.text) <= 160 else c.text[:157] + "..."
        table.add_row(str(c.index), f"{c.score:.3f}", c.source_uri, f"{c.byte_start}-{c.byte_end}", snippet)
    print_table(table)


def main() -> None:  # pragma: no cover - for `python -m lamina.cli._data`
    data_app(prog_name="lamina data", args=sys.argv[1:])
