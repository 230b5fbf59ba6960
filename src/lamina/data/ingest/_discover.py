"""Which files an ingest reads: paths and globs to regular files inside the roots the user gave.

A root is a directory given (walked recursively), the directory of a file given, or the literal prefix of
a glob (``docs/**/*.md`` has root ``docs``). Symbolic links are refused, files and directories alike,
and so is any file whose real path is outside its root (a link in a parent directory): an ingest reads
only what the user pointed at. Only regular files are listed: a FIFO, a socket or a device is refused,
never opened. Hidden files and directories (a leading ``.``) are passed over silently; files of other
types are listed as skipped.

The walk never follows a symbolic link, and it enters each directory once, by its ``(st_dev, st_ino)``:
a directory bind-mounted inside itself (or reached twice through two patterns) cannot make it loop.
Globs are matched by this same walk (``**`` for any number of directories) rather than by ``glob``,
which follows links to directories. Each file keeps the ``(st_dev, st_ino)`` it was found with, so that
reading it can refuse whatever was swapped in since (``_reading``).
"""

from __future__ import annotations

import glob
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from pathlib import Path

from lamina.data.ingest._loaders import SUFFIXES
from lamina.data.ingest._records import Skipped, SourceFile

_SYMLINK = "symbolic link refused; give the path it points to"
_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a directory",
}


@dataclass
class Discovered:
    files: list[SourceFile] = field(default_factory=list)
    #: everything refused or skipped, with the reason
    refused: list[Skipped] = field(default_factory=list)
    roots: list[str] = field(default_factory=list)


def _split_glob(pattern: str) -> tuple[Path, tuple[str, ...]]:
    """A glob's literal root and the components after it (``docs/**/*.md``: ``docs``, ``("**", "*.md")``)."""
    parts = Path(pattern).parts
    first = next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts))
    return (Path(*parts[:first]) if first else Path()), parts[first:]


