"""The spool: chunk texts kept on disk between planning a version and embedding its new chunks.

A run plans every chunk before it embeds any (so that it knows whether anything changed, and how many
chunks the progress bar counts to), and a large file has more chunk text than a run should hold in
memory. So a planned chunk keeps only where its text lies in this anonymous temporary file (in the
system's temporary directory, gone when the run ends), and the embedding step reads the texts back a
batch at a time.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from typing import IO

from lamina.data.ingest._records import SpoolSlice


class Spool:
    """Append-only text storage for one run (the file is made at the first write); close it at the end."""

    def __init__(self) -> None:
        self._file: IO[bytes] | None = None
        self._end = 0

    def write(self, text: str) -> SpoolSlice:
        if self._file is None:
            self._file = tempfile.TemporaryFile()  # noqa: SIM115 (held for the run, closed by close())
        data = text.encode("utf-8", "surrogatepass")
        self._file.seek(self._end)
        self._file.write(data)
        where = SpoolSlice(self._end, len(data))
        self._end += len(data)
        return where

    def read(self, slices: Sequence[SpoolSlice]) -> list[str]:
        texts = []
        for where in slices:
            if self._file is None:
                raise LookupError("nothing was written to this spool")
            self._file.seek(where.offset)
            texts.append(self._file.read(where.length).decode("utf-8", "surrogatepass"))
        return texts

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
