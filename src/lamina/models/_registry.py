"""The model registry: names, versions, aliases, formats and checksums of model files.

Rows live in the metadata store (``model_versions``, ``model_aliases``); files live content-addressed
under ``blob_dir/sha256/<hex>``, so two versions of the same bytes share one file and a damaged file is
caught by hashing it again. Paths are recorded relative to ``blob_dir``: a PostgreSQL store shared by
machines whose state directories differ still resolves them.

Every check (name, source, format, companions, conflicts) runs before the blob directory is written;
a failing ``add`` leaves the registry and the blob directory as they were.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Connection, Row, delete, insert, select

from lamina.errors import ChecksumMismatchError, ConflictError, ModelNotFoundError, RegistryError
from lamina.models._formats import (
    ModelFormat,
    check_tokenizer_json,
    detect_format,
    read_metadata,
    takes_text,
)
from lamina.models._sources import Fetched, fetch
from lamina.store import Store, model_aliases, model_versions

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*", re.IGNORECASE)
_CHUNK = 1 << 20
_BLOBS = "sha256"


@dataclass(frozen=True)
class ModelVersion:
    """One registered file under ``name@version``, with what it says about itself in ``meta``."""

    name: str
    version: str
    format: ModelFormat
    sha256: str
    size_bytes: int
    source: str
    path: Path
    #: companion files by role, e.g. ``{"tokenizer": Path(...)}``
    extra_files: dict[str, Path]
    meta: dict[str, Any]
    created_at: datetime
    #: aliases of this name that point at this version, e.g. ``("latest",)``
    aliases: tuple[str, ...] = field(default=())

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_json(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "name": self.name,
            "version": self.version,
            "format": self.format,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "source": self.source,
            "path": str(self.path),
            "extra_files": {role: str(p) for role, p in self.extra_files.items()},
            "meta": copy.deepcopy(self.meta),  # callers may edit what they get
            "created_at": self.created_at.isoformat(),
            "aliases": list(self.aliases),
        }


@dataclass(frozen=True)
class _Blob:
    """A fetched file and its hash: what a version is made of, before it is stored."""

    fetched: Fetched
    sha256: str
    size_bytes: int


def _utcnow() -> datetime:
    return datetime.now(UTC)


def check_name(kind: str, value: str, max_len: int = 100) -> str:
    """``value`` lower-cased, or a RegistryError saying which characters a name may hold."""
    if not _NAME.fullmatch(value) or len(value) > max_len:
        raise RegistryError(
            f"invalid {kind} {value!r}: use letters, digits, '.', '_' and '-', starting with a letter or "
            f"digit, at most {max_len} characters",
            param=kind,
        )
    return value.lower()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class Registry:
    """Model versions in ``store``, their files under ``blob_dir``.

    ``client`` is the HTTP client for ``hf:`` downloads (a fresh one per download when None); ``clock``
    stamps ``created_at``.
    """

    def __init__(
        self,
        store: Store,
        blob_dir: Path,
        *,
        client: httpx.Client | None = None,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._store = store
        self._blob_dir = blob_dir
        self._client = client
        self._clock = clock

    def add(
        self, source: str, name: str, version: str | None = None, extra: Mapping[str, str] | None = None
    ) -> ModelVersion:
        """Register ``source`` as ``name@version`` (default: the next integer), with companion files by
        role in ``extra`` (e.g. ``{"tokenizer": SOURCE}``). Adding the same content again returns the
        version that already holds it."""
        name = check_name("name", name, 200)
        version = None if version is None else check_name("version", version)
        roles = {check_name("role", role): src for role, src in (extra or {}).items()}
        with ExitStack() as stack:
            fetched = stack.enter_context(fetch(source, self._blob_dir, client=self._client))
            fmt = detect_format(fetched.path, label=fetched.source)
            companions = {
                role: stack.enter_context(fetch(src, self._blob_dir, client=self._client))
                for role, src in roles.items()
            }
            main = _hash(fetched)
            extras = {role: _hash(f) for role, f in companions.items()}
            existing = self._existing(name, version, main, extras)
            if existing is not None:
                return existing
            meta = read_metadata(fetched.path, fmt, label=fetched.source)
            _check_companions(fetched.source, fmt, meta, extras)
            return self._store_version(name, version, fmt, meta, main, extras)

    def list(self) -> list[ModelVersion]:
        """Every version, by name, oldest first."""
        with self._store.begin() as conn:
            rows = conn.execute(select(model_versions).order_by(model_versions.c.name, model_versions.c.id))
            aliases = _aliases_by_version(conn, None)
            return [self._version(row, aliases) for row in rows]

    def get(self, ref: str) -> ModelVersion:
        """``NAME``, ``NAME@VERSION`` or ``NAME@ALIAS``. NAME alone is its alias ``latest`` if set, else
        its newest version."""
        name, _, tag = ref.strip().lower().partition("@")
        with self._store.begin() as conn:
            rows = _rows(conn, name)
            aliases = _aliases_by_version(conn, name)
            if not rows:
                raise ModelNotFoundError(_unknown_name(conn, ref), param="model")
        by_version = {row.version: row for row in rows}
        alias_target = {alias: v for (_, v), names in aliases.items() for alias in names}
        if not tag:
            tag = "latest" if "latest" in alias_target else rows[-1].version
        row = by_version.get(tag) or by_version.get(alias_target.get(tag, ""))
        if row is None:
            raise ModelNotFoundError(f"{name} has no version or alias {tag!r}; {_known(rows, aliases)}")
        return self._version(row, aliases)

    def alias(self, name: str, alias: str, version: str) -> ModelVersion:
        """Point ``name@alias`` at ``version`` (moving it if it pointed elsewhere)."""
        name, alias = check_name("name", name, 200), check_name("alias", alias)
        version = check_name("version", version)
        with self._store.begin() as conn:
            rows = _rows(conn, name)
            target = next((r for r in rows if r.version == version), None)
            if target is None:
                raise ModelNotFoundError(_no_version(conn, name, version, rows), param="version")
            if any(r.version == alias for r in rows):
                raise ConflictError(
                    f"{name}@{alias} already names a version; an alias must differ from every version"
                )
            where = (model_aliases.c.name == name) & (model_aliases.c.alias == alias)
            conn.execute(delete(model_aliases).where(where))
            conn.execute(insert(model_aliases).values(name=name, alias=alias, version=version))
            return self._version(target, _aliases_by_version(conn, name))

    def remove(self, name: str, version: str) -> ModelVersion:
        """Drop ``name@version`` and the aliases that point at it; delete its files unless another
        version still uses them."""
        name, version = name.lower(), version.lower()
        with self._store.begin() as conn:
            rows = _rows(conn, name)
            row = next((r for r in rows if r.version == version), None)
            if row is None:
                raise ModelNotFoundError(_no_version(conn, name, version, rows), param="version")
            removed = self._version(row, _aliases_by_version(conn, name))
            alias_rows = (model_aliases.c.name == name) & (model_aliases.c.version == version)
            conn.execute(delete(model_aliases).where(alias_rows))
            conn.execute(delete(model_versions).where(model_versions.c.id == row.id))
            still_used = {digest for r in conn.execute(select(model_versions)) for digest in _digests(r)}
        for digest in set(_digests(row)) - still_used:
            self._blob_path(digest).unlink(missing_ok=True)
        return removed

    def verify(self, mv: ModelVersion) -> None:
        """Hash the files of ``mv`` again; ChecksumMismatchError if any changed or went missing."""
        # companion files are content-addressed too: the file name is the sha256 they must have
        for path, expected in [(mv.path, mv.sha256), *((p, p.name) for p in mv.extra_files.values())]:
            try:
                actual = sha256_file(path)
            except FileNotFoundError:
                actual = "no file at all"
            if actual != expected:
                raise ChecksumMismatchError(
                    f"file {path} no longer matches its sha256 recorded at registration (expected "
                    f"{expected}, got {actual}); it was changed or damaged: `lamina models rm {mv.ref}` "
                    "and add it again"
                )

    def _existing(
        self, name: str, version: str | None, main: _Blob, extras: dict[str, _Blob]
    ) -> ModelVersion | None:
        """The version that already holds this content, or ConflictError if ``version`` is taken."""
        identity = (main.sha256, {role: b.sha256 for role, b in extras.items()})
        with self._store.begin() as conn:
            rows = _rows(conn, name)
            aliases = _aliases_by_version(conn, name)
        same = [r for r in rows if (r.sha256, _extra_digests(r)) == identity]
        if version is None:
            return self._version(same[-1], aliases) if same else None
        taken = next((r for r in rows if r.version == version), None)
        if taken is not None and taken in same:
            return self._version(taken, aliases)
        if taken is not None:
            raise ConflictError(
                f"{name}@{version} is already registered with other content (sha256 {taken.sha256[:12]}…); "
                f"give another --version, or `lamina models rm {name}@{version}` first",
                param="version",
            )
        if any(version in names for names in aliases.values()):
            raise ConflictError(f"{name}@{version} is already an alias; give another --version")
        return None

    def _store_version(
        self,
        name: str,
        version: str | None,
        fmt: ModelFormat,
        meta: dict[str, Any],
        main: _Blob,
        extras: dict[str, _Blob],
    ) -> ModelVersion:
        """Move the files into place, then insert the row; on failure remove the files it added."""
        added: list[Path] = []
        try:
            for blob in (main, *extras.values()):
                if self._put_blob(blob):
                    added.append(self._blob_path(blob.sha256))
            with self._store.begin() as conn:
                if version is None:
                    version = _next_version(_rows(conn, name))
                conn.execute(
                    insert(model_versions).values(
                        name=name,
                        version=version,
                        format=fmt,
                        sha256=main.sha256,
                        size_bytes=main.size_bytes,
                        source=main.fetched.source,
                        path=f"{_BLOBS}/{main.sha256}",
                        extra_files={role: _extra_record(b) for role, b in extras.items()},
                        meta=meta,
                        created_at=self._clock(),
                    )
                )
        except BaseException:
            for path in added:
                path.unlink(missing_ok=True)
            raise
        return self.get(f"{name}@{version}")

    def _put_blob(self, blob: _Blob) -> bool:
        """Place ``blob`` at its content address; False if an intact copy was already there."""
        target = self._blob_path(blob.sha256)
        if target.is_file() and sha256_file(target) == blob.sha256:
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        if blob.fetched.temporary:  # a download, already hashed and on this file system
            os.replace(blob.fetched.path, target)
            return True
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, blob.fetched.path.open("rb") as src:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != blob.sha256:
                raise RegistryError(f"{blob.fetched.source} changed while it was being added; add it again")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def _blob_path(self, digest: str) -> Path:
        return self._blob_dir / _BLOBS / digest

    def _version(self, row: Row[Any], aliases: Mapping[tuple[str, str], Sequence[str]]) -> ModelVersion:
        created = row.created_at
        return ModelVersion(
            name=row.name,
            version=row.version,
            format=row.format,
            sha256=row.sha256,
            size_bytes=row.size_bytes,
            source=row.source,
            path=self._blob_dir / row.path,
            extra_files={role: self._blob_dir / info["path"] for role, info in row.extra_files.items()},
            meta=row.meta,
            # SQLite hands back naive datetimes; every time stored here is UTC
            created_at=created if created.tzinfo else created.replace(tzinfo=UTC),
            aliases=tuple(sorted(aliases.get((row.name, row.version), ()))),
        )


def _hash(fetched: Fetched) -> _Blob:
    digest = fetched.sha256 or sha256_file(fetched.path)
    return _Blob(fetched, digest, fetched.path.stat().st_size)


def _extra_record(blob: _Blob) -> dict[str, Any]:
    return {
        "path": f"{_BLOBS}/{blob.sha256}",
        "sha256": blob.sha256,
        "size_bytes": blob.size_bytes,
        "source": blob.fetched.source,
    }


def _extra_digests(row: Row[Any]) -> dict[str, str]:
    return {role: str(info["sha256"]) for role, info in row.extra_files.items()}


def _digests(row: Row[Any]) -> list[str]:
    return [row.sha256, *_extra_digests(row).values()]


def _check_companions(source: str, fmt: ModelFormat, meta: dict[str, Any], extras: dict[str, _Blob]) -> None:
    """An ONNX text model runs only with its tokenizer; a tokenizer must be a tokenizer.json."""
    if "tokenizer" in extras:
        tokenizer = extras["tokenizer"].fetched
        check_tokenizer_json(tokenizer.path, label=tokenizer.source)
    elif fmt == "onnx" and takes_text(meta):
        raise RegistryError(
            f"{source} is an ONNX text model (it takes input_ids) and needs its tokenizer: pass "
            "--tokenizer SOURCE with the tokenizer.json from the same model repository",
            param="tokenizer",
        )


def _next_version(rows: Sequence[Row[Any]]) -> str:
    numbers = [int(r.version) for r in rows if r.version.isdigit()]
    return str(max(numbers, default=0) + 1)


def _rows(conn: Connection, name: str) -> list[Row[Any]]:
    query = select(model_versions).where(model_versions.c.name == name).order_by(model_versions.c.id)
    return list(conn.execute(query))


def _aliases_by_version(conn: Connection, name: str | None) -> dict[tuple[str, str], list[str]]:
    query = select(model_aliases)
    if name is not None:
        query = query.where(model_aliases.c.name == name)
    found: dict[tuple[str, str], list[str]] = {}
    for row in conn.execute(query):
        found.setdefault((row.name, row.version), []).append(row.alias)
    return found


def _known(rows: Sequence[Row[Any]], aliases: Mapping[tuple[str, str], Sequence[str]]) -> str:
    versions = ", ".join(r.version for r in rows)
    pointers = ", ".join(f"{a} -> {v}" for (_, v), names in sorted(aliases.items()) for a in sorted(names))
    return f"versions: {versions}" + (f"; aliases: {pointers}" if pointers else "")


def _no_version(conn: Connection, name: str, version: str, rows: Sequence[Row[Any]]) -> str:
    if not rows:
        return _unknown_name(conn, name)
    aliases = _aliases_by_version(conn, name)
    target = next((v for (_, v), names in aliases.items() if version in names), None)
    if target is not None:
        return f"{name}@{version} is an alias of version {target}; name the version: {name}@{target}"
    return f"{name} has no version {version!r}; {_known(rows, aliases)}"


def _unknown_name(conn: Connection, ref: str) -> str:
    rows = conn.execute(select(model_versions.c.name, model_versions.c.version).order_by(model_versions.c.id))
    by_name: dict[str, list[str]] = {}
    for row in rows:
        by_name.setdefault(row.name, []).append(row.version)
    known = "; ".join(f"{n} ({', '.join(vs)})" for n, vs in sorted(by_name.items())) or "none yet"
    return (
        f"no model {ref!r} in the registry (registered: {known}); add it with "
        "`lamina models add SOURCE --name NAME`"
    )
