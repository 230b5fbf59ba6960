"""insert_rows: many rows in a few multi-row INSERTs, within the database's limit of bound values."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy import Column, Integer, MetaData, String, Table, func, select

from lamina.store import Store, _rows, insert_rows

WIDE = Table("wide", MetaData(), *(Column(f"c{i}", Integer) for i in range(14)), Column("name", String))


def _inserts(engine: sqlalchemy.Engine) -> list[tuple[int, bool]]:
    """(rows in the statement, executemany?) per INSERT the engine runs, from now on."""
    seen: list[tuple[int, bool]] = []

    def record(_c: object, _cur: object, sql: str, params: object, _ctx: object, many: bool) -> None:
        if sql.startswith('INSERT INTO "wide"'):
            seen.append((sql.count("), (") + 1, many))

    sqlalchemy.event.listen(engine, "before_cursor_execute", record)
    return seen


@pytest.mark.parametrize(
    ("rows", "limit", "statements"),
    [(300, None, [256, 32, 8, 4]), (1, None, [1]), (200, 999, [64, 64, 64, 8])],
)
def test_rows_go_in_power_of_two_statements_under_the_value_limit(
    store: Store, monkeypatch: pytest.MonkeyPatch, rows: int, limit: int | None, statements: list[int]
) -> None:
    engine = store.engine
    if limit is not None:  # SQLite before 3.32 binds at most 999 values: 15 columns, 66 rows, 64 a statement
        monkeypatch.setitem(_rows._MAX_VALUES, engine.dialect.name, limit)
    WIDE.metadata.create_all(engine)
    seen = _inserts(engine)
    data = [{**{f"c{i}": n * i for i in range(14)}, "name": f"row {n}"} for n in range(rows)]
    with engine.begin() as conn:
        insert_rows(conn, WIDE, data)
        insert_rows(conn, WIDE, [])
    assert seen == [(n, False) for n in statements]
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(WIDE)).scalar() == rows
        last = conn.execute(select(WIDE.c.c13).where(WIDE.c.name == f"row {rows - 1}")).scalar()
        assert last == (rows - 1) * 13  # the values land in their own columns and rows


def test_a_new_store_migrates_with_one_line_of_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Alembic's own lines (a plugin each, a migration each: 22 on a new state directory) are held back by
    the logging setup; the store says once what it did, and nothing when there was nothing to do."""
    import logging

    from lamina.logs import configure_logging
    from lamina.store._store import head_revision

    configure_logging("text")
    assert logging.getLogger("alembic").getEffectiveLevel() == logging.WARNING
    store = Store(f"sqlite:///{tmp_path}/lamina.db")
    try:
        with caplog.at_level(logging.INFO):
            store.migrate()
            store.migrate()
    finally:
        store.close()
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert lines == [f"metadata store sqlite:///{tmp_path}/lamina.db: schema {head_revision()} (was empty)"]
