"""The model registry: names, versions, aliases, formats and checksums of model files.

Rows live in the metadata store (``model_versions``, ``model_aliases``); files live content-addressed
under the blob directory (:mod:`lamina.models._blobs`), each companion file (a tokenizer, an ONNX model's
external data) with its own sha256, checked again by whatever loads it.

Every check (name, source, format, companions, conflicts) runs before a file is stored; a failing ``add``
leaves the registry and the blob directory as they were.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import delete, insert, select

from lamina.clock import Clock, utcnow
from lamina.errors import ConflictError, ModelNotFoundError, RegistryError
from lamina.models._blobs import Blob, BlobStore
from lamina.models._checksums import check_files, remedy_for
from lamina.models._formats import ModelFormat, check_tokenizer_json, detect_format, read_metadata, takes_text
from lamina.models._gate_record import GateRecord, drop_gate, gates_by_version, refusal, write_gate
from lamina.models._lookup import (
    AliasMap,
    aliases_by_version,
    known,
    next_version,
    no_version,
    unknown_name,
    version_rows,
)
from lamina.models._model_version import (
    ModelVersion,
    check_name,
    extra_digests,
    row_digests,
    version_from_row,
)
from lamina.models._onnx_external import with_external_data
from lamina.models._sources import Fetched, fetch
from lamina.store import Store, model_aliases, model_versions

__all__ = ["ModelVersion", "Registry"]  # ModelVersion: what older importers of this module ask for


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
        clock: Clock = utcnow,
    ) -> None:
        self._store = store
        self._blob_dir = blob_dir
        self._blobs = BlobStore(blob_dir)
        self._client = client
        self._clock = clock

    def add(
        self, source: str, name: str, version: str | None = None, extra: Mapping[str, str] | None = None
    ) -> ModelVersion:
        """Register ``source`` as ``name@version`` (default: the next integer), with companion files by
        role in ``extra`` (e.g. ``{"tokenizer": SOURCE}``). An ONNX model's external data comes along.
        Adding the same content again returns the version that already holds it."""
        name = check_name("name", name, 200)
        version = None if version is None else check_name("version", version)
        roles = {check_name("role", role): src for role, src in (extra or {}).items()}
        with ExitStack() as stack:

            def opened(src: str) -> Fetched:
                return stack.enter_context(fetch(src, self._blob_dir, client=self._client))

            fetched = opened(source)
            fmt = detect_format(fetched.path, label=fetched.source)
            extras = {role: Blob.of(opened(src)) for role, src in roles.items()}
            if fmt == "onnx":
                fetched, side = with_external_data(stack, source, fetched, opened, self._blob_dir)
                extras |= side
            main = Blob.of(fetched)
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
            aliases = aliases_by_version(conn, None)
            gates = gates_by_version(conn, None)
            return [version_from_row(row, self._blob_dir, aliases, gates) for row in rows]

    def get(self, ref: str, *, refused_ok: bool = False) -> ModelVersion:
        """``NAME``, ``NAME@VERSION`` or ``NAME@ALIAS``. NAME alone is its alias ``latest`` if set, else
        its newest version that is not a quantized variant (a variant serves when named, so quantizing
        never changes what a bare name serves).

        A variant that failed its accuracy gate raises GateFailedError with its figures, unless
        ``refused_ok`` (for showing it, never for serving it)."""
        name, _, tag = ref.strip().lower().partition("@")
        with self._store.begin() as conn:
            rows = version_rows(conn, name)
            aliases = aliases_by_version(conn, name)
            gates = gates_by_version(conn, name)
            if not rows:
                raise ModelNotFoundError(unknown_name(conn, ref), param="model")
        by_version = {row.version: row for row in rows}
        alias_target = {alias: v for (_, v), names in aliases.items() for alias in names}
        if not tag:
            originals = [r for r in rows if (name, r.version) not in gates] or rows
            tag = "latest" if "latest" in alias_target else originals[-1].version
        row = by_version.get(tag) or by_version.get(alias_target.get(tag, ""))
        if row is None:
            raise ModelNotFoundError(f"{name} has no version or alias {tag!r}; {known(rows, aliases)}")
        mv = version_from_row(row, self._blob_dir, aliases, gates)
        if mv.gate is not None and not mv.gate.passed and not refused_ok:
            raise refusal(mv.ref, mv.gate)
        return mv

    def add_variant(
        self, path: Path, parent: ModelVersion, record: GateRecord, version: str | None = None
    ) -> ModelVersion:
        """Register the quantized file ``path`` as a new version of ``parent``'s name, with ``parent``'s
        companion files and the gate's ``record``, in one transaction. The same bytes again keep their
        version and take the new record (the latest evaluation decides)."""
        version = check_name("version", version or f"{parent.version}-{record.method}")
        main = Blob.of(Fetched(path, f"quantized:{parent.ref}:{record.method}"))
        extras = {
            role: Blob(Fetched(p, f"{parent.ref}:{role}"), f.sha256 or "", p.stat().st_size)
            for role, p in parent.extra_files.items()
            if (f := parent.companion(role)).sha256
        }
        with self._store.begin() as conn:
            gated = gates_by_version(conn, parent.name)
        existing = self._existing(parent.name, None, main, extras)
        if existing is not None and (existing.name, existing.version) not in gated:
            raise RegistryError(
                f"quantizing {parent.ref} with {record.method} gave back the bytes of {existing.ref}, which "
                "is not a variant; pick another --method",
                param="method",
            )
        if existing is not None:
            with self._store.begin() as conn:
                write_gate(conn, existing.name, existing.version, record)
            return self.get(existing.ref, refused_ok=True)
        self._existing(parent.name, version, main, extras)  # ConflictError if the version is taken
        meta = read_metadata(path, parent.format, label=main.fetched.source)
        return self._store_version(parent.name, version, parent.format, meta, main, extras, record)

    def alias(self, name: str, alias: str, version: str) -> ModelVersion:
        """Point ``name@alias`` at ``version`` (moving it if it pointed elsewhere); never at a variant that
        failed its accuracy gate (GateFailedError)."""
        name, alias = check_name("name", name, 200), check_name("alias", alias)
        version = check_name("version", version)
        with self._store.begin() as conn:
            rows = version_rows(conn, name)
            target = next((r for r in rows if r.version == version), None)
            if target is None:
                raise ModelNotFoundError(no_version(conn, name, version, rows), param="version")
            if any(r.version == alias for r in rows):
                raise ConflictError(
                    f"{name}@{alias} already names a version; an alias must differ from every version"
                )
            gates = gates_by_version(conn, name)
            gate = gates.get((name, version))
            if gate is not None and not gate.passed:
                raise refusal(f"{name}@{version}", gate)
            where = (model_aliases.c.name == name) & (model_aliases.c.alias == alias)
            conn.execute(delete(model_aliases).where(where))
            conn.execute(insert(model_aliases).values(name=name, alias=alias, version=version))
            return version_from_row(target, self._blob_dir, aliases_by_version(conn, name), gates)

    def remove(self, name: str, version: str) -> ModelVersion:
        """Drop ``name@version`` and the aliases that point at it; delete its files unless another
        version still uses them."""
        name, version = name.lower(), version.lower()
        with self._store.begin() as conn:
            rows = version_rows(conn, name)
            row = next((r for r in rows if r.version == version), None)
            if row is None:
                raise ModelNotFoundError(no_version(conn, name, version, rows), param="version")
            removed = version_from_row(row, self._blob_dir, aliases_by_version(conn, name))
            alias_rows = (model_aliases.c.name == name) & (model_aliases.c.version == version)
            conn.execute(delete(model_aliases).where(alias_rows))
            conn.execute(delete(model_versions).where(model_versions.c.id == row.id))
            drop_gate(conn, name, version)
            still_used = {digest for r in conn.execute(select(model_versions)) for digest in row_digests(r)}
        self._blobs.discard(set(row_digests(row)) - still_used)
        return removed

    def verify(self, mv: ModelVersion) -> None:
        """Hash the files of ``mv`` again (its model file and every companion); ChecksumMismatchError
        naming the first that changed or went missing."""
        check_files(mv.files(), mv.ref, remedy_for(mv.ref))

    def _existing(
        self, name: str, version: str | None, main: Blob, extras: dict[str, Blob]
    ) -> ModelVersion | None:
        """The version that already holds this content, or ConflictError if ``version`` is taken."""
        identity = (main.sha256, {role: b.sha256 for role, b in extras.items()})
        with self._store.begin() as conn:
            rows = version_rows(conn, name)
            aliases = aliases_by_version(conn, name)
        same = [r for r in rows if (r.sha256, extra_digests(r)) == identity]
        if version is None:
            return version_from_row(same[-1], self._blob_dir, aliases) if same else None
        taken = next((r for r in rows if r.version == version), None)
        if taken is not None and taken in same:
            return version_from_row(taken, self._blob_dir, aliases)
        if taken is not None:
            raise ConflictError(
                f"{name}@{version} is already registered with other content (sha256 {taken.sha256[:12]}…); "
                f"give another --version, or `lamina models rm {name}@{version}` first",
                param="version",
            )
        if _is_alias(version, aliases):
            raise ConflictError(f"{name}@{version} is already an alias; give another --version")
        return None

    def _store_version(
        self,
        name: str,
        version: str | None,
        fmt: ModelFormat,
        meta: dict[str, Any],
        main: Blob,
        extras: dict[str, Blob],
        gate: GateRecord | None = None,
    ) -> ModelVersion:
        """Move the files into place, then insert the row (and a variant's gate record); on failure remove
        the files it added."""
        with self._blobs.placing([main, *extras.values()]), self._store.begin() as conn:
            if version is None:
                version = next_version(version_rows(conn, name))
            conn.execute(
                insert(model_versions).values(
                    name=name,
                    version=version,
                    format=fmt,
                    sha256=main.sha256,
                    size_bytes=main.size_bytes,
                    source=main.fetched.source,
                    path=main.relpath,
                    extra_files={role: _extra_record(b) for role, b in extras.items()},
                    meta=meta,
                    created_at=self._clock(),
                )
            )
            if gate is not None:
                write_gate(conn, name, version, gate)
        return self.get(f"{name}@{version}", refused_ok=True)


def _is_alias(version: str, aliases: AliasMap) -> bool:
    return any(version in names for names in aliases.values())


def _extra_record(blob: Blob) -> dict[str, Any]:
    return {
        "path": blob.relpath,
        "sha256": blob.sha256,
        "size_bytes": blob.size_bytes,
        "source": blob.fetched.source,
    }


def _check_companions(source: str, fmt: ModelFormat, meta: dict[str, Any], extras: dict[str, Blob]) -> None:
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
