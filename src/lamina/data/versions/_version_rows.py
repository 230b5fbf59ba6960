"""Writing a version's rows in a commit's transaction: members, sources and chunk lineage, with multi-row
INSERTs (``insert_rows``: cheaper than executemany, and an ingest in a busy gateway does not wait for the
GIL once per row)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Connection, select

from lamina.data.versions._records import ChunkLineage, NewVersion
from lamina.store import chunk_lineage, dataset_members, dataset_sources, insert_rows

#: Ids per IN list.
BATCH = 5000
LINEAGE_COLUMNS = [column.name for column in chunk_lineage.columns]


def batches(items: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), BATCH):
        yield items[start : start + BATCH]


def write_rows(conn: Connection, new: NewVersion) -> None:
    """Write ``new``'s members and sources (unless an equal version wrote them) and its chunks' lineage."""
    has_rows = conn.scalar(
        select(dataset_members.c.chunk_id).where(dataset_members.c.version_id == new.version_id).limit(1)
    )
    if has_rows is None:  # an equal version committed before already wrote them
        members = [{"version_id": new.version_id, "chunk_id": c} for c in sorted(set(new.chunk_ids))]
        insert_rows(conn, dataset_members, members)
        sources = [
            {
                "version_id": new.version_id,
                "uri": s.uri,
                "sha256": s.sha256,
                "size_bytes": s.size_bytes,
                "mtime": s.mtime,
                "documents": [list(d) for d in s.documents],
                "n_chunks": s.n_chunks,
            }
            for s in new.sources
        ]
        insert_rows(conn, dataset_sources, sources)
    wanted = {row.chunk_id: row for row in new.lineage}
    present: set[str] = set()
    for batch in batches(list(wanted)):
        present |= set(
            conn.scalars(select(chunk_lineage.c.chunk_id).where(chunk_lineage.c.chunk_id.in_(batch)))
        )
    rows = [_lineage_row(row) for cid, row in wanted.items() if cid not in present]
    insert_rows(conn, chunk_lineage, rows)


def _lineage_row(row: ChunkLineage) -> dict[str, Any]:
    return {name: getattr(row, name) for name in LINEAGE_COLUMNS}
