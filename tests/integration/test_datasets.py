"""The dataset catalog on SQLite and PostgreSQL: version refs, tags, diff, gc, lineage, runs."""

from __future__ import annotations

import itertools
from datetime import timedelta

import pytest

from lamina.data.versions._catalog import DatasetCatalog
from lamina.data.versions._lineage import manifest_id
from lamina.data.versions._records import NewVersion, SourceRecord
from lamina.errors import InvalidRequestError, NotFoundError
from lamina.store import Store
from tests.support import T0, lineage_row


def clock() -> object:
    ticks = itertools.count()
    return lambda: T0 + timedelta(seconds=next(ticks))


def commit(catalog: DatasetCatalog, chunks: dict[str, list[str]], sources: dict[str, str]) -> str:
    """Commit a version whose files (uri -> sha) hold ``chunks`` (uri -> chunk ids); returns the run id."""
    run = f"run-{len(catalog.runs.of('docs')) if catalog.names() else 0}"
    catalog.runs.start("docs", run, pid=1)
    ids = sorted(c for cs in chunks.values() for c in cs)
    manifest = {
        "dataset": "docs",
        "chunks": len(ids),
        "ids": ids,
        "sources": sorted(sources.items()),
        "embedding_model": {"ref": "m@1", "sha256": "f" * 64},
    }
    lineage = [lineage_row(c, uri, sources[uri], run) for uri, cs in chunks.items() for c in cs]
    records = [
        SourceRecord(u, s, 10, T0, [(u, s, "0" * 16)], len(chunks.get(u, []))) for u, s in sources.items()
    ]
    new = NewVersion("docs", manifest_id(manifest), manifest, "p1", run, ids, records, lineage)
    catalog.commit(new, counts={"chunks": len(ids)}, skipped=[])
    return run


def test_refs_tags_diff_lineage_and_gc(store: Store) -> None:
    catalog = DatasetCatalog(store, clock=clock())  # type: ignore[arg-type]
    commit(catalog, {"a": ["c1", "c2"], "b": ["c3"]}, {"a": "sa", "b": "sb"})
    commit(catalog, {"a": ["c1", "c2"], "b": ["c4"], "n": ["c5"]}, {"a": "sa", "b": "sb2", "n": "sn"})
    commit(catalog, {"a": ["c1", "c2"]}, {"a": "sa"})
    v1, v2, v3 = (catalog.resolve(f"docs@{i}") for i in (1, 2, 3))
    assert catalog.resolve("docs") == v3 and catalog.resolve(f"docs@{v2.version_id[:8]}") == v2
    assert catalog.tag("docs@1", "prod").tags == ("prod",)
    assert catalog.resolve("docs@prod").seq == 1
    catalog.tag("docs@2", "prod")  # moves
    assert catalog.resolve("docs@prod").seq == 2 and catalog.resolve("docs@1").tags == ()
    with pytest.raises(NotFoundError, match="data log docs"):
        catalog.resolve("docs@nope")
    with pytest.raises(NotFoundError, match="data ingest"):
        catalog.resolve("other")
    with pytest.raises(InvalidRequestError):
        catalog.tag("docs@1", "9lives")

    d = catalog.diff(v1, v2)
    assert (d.added, d.removed, d.changed) == (["n"], [], ["b"])
    assert catalog.members(v2) == ["c1", "c2", "c4", "c5"]
    pinned = catalog.pin("docs@prod")
    assert (pinned.ref, pinned.version_id) == ("docs@2", v2.version_id)
    assert sorted(pinned.chunk_ids) == ["c1", "c2", "c4", "c5"]
    # a version is immutable: pinning it again hands out the same id set, which the stores resolve once
    assert catalog.pin(f"docs@{v2.version_id[:8]}").chunk_ids is pinned.chunk_ids
    catalog.tag("docs@3", "prod")
    assert catalog.pin("docs@prod").version_id == v3.version_id  # a moved tag is followed, not cached
    catalog.tag("docs@2", "prod")
    assert catalog.chunks_by_file(v2) == {"a": ["c1", "c2"], "b": ["c4"], "n": ["c5"]}
    assert catalog.lineage("c1").versions == (1, 2, 3)

    collected = catalog.collect("docs", keep=1)  # keeps v3 and the tagged v2
    assert collected.versions == [1] and collected.chunk_ids == ["c3"]
    assert [v.seq for v in catalog.log("docs")] == [3, 2]
    with pytest.raises(NotFoundError):
        catalog.lineage("c3")
    assert catalog.members(catalog.resolve("docs@2")) == ["c1", "c2", "c4", "c5"]


def test_same_content_again_is_a_new_sequence_sharing_rows(store: Store) -> None:
    catalog = DatasetCatalog(store)
    commit(catalog, {"a": ["c1"]}, {"a": "s1"})
    commit(catalog, {"a": ["c2"]}, {"a": "s2"})
    commit(catalog, {"a": ["c1"]}, {"a": "s1"})  # a revert
    v1, v3 = catalog.resolve("docs@1"), catalog.resolve("docs@3")
    assert v1.version_id == v3.version_id and catalog.members(v3) == ["c1"]
    assert catalog.resolve(f"docs@{v1.version_id[:10]}").seq == 3  # the newest holder of that id


def test_a_run_left_running_is_abandoned_by_the_next(store: Store) -> None:
    catalog = DatasetCatalog(store)
    catalog.runs.start("docs", "r1", pid=123)
    assert catalog.runs.start("docs", "r2", pid=124) == 1
    runs = {r.run_id: r for r in catalog.runs.of("docs")}
    assert runs["r1"].state == "abandoned" and runs["r2"].state == "running"
    catalog.runs.finish("r2", "failed", counts={"chunks": 3}, skipped=[("x", "why")], error="boom")
    r2 = next(r for r in catalog.runs.of("docs") if r.run_id == "r2")
    assert (r2.state, r2.counts, r2.skipped, r2.error) == ("failed", {"chunks": 3}, [("x", "why")], "boom")
