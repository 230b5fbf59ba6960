"""Many rows into one table with a few multi-row INSERTs.

SQLAlchemy's ``conn.execute(table.insert(), rows)`` is a DB-API ``executemany``: the sqlite3 driver steps
the statement once per row and lets go of the GIL for every step. A writer thread in a busy gateway then
waits for the event loop's thread to hand the GIL back (up to the 5 ms switch interval) row after row:
measured, the cost ledger's writer fell behind ~1,000 requests a second and its queue grew by tens of
thousands of rows. One INSERT of many VALUES rows is one step. Chunks are powers of two, so a table's
statements take few shapes (SQLAlchemy compiles each shape once), and stay under the database's limit
of bound values per statement.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Table, insert

#: most rows in one statement
MAX_ROWS = 256
#: bound values one statement may carry, per dialect (SQLite before 3.32: 999)
_MAX_VALUES = {
    "sqlite": 32_766 if sqlite3.sqlite_version_info >= (3, 32) else 999,
    "postgresql": 65_535,
}


def insert_rows(conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert ``rows`` (dicts of column values, all with the same keys) into ``table``."""
    if not rows:
        return
    values = _MAX_VALUES.get(conn.dialect.name, 999)
    size = _power_of_two_at_most(min(MAX_ROWS, max(1, values // max(1, len(rows[0])))))
    start = 0
    while start < len(rows):
        while size > len(rows) - start:
            size //= 2
        conn.execute(insert(table).values(list(rows[start : start + size])))
        start += size


def _power_of_two_at_most(n: int) -> int:
    return 1 << (n.bit_length() - 1)
