"""Dataset versions, tags and sources in the metadata store: the catalog every ``lamina data`` command reads.

A version is immutable and named by content: its id is the sha256 of its canonical manifest (the digest
of its sorted chunk ids, its sources and their hashes, the pipeline version and the embedding model), so
two ingests that produce the same data produce the same id. People use the per-dataset sequence number
(``docs@3``), a movable tag (``docs@prod``), an id prefix (``docs@9f2c1a``) or the name alone (the newest).

Members (version id, chunk id) and sources are keyed by the version id, not the sequence number: content
that comes back (a revert) is a new sequence number sharing the rows it already has.

Committing a version is one transaction: a reader sees all of it or nothing. Ingest runs are recorded
here too, so an interrupted one stays visible (``abandoned``) instead of vanishing.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from sqlalchemy import Connection, delete, func, insert, select

from lamina.clock import Clock, utcnow
from lamina.data.vectors import check_dataset_name
from lamina.data.versions._records import (
    ChunkLineage,
    Collected,
    DatasetVersion,
    NewVersion,
    PinnedVersion,
    SourceRecord,
    VersionDiff,
)
from lamina.data.versions._runs import IngestRuns
from lamina.data.versions._version_rows import LINEAGE_COLUMNS, batches, write_rows
from lamina.errors import ConflictError, InvalidRequestError, NotFoundError
from lamina.store import (
    HeldLock,
    Store,
    chunk_lineage,
    dataset_members,
    dataset_sources,
    dataset_tags,
    dataset_versions,
    datasets,
)

_TAG = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,99}")
_HEX = re.compile(r"[0-9a-f]{6,64}")
#: How often a commit that lost the race for its sequence number is tried. Each loss means another commit
#: of the dataset succeeded, so this many writers committing one dataset at once all get through.
_COMMIT_ATTEMPTS = 16


#: Pinned versions (their chunk-id sets) kept in memory by each catalog.
_PINS_KEPT = 8


class DatasetCatalog:
    """Datasets, their versions, tags, sources, chunk lineage and ingest runs in a metadata ``store``."""

    def __init__(self, store: Store, *, clock: Clock = utcnow) -> None:
        self._store = store
        self._clock = clock
        #: the ingest runs of every dataset
        self.runs = IngestRuns(store, clock=clock)
        # versions are immutable, so a pinned version's members can be kept; retrieval then passes the
        # same frozenset every time and the vector store resolves it once (see VectorStore.search)
        self._pins: OrderedDict[str, PinnedVersion] = OrderedDict()
        self._pins_lock = threading.Lock()
        #: the dataset locks this catalog holds, by dataset, with the thread holding each
        self._held: dict[str, tuple[int, HeldLock]] = {}

    @contextmanager
    def lock(self, name: str) -> Iterator[HeldLock]:
        """Hold dataset ``name``'s lock (ingest and gc take it), or raise ConflictError at once.

        The lock lives with the metadata store: a file lock on SQLite, an advisory lock on PostgreSQL, so
        processes on several hosts sharing one store exclude each other too. While it is held, ``commit``
        and ``collect`` of that dataset first check that it has not been lost (see ``HeldLock``).
        """
        busy = f"another ingest or gc of dataset {name!r} is running; wait for it to finish"
        with self._store.lock(f"dataset:{check_dataset_name(name)}", busy=busy) as held:
            self._held[name] = (threading.get_ident(), held)
            try:
                yield held
            finally:
                del self._held[name]

    def _check_lock(self, name: str) -> None:
        """Raise ConflictError if this thread took ``name``'s lock and has lost it since."""
        entry = self._held.get(name)
        if entry is not None and entry[0] == threading.get_ident():
            entry[1].check()

    # -- reading ------------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        with self._store.begin() as conn:
            return list(conn.scalars(select(datasets.c.name).order_by(datasets.c.name)))

    def log(self, name: str) -> list[DatasetVersion]:
        """Every kept version of ``name``, newest first (empty when it has none)."""
        with self._store.begin() as conn:
            return self._versions(conn, check_dataset_name(name))

    def _versions(self, conn: Connection, name: str) -> list[DatasetVersion]:
        tags: dict[int, list[str]] = {}
        for row in conn.execute(select(dataset_tags).where(dataset_tags.c.dataset == name)):
            tags.setdefault(row.seq, []).append(row.tag)
        rows = conn.execute(
            select(dataset_versions)
            .where(dataset_versions.c.dataset == name)
            .order_by(dataset_versions.c.seq.desc())
        )
        return [
            DatasetVersion(
                dataset=row.dataset,
                seq=row.seq,
                version_id=row.version_id,
                manifest=row.manifest,
                pipeline_version=row.pipeline_version,
                run_id=row.run_id,
                created_at=row.created_at,
                tags=tuple(sorted(tags.get(row.seq, []))),
            )
            for row in rows
        ]

    def resolve(self, ref: str) -> DatasetVersion:
        """``NAME`` (newest), ``NAME@SEQ``, ``NAME@TAG`` or ``NAME@ID-PREFIX`` (6+ hex digits)."""
        name, _, which = ref.strip().partition("@")
        versions = self.log(name)
        if not versions:
            known = ", ".join(self.names()) or "none yet"
            raise NotFoundError(
                f"dataset {name!r} has no versions (datasets: {known}); "
                f"create one with `lamina data ingest PATH --dataset {name}`",
                param="dataset",
            )
        found = _pick(versions, which)
        if found is None:
            seqs = ", ".join(str(v.seq) for v in versions[:10])
            raise NotFoundError(
                f"{name} has no version, tag or id prefix {which!r}; versions: {seqs} "
                f"(`lamina data log {name}` lists them)",
                param="dataset",
            )
        return found

    def pin(self, ref: str) -> PinnedVersion:
        """``ref`` resolved to its version and chunk ids: what retrieval searches (its VersionResolver)."""
        version = self.resolve(ref)
        with self._pins_lock:
            pinned = self._pins.get(version.version_id)
            if pinned is not None:
                self._pins.move_to_end(version.version_id)
                return pinned
        pinned = PinnedVersion(
            version.dataset,
            version.version_id,
            version.seq,
            frozenset(self.members(version)),
            embedding_model=version.embedding_model,
        )
        with self._pins_lock:
            self._pins[version.version_id] = pinned
            while len(self._pins) > _PINS_KEPT:
                self._pins.popitem(last=False)
        return pinned

    def members(self, version: DatasetVersion) -> list[str]:
        with self._store.begin() as conn:
            return list(
                conn.scalars(
                    select(dataset_members.c.chunk_id)
                    .where(dataset_members.c.version_id == version.version_id)
                    .order_by(dataset_members.c.chunk_id)
                )
            )

    def sources(self, version: DatasetVersion) -> list[SourceRecord]:
        with self._store.begin() as conn:
            rows = conn.execute(
                select(dataset_sources)
                .where(dataset_sources.c.version_id == version.version_id)
                .order_by(dataset_sources.c.uri)
            )
            return [
                SourceRecord(
                    uri=r.uri,
                    sha256=r.sha256,
                    size_bytes=r.size_bytes,
                    mtime=r.mtime,
                    documents=[tuple(d) for d in r.documents],
                    n_chunks=r.n_chunks,
                )
                for r in rows
            ]

    def chunks_by_file(self, version: DatasetVersion) -> dict[str, list[str]]:
        """The version's chunk ids grouped by source file: what an unchanged file reuses."""
        query = (
            select(chunk_lineage.c.source_file, chunk_lineage.c.chunk_id)
            .join(dataset_members, dataset_members.c.chunk_id == chunk_lineage.c.chunk_id)
            .where(dataset_members.c.version_id == version.version_id)
        )
        grouped: dict[str, list[str]] = {}
        with self._store.begin() as conn:
            for row in conn.execute(query):
                grouped.setdefault(row.source_file, []).append(row.chunk_id)
        return grouped

    def diff(self, old: DatasetVersion, new: DatasetVersion) -> VersionDiff:
        before = {s.uri: s.sha256 for s in self.sources(old)}
        after = {s.uri: s.sha256 for s in self.sources(new)}
        return VersionDiff(
            old=old,
            new=new,
            added=sorted(after.keys() - before.keys()),
            removed=sorted(before.keys() - after.keys()),
            changed=sorted(u for u in after.keys() & before.keys() if after[u] != before[u]),
        )

    def lineage(self, chunk_id: str) -> ChunkLineage:
        with self._store.begin() as conn:
            row = conn.execute(select(chunk_lineage).where(chunk_lineage.c.chunk_id == chunk_id)).first()
            if row is None:
                raise NotFoundError(
                    f"no chunk {chunk_id!r}; chunk ids come from search results or `lamina data show --json`",
                    param="chunk_id",
                )
            seqs = conn.scalars(
                select(dataset_versions.c.seq)
                .join(dataset_members, dataset_members.c.version_id == dataset_versions.c.version_id)
                .where(dataset_members.c.chunk_id == chunk_id, dataset_versions.c.dataset == row.dataset)
                .order_by(dataset_versions.c.seq)
            )
            fields = {name: getattr(row, name) for name in LINEAGE_COLUMNS}
            return ChunkLineage(
                **fields | {"created_at": row.created_at}, versions=tuple(dict.fromkeys(seqs))
            )

    # -- writing ------------------------------------------------------------------------------------------

    def tag(self, ref: str, tag: str) -> DatasetVersion:
        """Point ``NAME@TAG`` at the version ``ref`` names, moving the tag if it pointed elsewhere."""
        if not _TAG.fullmatch(tag):
            raise InvalidRequestError(
                f"invalid tag {tag!r}: start with a letter; then letters, digits, '.', '_' or '-'",
                param="tag",
            )
        version = self.resolve(ref)
        with self._store.begin() as conn:
            where = (dataset_tags.c.dataset == version.dataset) & (dataset_tags.c.tag == tag)
            conn.execute(delete(dataset_tags).where(where))
            conn.execute(insert(dataset_tags).values(dataset=version.dataset, tag=tag, seq=version.seq))
        return self.resolve(f"{version.dataset}@{version.seq}")

    def commit(
        self, new: NewVersion, *, counts: Mapping[str, int], skipped: Sequence[tuple[str, str]]
    ) -> DatasetVersion:
        """Commit ``new`` and finish its run, in one transaction.

        The next sequence number is read in that transaction; the key (dataset, seq) is unique, so a commit
        racing another for the same number (two hosts that bypassed the dataset lock) fails whole and is
        retried with the next one.
        """
        self._check_lock(new.dataset)
        for attempt in range(1, _COMMIT_ATTEMPTS + 1):
            try:
                seq = self._commit_once(new, counts, skipped)
            except ConflictError as exc:
                if attempt == _COMMIT_ATTEMPTS:
                    raise ConflictError(
                        f"could not commit a version of {new.dataset!r}: {attempt} attempts lost the race "
                        "for a sequence number to other writers; run the ingest again"
                    ) from exc
                continue
            return self.resolve(f"{new.dataset}@{seq}")
        raise AssertionError("unreachable")  # pragma: no cover

    def _commit_once(
        self, new: NewVersion, counts: Mapping[str, int], skipped: Sequence[tuple[str, str]]
    ) -> int:
        with self._store.begin() as conn:
            latest = select(func.max(dataset_versions.c.seq)).where(dataset_versions.c.dataset == new.dataset)
            seq = 1 + (conn.scalar(latest) or 0)
            conn.execute(
                insert(dataset_versions).values(
                    dataset=new.dataset,
                    seq=seq,
                    version_id=new.version_id,
                    manifest=new.manifest,
                    pipeline_version=new.pipeline_version,
                    run_id=new.run_id,
                    created_at=self._clock(),
                )
            )
            write_rows(conn, new)
            self.runs.finish(
                new.run_id, "completed", counts=counts, skipped=skipped, version_seq=seq, conn=conn
            )
        return seq

    def live_chunk_ids(self, name: str) -> set[str]:
        """Every chunk id some version of dataset ``name`` holds."""
        with self._store.begin() as conn:
            query = (
                select(dataset_members.c.chunk_id)
                .join(dataset_versions, dataset_versions.c.version_id == dataset_members.c.version_id)
                .where(dataset_versions.c.dataset == check_dataset_name(name))
            )
            return set(conn.scalars(query))

    def collect(self, name: str, keep: int) -> Collected:
        """Forget all but the newest ``keep`` versions (tagged ones always stay) and chunks only they held.

        Returns the chunk ids whose vectors the caller must delete. Chunk ids also in a kept version, or
        in no version but written by an ingest (its lineage is forgotten with it), are handled here.
        """
        if keep < 0:
            raise InvalidRequestError(f"--keep must be >= 0, got {keep}", param="keep")
        self._check_lock(name)
        with self._store.begin() as conn:
            versions = self._versions(conn, check_dataset_name(name))
            doomed = [v for i, v in enumerate(versions) if i >= keep and not v.tags]
            kept_ids = {v.version_id for v in versions if v not in doomed}
            for v in doomed:
                where = (dataset_versions.c.dataset == name) & (dataset_versions.c.seq == v.seq)
                conn.execute(delete(dataset_versions).where(where))
            for version_id in {v.version_id for v in doomed} - kept_ids:
                conn.execute(delete(dataset_members).where(dataset_members.c.version_id == version_id))
                conn.execute(delete(dataset_sources).where(dataset_sources.c.version_id == version_id))
            kept = select(dataset_members.c.chunk_id).where(dataset_members.c.version_id.in_(kept_ids))
            live = set(conn.scalars(kept)) if kept_ids else set()
            known = set(conn.scalars(select(chunk_lineage.c.chunk_id).where(chunk_lineage.c.dataset == name)))
            dead = sorted(known - live)
            for batch in batches(dead):
                conn.execute(delete(chunk_lineage).where(chunk_lineage.c.chunk_id.in_(batch)))
        return Collected(dataset=name, versions=sorted(v.seq for v in doomed), chunk_ids=dead)


def _pick(versions: list[DatasetVersion], which: str) -> DatasetVersion | None:
    """The version ``which`` names among ``versions`` (newest first)."""
    if not which:
        return versions[0]
    if which.isdigit():
        found = next((v for v in versions if v.seq == int(which)), None)
        if found is not None:
            return found
    tagged = next((v for v in versions if which in v.tags), None)
    if tagged is not None:
        return tagged
    if _HEX.fullmatch(which.lower()):
        matches = {v.version_id: v for v in reversed(versions) if v.version_id.startswith(which.lower())}
        if len(matches) > 1:
            raise InvalidRequestError(f"version id prefix {which!r} is ambiguous; give more digits")
        if matches:
            return next(iter(matches.values()))
    return None
