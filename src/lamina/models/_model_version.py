"""One registered version as callers see it, and how it is read from its ``model_versions`` row.

A row's ``extra_files`` holds each companion file by role as ``{"path", "sha256", "size_bytes",
"source"}``. Rows that lack a companion's ``sha256`` still resolve it: every path the registry writes is a
content address (``sha256/<hex>``), which names the sha256 the file had when it was added. So older rows
need no migration, and a store shared by machines running different Lamina versions reads the same.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Row

from lamina.errors import RegistryError
from lamina.models._blobs import content_address
from lamina.models._checksums import MODEL_ROLE, RecordedFile
from lamina.models._formats import ModelFormat
from lamina.models._gate_record import GateMap, GateRecord

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*", re.IGNORECASE)


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
    #: the sha256 recorded for each companion file, by role
    extra_sha256: dict[str, str] = field(default_factory=dict)
    #: for a quantized variant: its parent, method and the accuracy gate's verdict; None for the others
    gate: GateRecord | None = None

    @property
    def servable(self) -> bool:
        """False for a variant that failed its accuracy gate: it never serves."""
        return self.gate is None or self.gate.passed

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def files(self) -> list[RecordedFile]:
        """The model file and its companions, each with the sha256 recorded at registration."""
        return [
            RecordedFile(MODEL_ROLE, self.path, self.sha256),
            *(self.companion(role) for role in self.extra_files),
        ]

    def companion(self, role: str) -> RecordedFile:
        return RecordedFile(role, self.extra_files[role], self.extra_sha256.get(role))

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
            "extra_sha256": dict(self.extra_sha256),
            "meta": copy.deepcopy(self.meta),  # callers may edit what they get
            "created_at": self.created_at.isoformat(),
            "aliases": list(self.aliases),
            "gate": None if self.gate is None else self.gate.to_json(),
        }


def check_name(kind: str, value: str, max_len: int = 100) -> str:
    """``value`` lower-cased, or a RegistryError saying which characters a name may hold."""
    if not _NAME.fullmatch(value) or len(value) > max_len:
        raise RegistryError(
            f"invalid {kind} {value!r}: use letters, digits, '.', '_' and '-', starting with a letter or "
            f"digit, at most {max_len} characters",
            param=kind,
        )
    return value.lower()


def version_from_row(
    row: Row[Any],
    blob_dir: Path,
    aliases: Mapping[tuple[str, str], Sequence[str]],
    gates: GateMap | None = None,
) -> ModelVersion:
    companions = {role: _companion(info) for role, info in row.extra_files.items()}
    return ModelVersion(
        name=row.name,
        version=row.version,
        format=row.format,
        sha256=row.sha256,
        size_bytes=row.size_bytes,
        source=row.source,
        path=blob_dir / row.path,
        extra_files={role: blob_dir / rel for role, (rel, _) in companions.items()},
        meta=row.meta,
        created_at=row.created_at,
        aliases=tuple(sorted(aliases.get((row.name, row.version), ()))),
        extra_sha256={role: sha for role, (_, sha) in companions.items() if sha is not None},
        gate=(gates or {}).get((row.name, row.version)),
    )


def extra_digests(row: Row[Any]) -> dict[str, str | None]:
    """The sha256 of each companion file of ``row``, by role."""
    return {role: _companion(info)[1] for role, info in row.extra_files.items()}


def row_digests(row: Row[Any]) -> list[str]:
    """Every blob ``row`` uses: its model file and its companions."""
    return [row.sha256, *(d for d in extra_digests(row).values() if d is not None)]


def _companion(info: Any) -> tuple[str, str | None]:
    """A companion's recorded path and sha256; the sha256 from its content address when not recorded."""
    rel = str(info if isinstance(info, str) else info["path"])
    recorded = None if isinstance(info, str) else info.get("sha256")
    return rel, str(recorded) if recorded else content_address(rel)
