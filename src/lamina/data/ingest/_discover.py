"""Which files an ingest reads: paths and globs to regular files inside the roots the user gave.

A root is a directory given (walked recursively), the directory of a file given, or the literal prefix of
a glob (``docs/**/*.md`` has root ``docs``). Symbolic links are refused, files and directories alike,
and so is any file whose real path is outside its root (a link in a parent directory, a bind mount):
an ingest reads only what the user pointed at. Hidden files and directories (a leading ``.``) are passed
over silently; files of other types are listed as skipped.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from lamina.data.ingest._loaders import SUFFIXES


@dataclass(frozen=True, slots=True)
class SourceFile:
    path: Path
    uri: str
    size: int
    mtime: datetime


@dataclass
class Discovered:
    files: list[SourceFile] = field(default_factory=list)
    #: (path, reason) of everything refused or skipped
    refused: list[tuple[str, str]] = field(default_factory=list)
    roots: list[str] = field(default_factory=list)


def _glob_root(pattern: str) -> Path:
    parts = Path(pattern).parts
    literal = [p for p in parts[: next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts))]]
    return Path(*literal) if literal else Path()


class _Walker:
    def __init__(self) -> None:
        self.found = Discovered()
        self._seen: set[Path] = set()

    def file(self, path: Path, root: Path) -> None:
        if path.name.startswith("."):
            return
        if path.is_symlink():
            self.found.refused.append((str(path), "symbolic link refused; give the file it points to"))
            return
        real = path.resolve()
        if not real.is_relative_to(root):
            self.found.refused.append((str(path), f"outside the given root {root}; refused"))
            return
        if real in self._seen:
            return
        self._seen.add(real)
        if real.suffix.lower() not in SUFFIXES:
            self.found.refused.append((str(path), f"unsupported file type; supported: {', '.join(SUFFIXES)}"))
            return
        try:
            st = real.stat()
        except OSError as exc:
            self.found.refused.append((str(path), f"unreadable ({exc.strerror})"))
            return
        mtime = datetime.fromtimestamp(st.st_mtime, UTC)
        self.found.files.append(SourceFile(path=real, uri=real.as_uri(), size=st.st_size, mtime=mtime))

    def tree(self, top: Path, root: Path) -> None:
        for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
            here = Path(dirpath)
            for name in list(dirnames):
                if name.startswith(".") or (here / name).is_symlink():
                    if not name.startswith("."):
                        self.found.refused.append((str(here / name), "symbolic link refused"))
                    dirnames.remove(name)
            dirnames.sort()
            for name in sorted(filenames):
                self.file(here / name, root)

    def path(self, path: Path, root: Path) -> None:
        if path.is_symlink():
            self.found.refused.append((str(path), "symbolic link refused; give the file it points to"))
        elif path.is_dir():
            self.tree(path, root)
        elif path.exists():
            self.file(path, root)
        else:
            self.found.refused.append((str(path), "no such file or directory"))


def discover(patterns: Sequence[str]) -> Discovered:
    """The regular files the paths and globs name, in a stable order, with what was refused and why."""
    walker = _Walker()
    for pattern in patterns:
        if glob.has_magic(pattern):
            root = _glob_root(pattern).resolve()
            walker.found.roots.append(str(root))
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                walker.found.refused.append((pattern, "the pattern matches nothing"))
            for match in matches:
                walker.path(Path(match), root)
            continue
        path = Path(pattern).expanduser()
        root = (path if path.is_dir() and not path.is_symlink() else path.parent).resolve()
        walker.found.roots.append(str(root))
        walker.path(path, root)
    walker.found.files.sort(key=lambda f: f.uri)
    return walker.found
