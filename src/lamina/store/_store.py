"""The metadata store: SQLAlchemy on SQLite by default, PostgreSQL by URL, schema by Alembic migrations."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, make_url, text
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from lamina.config import redact_url
from lamina.errors import ConflictError, StoreError

_MIGRATIONS = Path(__file__).parent / "migrations"
#: The advisory lock key that serialises migrations on PostgreSQL (any fixed 64-bit number of our own).
_MIGRATION_LOCK = 0x4C414D494E4100  # "LAMINA\0"
_log = logging.getLogger(__name__)


def head_revision() -> str:
    """The newest migration's revision: its file's number (``versions/0014_config_rollouts.py`` is revision
    ``0014``; tests/integration/test_store_migrations.py checks this against Alembic's reading)."""
    return max(p.name[:4] for p in (_MIGRATIONS / "versions").glob("[0-9][0-9][0-9][0-9]_*.py"))


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


def _sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL; None for another database or an in-memory one."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None  # create_engine will say what is wrong with it
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return None if parsed.database.startswith("file:") else Path(parsed.database)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer (CLI beside a running stack)
    cur.execute("PRAGMA busy_timeout=10000")
    # in WAL mode NORMAL never corrupts the file; a power cut can lose the last commits (spans, ledger rows),
    # not the database. FULL would fsync every commit, ~4 ms each here: the cost of every traced request
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA journal_size_limit=16777216")  # a checkpointed WAL shrinks back to 16 MiB
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


class HeldLock:
    """A lock ``Store.lock`` holds. ``check()`` raises ConflictError if it has been lost: on PostgreSQL,
    when the connection holding it died (the server then released it, and another host may hold it now).
    Check before a step that is only safe under the lock, such as a commit."""

    def __init__(self, name: str, probe: Callable[[], None] | None = None) -> None:
        self.name = name
        self._probe = probe

    def check(self) -> None:
        if self._probe is not None:
            self._probe()


class Store:
    """One database: ``Store(url).migrate()`` brings the schema to the newest migration."""

    def __init__(self, url: str) -> None:
        self.url = url
        #: the URL with its password hidden, for messages
        self.safe_url = redact_url(url)
        self._file = _sqlite_file(url)
        try:
            if self._file is not None:
                self._file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                # the metadata holds key hashes and prompts: readable by its owner only (SQLite gives its
                # -wal and -shm files the database file's mode)
                os.close(os.open(self._file, os.O_CREAT | os.O_RDWR, 0o600))
            self.engine: Engine = create_engine(url, pool_pre_ping=True, future=True)
        except (SQLAlchemyError, ImportError, OSError) as exc:
            raise StoreError(f"cannot open the metadata store at {self.safe_url}: {exc}") from exc
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._local_locks: dict[str, threading.Lock] = {}

    def migrate(self) -> None:
        """Apply every migration not yet applied, all in one transaction. Safe to call at every start.

        SQLite: on an engine of its own that runs DDL inside the transaction, so a failing migration leaves
        the schema as it was. PostgreSQL (transactional DDL by nature): under an advisory lock, so hosts
        starting together migrate one at a time and the later ones find nothing left to do. A schema
        already at :func:`head_revision` costs one query: Alembic is imported only when there is work
        (its import and script scan took about 0.4 s of every CLI command).
        """
        was, head = self.revision(), head_revision()
        if was == head:
            return
        from alembic import command
        from alembic.config import Config as AlembicConfig

        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(_MIGRATIONS))
        engine = self.engine
        if self._file is not None:  # an in-memory database exists only on self.engine's connection
            engine = create_engine(self.url, poolclass=NullPool)
            event.listen(engine, "connect", _sqlite_pragmas)
            _transactional_ddl(engine)
        try:
            with engine.begin() as conn:
                if engine.dialect.name == "postgresql":
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
        _log.info("metadata store %s: schema %s (was %s)", self.safe_url, head, was or "empty")

    def revision(self) -> str | None:
        """The schema's migration revision (None: never migrated, or unreadable)."""
        try:
            with self.engine.connect() as conn:
                return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except SQLAlchemyError:
            return None

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
    def lock(self, name: str, *, busy: str | None = None) -> Iterator[HeldLock]:
        """Hold the lock ``name`` among every process using this store, or raise ConflictError at once
        (with the message ``busy``). Yields a ``HeldLock`` to check that it is still held.

        PostgreSQL: a session advisory lock on a connection of its own, so processes on other hosts are
        excluded too. SQLite: ``flock`` on ``locks/<name>.lock`` beside the database file (one host by
        nature). Either is released by the operating system or the server if the holder dies.
        """
        busy = busy or f"the lock {name!r} is held by another process; try again when it has finished"
        if self.engine.dialect.name == "postgresql":
            with self._advisory_lock(name, busy) as held:
                yield held
        elif self._file is not None:
            with self._file_lock(self._file.parent / "locks" / f"{name.replace(':', '-')}.lock", busy):
                yield HeldLock(name)
        else:  # an in-memory database lives in this process only
            lock = self._local_locks.setdefault(name, threading.Lock())
            if not lock.acquire(blocking=False):
                raise ConflictError(busy)
            try:
                yield HeldLock(name)
            finally:
                lock.release()

    @contextmanager
    def _advisory_lock(self, name: str, busy: str) -> Iterator[HeldLock]:
        key = _lock_key(name)
        try:
            conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        except SQLAlchemyError as exc:
            raise StoreError(f"metadata store error ({self.safe_url}): {exc}") from exc

        def probe() -> None:  # the session that holds the lock is alive, so the lock is still ours
            try:
                conn.execute(text("SELECT 1"))
            except SQLAlchemyError as exc:
                raise ConflictError(
                    f"lost the lock {name!r}: the database connection holding it closed (a server restart, "
                    "a network failure or an administrator ended it), so another process may hold it now; "
                    "stopped before the step that needed it: run the command again"
                ) from exc

        with conn:
            if not conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar():
                raise ConflictError(busy)
            try:
                yield HeldLock(name, probe)
            finally:
                try:
                    conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                except SQLAlchemyError as exc:  # the session ended, and the server released the lock with it
                    _log.warning("lock %r: its connection was lost before release (%s)", name, exc)

    @staticmethod
    @contextmanager
    def _file_lock(path: Path, busy: str) -> Iterator[None]:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with os.fdopen(os.open(path, os.O_CREAT | os.O_RDWR, 0o600), "r+b") as f:
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
