"""Finding versions and aliases in the metadata store, and the messages that say what exists when a lookup
fails (every not-found error lists the names, versions or aliases there are)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Row, select

from lamina.store import model_aliases, model_versions

#: (name, version) -> the aliases pointing at it
AliasMap = dict[tuple[str, str], list[str]]


def version_rows(conn: Connection, name: str) -> list[Row[Any]]:
    """Every version of ``name``, oldest first."""
    query = select(model_versions).where(model_versions.c.name == name).order_by(model_versions.c.id)
    return list(conn.execute(query))


def aliases_by_version(conn: Connection, name: str | None) -> AliasMap:
    """The aliases of ``name`` (of every name when None), by the version they point at."""
    query = select(model_aliases)
    if name is not None:
        query = query.where(model_aliases.c.name == name)
    found: AliasMap = {}
    for row in conn.execute(query):
        found.setdefault((row.name, row.version), []).append(row.alias)
    return found


def next_version(rows: Sequence[Row[Any]]) -> str:
    """One more than the highest integer version (``"1"`` for the first)."""
    numbers = [int(r.version) for r in rows if r.version.isdigit()]
    return str(max(numbers, default=0) + 1)


def known(rows: Sequence[Row[Any]], aliases: Mapping[tuple[str, str], Sequence[str]]) -> str:
    versions = ", ".join(r.version for r in rows)
    pointers = ", ".join(f"{a} -> {v}" for (_, v), names in sorted(aliases.items()) for a in sorted(names))
    return f"versions: {versions}" + (f"; aliases: {pointers}" if pointers else "")


def no_version(conn: Connection, name: str, version: str, rows: Sequence[Row[Any]]) -> str:
    """Why ``name@version`` names no version: no such name, an alias instead, or an unknown label."""
    if not rows:
        return unknown_name(conn, name)
    aliases = aliases_by_version(conn, name)
    target = next((v for (_, v), names in aliases.items() if version in names), None)
    if target is not None:
        return f"{name}@{version} is an alias of version {target}; name the version: {name}@{target}"
    return f"{name} has no version {version!r}; {known(rows, aliases)}"


def unknown_name(conn: Connection, ref: str) -> str:
    rows = conn.execute(select(model_versions.c.name, model_versions.c.version).order_by(model_versions.c.id))
    by_name: dict[str, list[str]] = {}
    for row in rows:
        by_name.setdefault(row.name, []).append(row.version)
    listed = "; ".join(f"{n} ({', '.join(vs)})" for n, vs in sorted(by_name.items())) or "none yet"
    return (
        f"no model {ref!r} in the registry (registered: {listed}); add it with "
        "`lamina models add SOURCE --name NAME`"
    )
