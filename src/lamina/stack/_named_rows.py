"""A metadata table with one row per deployment, replaced whole: the rollouts kept beside the config
(``_config_rollouts``) and the rollouts in progress (``_rollouts_pending``). Synchronous: call it from a
worker thread on an event loop."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from sqlalchemy import Row, Table, delete, insert, select

from lamina.clock import Clock, utcnow
from lamina.store import Store


class NamedRows:
    """The rows of ``table`` (a ``name`` key and an ``updated_at`` column), by name."""

    def __init__(self, store: Store, table: Table, clock: Clock = utcnow) -> None:
        self._store = store
        self._table = table
        self._clock = clock

    def put(self, name: str, **values: Any) -> None:
        """Keep ``values`` as the row of ``name``, replacing the one it had."""
        table = self._table
        with self._store.begin() as conn:
            conn.execute(delete(table).where(table.c.name == name))
            conn.execute(insert(table).values(name=name, updated_at=self._clock(), **values))

    def rows(self) -> Sequence[Row[Any]]:
        with self._store.begin() as conn:
            return conn.execute(select(self._table).order_by(self._table.c.name)).all()

    def drop(self, names: Collection[str]) -> None:
        with self._store.begin() as conn:
            conn.execute(delete(self._table).where(self._table.c.name.in_(list(names))))
