"""The metadata store: SQLAlchemy on SQLite by default, PostgreSQL by URL, schema by Alembic migrations."""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from lamina.errors import ConflictError, StoreError

_MIGRATIONS = Path(__file__).parent / "migrations"
#: The advisory lock key that serialises migrations on PostgreSQL (any fixed 64-bit number of our own).
_MIGRATION_LOCK = 0x4C414D494E4100  # "LAMINA\0"


def _lock_key(name: str) -> int:
    """A named lock as PostgreSQL's 64-bit advisory lock key."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def _transactional_ddl(engine: Engine) -> None:
    """Make pysqlite run DDL inside the transaction SQLAlchemy begins (SQLAlchemy's documented recipe).

    By default pysqlite opens a transaction only before DML, so a migration's ``CREATE TABLE`` commits at
    once and a step failing halfway leaves half a schema; with this, one failed migration changes nothing.
    """

    @event.listens_for(engine, "connect")
    def _autocommit_driver(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer (CLI beside a running stack)
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


class Store:
    """One database: ``Store(url).migrate()`` brings the schema to the newest migration."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._file = Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None
        try:
            if self._file is not None:
                self._file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                # the metadata holds key hashes and prompts: readable by its owner only
                os.close(os.open(self._file, os.O_CREAT | os.O_RDWR, 0o600))
            self.engine: Engine = create_engine(url, pool_pre_ping=True, future=True)
        except (SQLAlchemyError, ImportError, OSError) as exc:
            raise StoreError(f"cannot open the metadata store at {self.safe_url}: {exc}") from exc
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._local_locks: dict[str, threading.Lock] = {}

    @property
    def safe_url(self) -> str:
        """The URL with any password hidden, for messages."""
        return self.engine.url.render_as_string(hide_password=True) if hasattr(self, "engine") else self.url

    def migrate(self) -> None:
        """Apply every migration not yet applied. Safe to call at every start."""
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(_MIGRATIONS))
        engine = self.engine
        if engine.dialect.name == "sqlite":
            engine = create_engine(self.url, poolclass=NullPool)
            event.listen(engine, "connect", _sqlite_pragmas)
            _transactional_ddl(engine)
        try:
            with engine.begin() as conn:
                if engine.dialect.name == "postgresql":  # hosts starting together migrate one at a time
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        except SQLAlchemyError as exc:
            raise StoreError(
                f"cannot migrate the metadata store at {self.safe_url}: {exc}; check that the database "
                "is reachable and that its user may create tables"
            ) from exc
        finally:
            if engine is not self.engine:
                engine.dispose()

    def tables(self) -> list[str]:
        return sorted(inspect(self.engine).get_table_names())

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A connection in a transaction: committed on success, rolled back on error."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except IntegrityError as exc:
            raise ConflictError(f"a concurrent write conflicted in the metadata store: {exc.orig}") from exc
        except SQLAlchemyError as exc:
            raise StoreError(f"metadata store error ({self.safe_url}): {exc}") from exc

    @contextmanager
    def lock(self, name: str, *, busy: str | None = None) -> Iterator[None]:
        """Hold the lock ``name`` among every process using this store, or raise ConflictError at once
        (with the message ``busy``).

        PostgreSQL: a session advisory lock on a connection of its own, so processes on other hosts are
        excluded too. SQLite: ``flock`` on ``locks/<name>.lock`` beside the database file (one host by
        nature). Either is released by the operating system or the server if the holder dies.
        """
        busy = busy or f"the lock {name!r} is held by another process; try again when it has finished"
        if self.engine.dialect.name == "postgresql":
            with self._advisory_lock(name, busy):
                yield
        elif self._file is not None:
            with self._file_lock(self._file.parent / "locks" / f"{name.replace(':', '-')}.lock", busy):
                yield
        else:  # an in-memory database lives in this process only
            lock = self._local_locks.setdefault(name, threading.Lock())
            if not lock.acquire(blocking=False):
                raise ConflictError(busy)
            try:
                yield
            finally:
                lock.release()

    @contextmanager
    def _advisory_lock(self, name: str, busy: str) -> Iterator[None]:
        key = _lock_key(name)
        try:
            conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        except SQLAlchemyError as exc:
            raise StoreError(f"metadata store error ({self.safe_url}): {exc}") from exc
        with conn:
            if not conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar():
                raise ConflictError(busy)
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})

    @staticmethod
    @contextmanager
    def _file_lock(path: Path, busy: str) -> Iterator[None]:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with path.open("a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConflictError(busy) from None
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def close(self) -> None:
        self.engine.dispose()