def _matches(parts: tuple[str, ...], pats: tuple[str, ...]) -> bool:
    """Whether path components ``parts`` match glob components ``pats`` (``**``: any number of parts)."""
    if not pats:
        return not parts
    if pats[0] == "**":
        return any(_matches(parts[i:], pats[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], pats[0]) and _matches(parts[1:], pats[1:])


def _may_match_below(parts: tuple[str, ...], pats: tuple[str, ...]) -> bool:
    """Whether something inside the directory ``parts`` may match ``pats``."""
    if not parts:
        return bool(pats)
    if not pats:
        return False
    if pats[0] == "**":
        return True
    return fnmatchcase(parts[0], pats[0]) and _may_match_below(parts[1:], pats[1:])


@dataclass(frozen=True, slots=True)
class _Glob:
    """A glob's components below its root; None walks everything (a directory given or matched)."""

    pats: tuple[str, ...] | None = None

    def takes_file(self, rel: tuple[str, ...]) -> bool:
        return self.pats is None or _matches(rel, self.pats)

    def enters(self, rel: tuple[str, ...]) -> bool:
        """Whether ``rel`` matches or may hold a match."""
        return self.pats is None or _matches(rel, self.pats) or _may_match_below(rel, self.pats)


@dataclass(frozen=True, slots=True)
class _Dir:
    path: Path
    #: components below the walk's top
    rel: tuple[str, ...]
    match: _Glob


class _Walker:
    def __init__(self) -> None:
        self.found = Discovered()
        self._seen: set[Path] = set()
        self._dirs: set[tuple[int, int]] = set()
        self._matched = 0
        self._walking: set[tuple[int, int]] = set()

    def refuse(self, path: Path | str, reason: str) -> None:
        self.found.refused.append(Skipped(str(path), reason))

    def file(self, path: Path, st: os.stat_result, root: Path) -> None:
        """A path that is not a symbolic link, with its ``lstat``."""
        if not stat.S_ISREG(st.st_mode):
            kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
            self.refuse(path, f"{kind}, not a regular file; only regular files are read")
            return
        real = path.resolve()
        if not real.is_relative_to(root):
            self.refuse(path, f"outside the given root {root}; refused")
            return
        if real in self._seen:
            return
        self._seen.add(real)
        if real.suffix.lower() not in SUFFIXES:
            self.refuse(path, f"unsupported file type; supported: {', '.join(SUFFIXES)}")
            return
        mtime = datetime.fromtimestamp(st.st_mtime, UTC)
        self.found.files.append(
            SourceFile(
                path=real, uri=real.as_uri(), size=st.st_size, mtime=mtime, device=st.st_dev, inode=st.st_ino
            )
        )

    def tree(self, top: Path, root: Path, match: _Glob = _Glob()) -> int:
        """Walk ``top`` (never through a link, each directory once); returns how many entries matched."""
        self._matched = 0
        self._walking = set()
        # the top may be a link the user gave (a glob's root); below it, O_NOFOLLOW refuses links
        pending = self._directory(_Dir(top, (), match), root, follow=True)[::-1]
        while pending:
            pending.extend(reversed(self._directory(pending.pop(), root, follow=False)))
        self._dirs |= self._walking
        return self._matched

    def _directory(self, here: _Dir, root: Path, *, follow: bool) -> list[_Dir]:
        """List one directory through a descriptor (so it cannot be swapped for a link while listed)."""
        flags = os.O_RDONLY | os.O_DIRECTORY | (0 if follow else os.O_NOFOLLOW)
        try:
            fd = os.open(here.path, flags)
        except OSError as exc:
            self.refuse(here.path, f"unreadable ({exc.strerror or exc})")
            return []
        try:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            if key in self._walking:
                self.refuse(here.path, "a directory met twice in one walk (a bind mount); skipped")
                return []
            if key in self._dirs:
                return []  # an earlier pattern listed it
            self._walking.add(key)
            entries = sorted(os.scandir(fd), key=lambda e: e.name)
            return [d for entry in entries if (d := self._entry(entry, here, root)) is not None]
        except OSError as exc:
            self.refuse(here.path, f"unreadable ({exc.strerror or exc})")
            return []
        finally:
            os.close(fd)

    def _entry(self, entry: os.DirEntry[str], here: _Dir, root: Path) -> _Dir | None:
        """Take one directory entry: a directory to walk is returned, a file is listed or refused."""
        rel, path = (*here.rel, entry.name), here.path / entry.name
        if entry.name.startswith("."):
            return None
        if entry.is_dir(follow_symlinks=False):
            if not here.match.enters(rel):
                return None
            whole = here.match.pats is not None and here.match.takes_file(rel)
            self._matched += whole
            return _Dir(path, rel, _Glob() if whole else here.match)
        if entry.is_symlink():  # matched, or a directory link the pattern would have looked into
            if here.match.enters(rel):
                self.refuse(path, _SYMLINK)
            return None
        if not here.match.takes_file(rel):
            return None
        self._matched += 1
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError as exc:
            self.refuse(path, f"unreadable ({exc.strerror or exc})")
            return None
        self.file(path, st, root)
        return None

    def path(self, path: Path, root: Path) -> None:
        try:
            st = path.lstat()
        except OSError as exc:
            missing = isinstance(exc, FileNotFoundError)
            self.refuse(path, "no such file or directory" if missing else f"unreadable ({exc.strerror})")
            return
        if stat.S_ISLNK(st.st_mode):
            self.refuse(path, _SYMLINK)
        elif stat.S_ISDIR(st.st_mode):
            self.tree(path, root)
        else:
            self.file(path, st, root)


def discover(patterns: Sequence[str]) -> Discovered:
    """The regular files the paths and globs name, in a stable order, with what was refused and why."""
    walker = _Walker()
    for pattern in patterns:
        if glob.has_magic(pattern):
            top, pats = _split_glob(os.path.expanduser(pattern))
            root = top.resolve()
            walker.found.roots.append(str(root))
            if not top.is_dir() or not walker.tree(top, root, _Glob(pats)):
                walker.refuse(pattern, "the pattern matches nothing")
            continue
        path = Path(pattern).expanduser()
        root = (path if path.is_dir() and not path.is_symlink() else path.parent).resolve()
        walker.found.roots.append(str(root))
        walker.path(path, root)
    walker.found.files.sort(key=lambda f: f.uri)
    return walker.found
