"""Reading a discovered file: the same regular file discovery saw, in bounded pieces, hashed as it is read.

A file is opened with ``O_NOFOLLOW`` (a symbolic link swapped in since discovery is refused, not
followed) and ``O_NONBLOCK`` (a FIFO swapped in cannot block the run), and the descriptor is checked:
it must be a regular file with the ``(st_dev, st_ino)`` discovery recorded, so a file replaced through a
parent directory is refused too. What is read comes from that descriptor only.

A file is read twice through the one descriptor: first to hash it (a file whose hash the previous
version holds is not parsed at all), then by its loader. The second pass hashes again; a file that
changed in between is refused rather than recorded under a hash its chunks do not come from.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
from typing import TYPE_CHECKING, BinaryIO

from lamina.data.ingest._loaders import Unloadable
from lamina.data.ingest._records import SourceFile

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

_BLOCK = 1 << 20


def _too_large(size: int, limit: int) -> Unloadable:
    return Unloadable(f"too large ({size} bytes > max_file_bytes {limit})")


def _check(st: os.stat_result, file: SourceFile, limit: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise Unloadable("no longer a regular file (replaced since it was listed); refused")
    if (st.st_dev, st.st_ino) != (file.device, file.inode):
        raise Unloadable("replaced by another file since it was listed; refused, ingest again to read it")
    if st.st_size > limit:
        raise _too_large(st.st_size, limit)


def open_source(file: SourceFile, limit: int) -> io.FileIO:
    """``file`` opened for reading, or ``Unloadable`` with the reason it may not be read."""
    if file.size > limit:
        raise _too_large(file.size, limit)
    try:
        _check(os.lstat(file.path), file, limit)  # refuse a device before opening it, too
        fd = os.open(file.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Unloadable("replaced by a symbolic link since it was listed; refused") from exc
        raise Unloadable(f"unreadable ({exc.strerror or exc})") from exc
    try:
        _check(os.fstat(fd), file, limit)
    except BaseException:
        os.close(fd)
        raise
    return io.FileIO(fd, "rb", closefd=True)


class _Hashing(io.RawIOBase):
    """The bytes of a file as they are read, hashed and counted; more than ``limit`` is refused."""

    def __init__(self, raw: io.FileIO, limit: int) -> None:
        super().__init__()
        self._raw = raw
        self._limit = limit
        self.sha256 = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        n = self._raw.readinto(buffer) or 0
        self.sha256.update(memoryview(buffer)[:n])
        self.size += n
        if self.size > self._limit:
            raise Unloadable(
                f"too large (more than max_file_bytes {self._limit}; it grew since it was listed)"
            )
        return n


class HashedRead:
    """One pass over an open file from its start: a buffered stream of it, hashed as it is read."""

    def __init__(self, raw: io.FileIO, limit: int) -> None:
        raw.seek(0)
        self._hashing = _Hashing(raw, limit)
        self.stream: BinaryIO = io.BufferedReader(self._hashing, _BLOCK)

    def finish(self) -> str:
        """Read what the loader left, and return the sha256 of the whole file."""
        while self.stream.read(_BLOCK):
            pass
        return self._hashing.sha256.hexdigest()

    @property
    def size(self) -> int:
        return self._hashing.size
