"""Files checked against the sha256 the registry recorded for them.

The registry hashes every file it stores: the model file and its companions (a tokenizer, an ONNX model's
external data). Whatever loads them hashes them again first and refuses a file that changed: the replica
worker (exit 3), the in-process embedder, and ``lamina models verify``. This module stays light (hashlib
only) because the worker imports it before it loads anything.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lamina.errors import ChecksumMismatchError

#: the role of a version's model file; its companions have their own roles (``tokenizer``, ...)
MODEL_ROLE = "model"

_CHUNK = 1 << 20


@dataclass(frozen=True)
class RecordedFile:
    """A file of a registered version and the sha256 recorded for it (None: none was recorded)."""

    role: str
    path: Path
    sha256: str | None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_problem(file: RecordedFile, owner: str, remedy: str) -> str | None:
    """Why ``file`` of ``owner`` must not be loaded, or None when its bytes hash to the recorded sha256."""
    what = f"{file.role} file {file.path} of {owner}"
    if file.sha256 is None:
        return f"{what} has no sha256 in the registry, so it cannot be checked; {remedy}"
    try:
        actual = sha256_file(file.path)
    except FileNotFoundError:
        actual = "no file at all"
    if actual == file.sha256.lower():
        return None
    return (
        f"{what} no longer matches its sha256 recorded at registration (expected {file.sha256}, got "
        f"{actual}); it was changed or damaged: {remedy}"
    )


def check_files(files: Iterable[RecordedFile], owner: str, remedy: str) -> None:
    """Hash each file again; ChecksumMismatchError naming the first that changed or went missing."""
    for file in files:
        problem = file_problem(file, owner, remedy)
        if problem is not None:
            raise ChecksumMismatchError(problem)


def remedy_for(ref: str) -> str:
    """What to do about a changed file of the registered version ``ref``."""
    return f"`lamina models rm {ref}` and add it again (or restore the file)"
