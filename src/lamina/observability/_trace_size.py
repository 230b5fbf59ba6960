"""How many bytes the stored traces occupy in the database, as the database itself counts them.

This is what retention's byte bound (``retention_max_bytes``) limits: the pages of the trace tables
(:data:`TRACE_TABLES`) and of their indexes, not an estimate from row sizes (which missed the indexes,
the ``traces`` rows and the slack in half-full pages, so the file grew past the bound).

- SQLite: the pages each of those b-trees owns, from the ``dbstat`` virtual table. Pages that retention
  frees go to the file's freelist and the next spans reuse them, so the file stops growing once the bound
  is reached (no VACUUM: it would shrink the file only for the next writes to grow it again). Where SQLite
  was built without ``dbstat``, every page in use in the file (an upper bound: other tables count too).
- PostgreSQL: ``pg_total_relation_size`` of each table (heap, indexes, TOAST), dead rows included until
  VACUUM makes their space reusable; it never shrinks without ``VACUUM FULL``.

:func:`used_bytes` is the cheap probe (no page walk): the whole SQLite file's pages in use, or the same
PostgreSQL sizes, so a retention loop can notice growth between two measurements.
"""

from __future__ import annotations

from sqlalchemy import Connection, text
from sqlalchemy.exc import OperationalError

#: the tables that hold traces (their indexes count with them)
TRACE_TABLES = ("spans", "traces", "replay_requests")

_PG_SIZE = text(
    "SELECT coalesce(sum(pg_total_relation_size(to_regclass(t))), 0) FROM unnest(CAST(:tables AS text[])) t"
)
_PG_DEAD = text(
    "SELECT coalesce(sum(n_dead_tup), 0) FROM pg_stat_user_tables"
    " WHERE relid IN (SELECT to_regclass(t) FROM unnest(CAST(:tables AS text[])) t)"
)


def stored_bytes(conn: Connection) -> int:
    """The bytes the trace tables and their indexes occupy in the database ``conn`` is connected to."""
    if conn.dialect.name == "postgresql":
        return int(conn.execute(_PG_SIZE, {"tables": list(TRACE_TABLES)}).scalar_one())
    names = conn.execute(
        text("SELECT name FROM sqlite_schema WHERE tbl_name IN (:a, :b, :c) AND rootpage > 0"),
        dict(zip("abc", TRACE_TABLES, strict=True)),
    ).scalars()
    total = 0
    try:
        for name in list(names):  # one b-tree at a time: dbstat walks only the pages asked for
            size = conn.execute(text("SELECT pgsize FROM dbstat('main', 1) WHERE name = :n"), {"n": name})
            total += int(size.scalar() or 0)
    except OperationalError:  # SQLite built without SQLITE_ENABLE_DBSTAT_VTAB
        return used_bytes(conn)
    return total


def used_bytes(conn: Connection) -> int:
    """Cheap: the whole SQLite file's pages in use (not on its freelist), or :func:`stored_bytes` on
    PostgreSQL (sizes the server keeps, no scan)."""
    if conn.dialect.name == "postgresql":
        return stored_bytes(conn)
    pages = conn.execute(text("PRAGMA page_count")).scalar_one()
    free = conn.execute(text("PRAGMA freelist_count")).scalar_one()
    size = conn.execute(text("PRAGMA page_size")).scalar_one()
    return int((pages - free) * size)


def dead_rows(conn: Connection) -> int:
    """PostgreSQL: the deleted rows of the trace tables that the last VACUUM could not reclaim yet (some
    transaction still saw them), from the server's statistics."""
    return int(conn.execute(_PG_DEAD, {"tables": list(TRACE_TABLES)}).scalar_one())
