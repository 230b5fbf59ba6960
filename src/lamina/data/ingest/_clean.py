"""Cleaning: Unicode normalisation and whitespace, keeping a map back to the source's bytes.

A chunk's byte span must point into the source, not into the cleaned text a person never sees. So the
cleaner returns, for every character of its output, the byte range of the source text it came from: a
character copied as it is maps to itself, a normalised character to the character (or combining
sequence) it replaced, and a collapsed whitespace run to the whole run. A chunk covering output
characters ``[s, e)`` then spans source bytes ``[starts[s], ends[e - 1])``.

The rules, in order: NFKC normalisation (folds ligatures, full-width forms and compatibility characters,
so that equal-looking text hashes and de-duplicates equally); control characters other than whitespace
removed; every whitespace run becomes ``"\\n\\n"`` if it holds two or more line breaks, ``"\\n"`` if one, else
one space; leading and trailing whitespace removed.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]

_RUNS = re.compile(r"\s+|[\x00-\x08\x0e-\x1f\x7f-\x9f]+")
_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")


@dataclass(frozen=True, slots=True)
class CleanText:
    """Cleaned text and, per character, the source byte range it came from."""

    text: str
    #: byte offset in the source where output character i's origin starts
    starts: IntArray
    #: byte offset in the source where output character i's origin ends
    ends: IntArray

    def byte_span(self, start: int, end: int) -> tuple[int, int]:
        """Source bytes of the output characters ``[start, end)`` (``end > start``)."""
        return int(self.starts[start]), int(self.ends[end - 1])


def char_byte_offsets(text: str, base: int = 0) -> IntArray:
    """UTF-8 byte offset of each character of ``text`` and of its end (``len(text) + 1`` entries)."""
    if text.isascii():
        return np.arange(base, base + len(text) + 1, dtype=np.int64)
    widths = np.fromiter((len(c.encode("utf-8", "surrogatepass")) for c in text), np.int64, len(text))
    offsets = np.empty(len(text) + 1, dtype=np.int64)
    offsets[0] = base
    np.cumsum(widths, out=offsets[1:])
    offsets[1:] += base
    return offsets


def _normalize(text: str) -> tuple[str, list[int], list[int]]:
    """NFKC text and, per output character, the source character range it came from."""
    if unicodedata.is_normalized("NFKC", text):
        return text, list(range(len(text))), list(range(1, len(text) + 1))
    out: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    i = 0
    while i < len(text):
        j = i + 1  # a base character with the combining marks that follow it normalise together
        while j < len(text) and unicodedata.combining(text[j]):
            j += 1
        piece = unicodedata.normalize("NFKC", text[i:j])
        out.append(piece)
        starts += [i] * len(piece)
        ends += [j] * len(piece)
        i = j
    return "".join(out), starts, ends


def _replacement(run: str, at_edge: bool) -> str:
    if at_edge or not run.isspace():
        return ""  # leading/trailing whitespace and control characters go
    breaks = sum(1 for c in run if c in _BREAKS) - run.count("\r\n")
    return "\n\n" if breaks >= 2 else "\n" if breaks == 1 else " "


def clean_text(text: str, *, base: int = 0) -> CleanText:
    """Normalise and tidy ``text``; ``base`` is the byte offset of ``text`` in its source (e.g. a BOM)."""
    offsets = char_byte_offsets(text, base)
    norm, src_start, src_end = _normalize(text)
    out: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    pos = 0
    for m in _RUNS.finditer(norm):
        a, b = m.span()
        out.append(norm[pos:a])
        starts += src_start[pos:a]
        ends += src_end[pos:a]
        piece = _replacement(m.group(), at_edge=a == 0 or b == len(norm))
        out.append(piece)
        starts += [src_start[a]] * len(piece)
        ends += [src_end[b - 1]] * len(piece)
        pos = b
    out.append(norm[pos:])
    starts += src_start[pos:]
    ends += src_end[pos:]
    joined = "".join(out)
    # whitespace left at an edge once control characters next to it were removed
    lead = len(joined) - len(joined.lstrip())
    stop = len(joined.rstrip())
    return CleanText(
        text=joined[lead:stop],
        starts=offsets[np.asarray(starts[lead:stop], dtype=np.int64)],
        ends=offsets[np.asarray(ends[lead:stop], dtype=np.int64)],
    )
