"""Migrations of the metadata store and of the pgvector store: atomic, serialised across hosts, refused when
the database was migrated by a newer Lamina."""

from __future__ import annotations

import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic.script import ScriptDirectory
from psycopg import sql
from sqlalchemy import inspect, text

import lamina.store
from lamina.data import PgVectorStore
from lamina.data.vectors._pgschema import MIGRATIONS
from lamina.errors import StoreError
from lamina.store import Store, metadata
from lamina.store._store import head_revision
from tests.support import run_python

MIGRATIONS_DIR = Path(lamina.store.__file__).resolve().parent / "migrations"

FAILING_STEP = '''"""A step that changes the schema three ways, then fails."""

import sqlalchemy as sa
from alembic import op

revision = "9999"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("half_done", sa.Integer, nullable=True))
    op.create_table("half_done", sa.Column("id", sa.Integer, primary_key=True))
    op.execute("INSERT INTO half_done (id) VALUES (1)")
    op.execute("SELECT lamina_no_such_function()")
'''


def schema_of(store: Store) -> dict[str, Any]:
    """Every table with its columns and indexes, and the alembic revision: what a migration may change."""
    inspector = inspect(store.engine)
    tables = {
        name: (
            [(c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(name)],
            sorted((i["name"] or "", tuple(i["column_names"])) for i in inspector.get_indexes(name)),
        )
        for name in inspector.get_table_names()
    }
    revision = None
    if "alembic_version" in tables:
        with store.engine.connect() as conn:
            revision = conn.scalars(text("SELECT version_num FROM alembic_version")).all()
    return {"tables": tables, "revision": revision}


@pytest.fixture
def failing_migrations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The real migrations plus a last step that fails halfway; returns the head before that step."""
    copy = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    head = ScriptDirectory(str(copy)).get_current_head()
    assert head is not None
    (copy / "versions" / "9999_fails.py").write_text(FAILING_STEP.format(head=head))
    monkeypatch.setattr("lamina.store._store._MIGRATIONS", copy)
    return head


def test_a_failing_migration_leaves_the_schema_as_it_was(store: Store, failing_migrations: str) -> None:
    before = schema_of(store)
    assert before["revision"] == [failing_migrations]
    with pytest.raises(StoreError, match="cannot migrate the metadata store"):
        store.migrate()
    assert schema_of(store) == before


def test_a_failing_first_migration_leaves_an_empty_sqlite_database(
    tmp_path: Path, failing_migrations: str
) -> None:
    store = Store(f"sqlite:///{tmp_path / 'fresh.db'}")
    try:
        with pytest.raises(StoreError):
            store.migrate()
        assert store.tables() == []
    finally:
        store.close()


def run_together(n: int, work: Callable[[int], Any]) -> list[Any]:
    """``work(0..n-1)`` in n threads released at once by a barrier; returns the results or raises."""
    barrier = threading.Barrier(n)

    def start(i: int) -> Any:
        barrier.wait(timeout=60)
        return work(i)

    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(start, i) for i in range(n)]
        return [f.result(timeout=120) for f in futures]


@pytest.mark.timeout(180)
def test_hosts_migrating_one_fresh_postgres_database_at_once_all_succeed(pg_database: str) -> None:
    def migrate(_: int) -> list[str]:
        store = Store(pg_database)
        try:
            store.migrate()
            return store.tables()
        finally:
            store.close()

    results = run_together(6, migrate)
    expected = sorted({*metadata.tables, "alembic_version"})
    assert results == [expected] * 6
    store = Store(pg_database)
    try:
        head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
        assert schema_of(store)["revision"] == [head]
    finally:
        store.close()


# -- the pgvector store's own migrations ------------------------------------------------------------------


def libpq(url: str) -> str:
    return url.replace("+psycopg", "")


@pytest.fixture
def schema(pg_url: str) -> Iterator[str]:
    name = f"mig_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg.connect(libpq(pg_url), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def migration_log(url: str, schema: str) -> list[tuple[int, str, Any]]:
    with psycopg.connect(libpq(url)) as conn:
        rows = conn.execute(
            sql.SQL("SELECT version, name, applied_at FROM {} ORDER BY version").format(
                sql.Identifier(schema, "_lamina_migrations")
            )
        ).fetchall()
    return [(int(r[0]), str(r[1]), r[2]) for r in rows]


def open_and_touch(url: str, schema: str) -> int:
    """Open a store, make it connect (which migrates), close it; returns its count of a dataset."""
    store = PgVectorStore(url, schema=schema)
    try:
        return store.count("docs")
    finally:
        store.close()


def test_a_fresh_schema_gets_every_step_and_a_second_store_applies_none(pg_url: str, schema: str) -> None:
    assert open_and_touch(pg_url, schema) == 0
    log = migration_log(pg_url, schema)
    assert [(v, n) for v, n, _ in log] == [(v, n) for v, n, _ in MIGRATIONS]
    assert open_and_touch(pg_url, schema) == 0
    assert migration_log(pg_url, schema) == log  # the same rows, applied_at included: nothing re-applied


def test_a_schema_from_before_migrations_is_adopted(pg_url: str, schema: str) -> None:
    with psycopg.connect(libpq(pg_url), autocommit=True) as conn:  # as the first pgvector store made it
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (dataset text PRIMARY KEY, n_docs bigint NOT NULL, "
                "total_len bigint NOT NULL, index_params jsonb)"
            ).format(sql.Identifier(schema, "_lamina_datasets"))
        )
        conn.execute(
            sql.SQL("INSERT INTO {} VALUES ('docs', 7, 70, NULL)").format(
                sql.Identifier(schema, "_lamina_datasets")
            )
        )
    assert open_and_touch(pg_url, schema) == 7
    assert [v for v, _, _ in migration_log(pg_url, schema)] == [v for v, _, _ in MIGRATIONS]
    with psycopg.connect(libpq(pg_url)) as conn:
        row = conn.execute(
            sql.SQL("SELECT n_docs, generation FROM {}").format(sql.Identifier(schema, "_lamina_datasets"))
        ).fetchone()
    assert row == (7, 0)


def test_a_schema_migrated_by_a_newer_lamina_is_refused(pg_url: str, schema: str) -> None:
    open_and_touch(pg_url, schema)
    newer = MIGRATIONS[-1][0] + 1
    with psycopg.connect(libpq(pg_url), autocommit=True) as conn:
        conn.execute(
            sql.SQL("INSERT INTO {} (version, name) VALUES (%s, 'from the future')").format(
                sql.Identifier(schema, "_lamina_migrations")
            ),
            (newer,),
        )
    with pytest.raises(StoreError, match=rf"migrated by a newer Lamina \(steps \[{newer}\].*upgrade Lamina"):
        open_and_touch(pg_url, schema)


@pytest.mark.timeout(180)
def test_stores_connecting_at_once_to_a_fresh_database_all_succeed(pg_database: str) -> None:
    # a fresh database: the extension, the schema and the tables are all created by whichever comes first
    assert run_together(6, lambda _: open_and_touch(pg_database, "lamina_vectors")) == [0] * 6
    assert [v for v, _, _ in migration_log(pg_database, "lamina_vectors")] == [v for v, _, _ in MIGRATIONS]


def test_the_head_revision_is_alembics_and_a_store_at_head_does_not_import_alembic(tmp_path: Path) -> None:
    assert head_revision() == ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    url = f"sqlite:///{tmp_path / 'lamina.db'}"
    store = Store(url)
    assert store.revision() is None
    store.migrate()
    assert store.revision() == head_revision()
    store.close()
    # a fresh process opening the migrated store (a CLI command) skips Alembic: its import alone took 0.35 s
    script = f"""
import sys
from lamina.store import Store
Store({url!r}).migrate()
print(sorted(m for m in sys.modules if m.partition(".")[0] == "alembic"))
"""
    assert run_python(script).strip() == "[]"
