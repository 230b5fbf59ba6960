"""The registry's files, content-addressed under its blob directory as ``sha256/<hex>``.

Two versions of the same bytes share one file, and a damaged file is caught by hashing it again. Paths
are recorded relative to the blob directory: a PostgreSQL store shared by machines whose state
directories differ still resolves them.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lamina.errors import RegistryError
from lamina.models._checksums import sha256_file
from lamina.models._sources import Fetched

#: the folder of the blob directory that holds files by their sha256
BLOBS = "sha256"

_HEX64 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Blob:
    """A fetched file and its hash: what a version is made of, before it is stored."""

    fetched: Fetched
    sha256: str
    size_bytes: int

    @classmethod
    def of(cls, fetched: Fetched) -> Blob:
        """``fetched`` with its sha256 (hashed now unless the download already hashed it)."""
        digest = fetched.sha256 or sha256_file(fetched.path)
        return cls(fetched, digest, fetched.path.stat().st_size)

    @property
    def relpath(self) -> str:
        """Where the blob lives, relative to the blob directory."""
        return f"{BLOBS}/{self.sha256}"


def content_address(relpath: str) -> str | None:
    """The sha256 a recorded path names (``sha256/<hex>``), or None for a path that names none."""
    path = PurePosixPath(relpath)
    if path.parent == PurePosixPath(BLOBS) and _HEX64.fullmatch(path.name):
        return path.name
    return None


class BlobStore:
    """Files by sha256 under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, digest: str) -> Path:
        return self.root / BLOBS / digest

    @contextmanager
    def placing(self, blobs: Iterable[Blob]) -> Iterator[None]:
        """Put ``blobs`` in place for the block; if the block fails, remove the files this call added."""
        added: list[Path] = []
        try:
            for blob in blobs:
                if self._put(blob):
                    added.append(self.path(blob.sha256))
            yield
        except BaseException:
            for path in added:
                path.unlink(missing_ok=True)
            raise

    def discard(self, digests: Iterable[str]) -> None:
        for digest in digests:
            self.path(digest).unlink(missing_ok=True)

    def _put(self, blob: Blob) -> bool:
        """Place ``blob`` at its content address; False if an intact copy was already there."""
        target = self.path(blob.sha256)
        if target.is_file() and sha256_file(target) == blob.sha256:
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        if blob.fetched.temporary:  # a download or a rewrite, already hashed and on this file system
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
