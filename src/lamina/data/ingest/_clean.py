"""Cleaning: Unicode normalisation and whitespace, keeping a map back to the source's bytes.

A chunk's byte span must point into the source, not into the cleaned text a person never sees. So the
cleaner returns, for every character of its output, the byte range of the source text it came from: a
character copied as it is maps to itself, a normalised character to the character (or combining
sequence) it replaced, and a collapsed whitespace run to the whole run. A chunk covering output
characters ``[s, e)`` then spans source bytes ``[starts[s], ends[e - 1])``.

The rules, in order: NFKC normalisation (folds ligatures, full-width forms and compatibility characters,
so that equal-looking text hashes and de-duplicates equally), applied to each base character with the
combining marks that follow it; control characters other than whitespace removed; every whitespace run
becomes ``"\\n\\n"`` if it holds two or more line breaks, ``"\\n"`` if one, else one space; leading and
trailing whitespace removed.

The work is done on numpy arrays of code points, a few bytes per character, rather than on Python lists
of ints (tens of bytes per character): the pipeline cleans a large file a segment at a time, and this
keeps a segment's cost small and independent of the file.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
_BoolArray = npt.NDArray[np.bool_]
_CodePoints = npt.NDArray[np.uint32]

_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
_BREAK_CODES = np.array(sorted(ord(c) for c in _BREAKS), dtype=np.uint32)
#: the highest code point ``str.isspace`` (and so the regex ``\s``) accepts is U+3000
_SPACE_MAX = 0x3000
_IS_SPACE = np.array([chr(c).isspace() for c in range(_SPACE_MAX + 1)], dtype=np.bool_)
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
_TEXT, _SPACE, _CONTROL = 0, 1, 2


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


def _code_points(text: str) -> _CodePoints:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


def char_byte_offsets(text: str, base: int = 0) -> IntArray:
    """UTF-8 byte offset of each character of ``text`` and of its end (``len(text) + 1`` entries)."""
    if text.isascii():
        return np.arange(base, base + len(text) + 1, dtype=np.int64)
    cp = _code_points(text)
    widths = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    offsets = np.empty(len(text) + 1, dtype=np.int64)
    offsets[0] = base
    np.cumsum(widths, out=offsets[1:])
    offsets[1:] += base
    return offsets


def _normalize(text: str) -> tuple[str, IntArray | None, IntArray | None]:
    """NFKC text and, per output character, the source character range it came from (None: unchanged).

    Each base character is normalised with the combining marks after it (its group); every output
    character of a group that NFKC changes comes from the group's whole range. ASCII characters never
    change and never combine with what follows, so only the stretches of non-ASCII characters (with the
    character before each, the base its marks may combine with) that are not already normalised go
    through the loop over groups. It records only the characters that change; the ranges are then two
    ``np.repeat`` over the whole text (about three times faster than arrays built stretch by stretch).
    """
    if unicodedata.is_normalized("NFKC", text):
        return text, None, None
    parts: list[str] = []
    #: the changed characters: where each is, how many output characters it gives (0: a mark absorbed
    #: into the group before it) and where its group ends
    at: list[int] = []
    width: list[int] = []
    until: list[int] = []
    pos = 0
    for m in _NON_ASCII.finditer(text):
        a, b = max(m.start() - 1, 0), m.end()
        if unicodedata.is_normalized("NFKC", text[a:b]):
            continue
        parts.append(text[pos:a])
        i = a
        while i < b:
            j = i + 1
            while j < b and unicodedata.combining(text[j]):
                j += 1
            group = text[i:j]
            piece = unicodedata.normalize("NFKC", group)
            parts.append(piece)
            if piece != group:  # an unchanged group keeps its characters' own ranges
                at += range(i, j)
                width += [len(piece)] + [0] * (j - i - 1)
                until += [j] * (j - i)
            i = j
        pos = b
    if not parts:
        return text, None, None
    parts.append(text[pos:])
    count = np.ones(len(text), dtype=np.int64)
    end = np.arange(1, len(text) + 1, dtype=np.int64)
    changed = np.asarray(at, dtype=np.int64)
    count[changed] = width
    end[changed] = until
    return "".join(parts), np.repeat(np.arange(len(text), dtype=np.int64), count), np.repeat(end, count)


def whitespace_replacement(run: str, at_edge: bool) -> str:
    """What a run of whitespace or of control characters becomes."""
    if at_edge or not run.isspace():
        return ""  # leading/trailing whitespace and control characters go
    breaks = sum(1 for c in run if c in _BREAKS) - run.count("\r\n")
    return "\n\n" if breaks >= 2 else "\n" if breaks == 1 else " "


@dataclass(frozen=True, slots=True)
class _Runs:
    """The maximal runs of whitespace and of control characters in a text, and what each becomes."""

    start: IntArray
    end: IntArray
    #: characters each run is replaced with (0, 1 or 2), all of them ``char``
    length: IntArray
    char: _CodePoints


def _kinds(cp: _CodePoints) -> npt.NDArray[np.int8]:
    """Per character: text, whitespace or control, as the pattern ``\\s+|[controls]+`` splits runs.

    U+001C..U+001F and U+0085 are both whitespace and controls: they continue the run before them (a
    run of either kind), and start a whitespace run after text.
    """
    space = np.zeros(len(cp), dtype=np.bool_)
    low = cp <= _SPACE_MAX
    space[low] = _IS_SPACE[cp[low]]
    control = (cp <= 0x08) | ((cp >= 0x0E) & (cp <= 0x1F)) | ((cp >= 0x7F) & (cp <= 0x9F))
    kind = np.where(space, _SPACE, np.where(control, _CONTROL, _TEXT)).astype(np.int8)
    both = space & control
    if both.any():
        decided = np.where(both, 0, np.arange(len(cp)))
        np.maximum.accumulate(decided, out=decided)
        before = kind[decided]  # the kind of the nearest character before that is not both
        follows_control = (before == _CONTROL) & ~both[decided]
        kind[both & follows_control] = _CONTROL
    return kind


def _runs(cp: _CodePoints, kind: npt.NDArray[np.int8]) -> _Runs:
    n = len(cp)
    change = np.ones(n, dtype=np.bool_)
    change[1:] = kind[1:] != kind[:-1]
    bounds = np.flatnonzero(change)
    bound_ends = np.append(bounds[1:], n)
    is_run = kind[bounds] != _TEXT
    start, end = bounds[is_run].astype(np.int64), bound_ends[is_run].astype(np.int64)
    if len(start) == 0:
        empty = np.empty(0, dtype=np.int64)
        return _Runs(empty, empty, empty, np.empty(0, dtype=np.uint32))
    breaks_at = np.isin(cp, _BREAK_CODES).view(np.int8)
    breaks_at[:-1] -= (cp[:-1] == 0x0D) & (cp[1:] == 0x0A)  # CR LF is one line break
    # breaks occur only inside whitespace runs, so each run's sum may go on to the next run
    breaks = np.add.reduceat(breaks_at, start, dtype=np.int64)
    at_edge = (start == 0) | (end == n)
    space = (kind[start] == _SPACE) & ~at_edge
    length = np.where(space, np.where(breaks >= 2, 2, 1), 0).astype(np.int64)
    char = np.where(breaks >= 1, ord("\n"), ord(" ")).astype(np.uint32)
    return _Runs(start, end, length, char)


def clean_text(text: str, *, base: int = 0) -> CleanText:
    """Normalise and tidy ``text``; ``base`` is the byte offset of ``text`` in its source (e.g. a BOM)."""
    offsets = char_byte_offsets(text, base)
    norm, src_start, src_end = _normalize(text)
    cp = _code_points(norm)
    kind = _kinds(cp)
    runs = _runs(cp, kind)
    index = np.int32 if len(cp) < 2**31 else np.int64  # positions, at half the memory where they fit
    count = (kind == _TEXT).view(np.int8)
    count[runs.start] = runs.length
    out = np.repeat(np.arange(len(cp), dtype=index), count)  # output character -> norm position
    is_text = kind[out] == _TEXT
    if not is_text.any():
        empty = np.empty(0, dtype=np.int64)
        return CleanText("", empty, empty)
    lead, stop = int(np.argmax(is_text)), len(is_text) - int(np.argmax(is_text[::-1]))
    out, is_text = out[lead:stop], is_text[lead:stop]  # whitespace left at an edge once controls went
    chars = cp[out]
    runs_out = ~is_text
    run_char = np.zeros(len(cp), dtype=np.uint32)
    run_char[runs.start] = runs.char
    chars[runs_out] = run_char[out[runs_out]]
    del run_char
    # a replaced run spans from its first character's start to its last character's end
    last = np.arange(len(cp), dtype=index)
    last[runs.start] = runs.end - 1
    starts = out if src_start is None else src_start[out]
    ends = last[out] + 1 if src_end is None else src_end[last[out]]
    return CleanText(
        text=chars.astype("<u4").tobytes().decode("utf-32-le", "surrogatepass"),
        starts=offsets[starts],
        ends=offsets[ends],
    )


def join_clean(pieces: Sequence[CleanText], joiners: Sequence[str]) -> CleanText:
    """Cleaned segments of one text as one: ``joiners[i]`` goes before piece ``i`` (not before the first).

    A joiner stands for the whitespace between two segments, so its characters span the bytes between
    the previous piece's last character and the next piece's first, as cleaning the whole text maps them.
    """
    texts: list[str] = []
    starts: list[IntArray] = []
    ends: list[IntArray] = []
    previous: CleanText | None = None
    for piece, joiner in zip(pieces, joiners, strict=True):
        if not piece.text:
            continue
        if previous is not None and joiner:
            texts.append(joiner)
            starts.append(np.full(len(joiner), previous.ends[-1], dtype=np.int64))
            ends.append(np.full(len(joiner), piece.starts[0], dtype=np.int64))
        texts.append(piece.text)
        starts.append(piece.starts)
        ends.append(piece.ends)
        previous = piece
    if previous is None:
        empty = np.empty(0, dtype=np.int64)
        return CleanText("", empty, empty)
    return CleanText("".join(texts), np.concatenate(starts), np.concatenate(ends))
