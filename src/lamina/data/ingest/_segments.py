"""Segments: a large text read as pieces of about ``size`` bytes, cut where cleaning can join them exactly.

A file of text is cleaned, chunked and embedded a segment at a time, so an ingest's memory does not grow
with the size of a file. A cut is placed, by preference, in a paragraph break, else in a line break, else
in a run of spaces, each lying between two printable ASCII characters; failing those, between two
printable ASCII characters. Such a cut changes nothing: cleaning the whole text gives the cleaned
segments joined by what that whitespace run becomes (``joiner``), with the same byte offsets, because
ASCII never combines with its neighbours under NFKC and the run is whole on one side of the cut. Only a
stretch of ``size / 2`` bytes with no printable ASCII at all (and no line break) is cut at a plain UTF-8
character boundary, where a combining mark could be parted from its base. A chunk never crosses a cut.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from lamina.data.ingest._clean import whitespace_replacement

#: smallest segment size a caller may ask for (tests use small ones to cut small texts)
MIN_SEGMENT_BYTES = 1024
_BOM = b"\xef\xbb\xbf"
#: a whole whitespace run between two printable ASCII characters (possessive: no backtracking)
_RUN = re.compile(rb"(?<=[\x21-\x7e])[ \t\r\n\x0b\x0c]++(?=[\x21-\x7e])")
#: line breaks a run must hold, by preference: a paragraph break, a line break, any spaces
_RUN_BREAKS = (2, 1, 0)
#: failing those: between two printable ASCII characters, else at a UTF-8 character boundary
_POINTS = (re.compile(rb"(?<=[\x21-\x7e])(?=[\x21-\x7e])"), re.compile(rb"(?=[^\x80-\xbf])"))
#: how far back from a segment's end a cut is looked for first (most texts have one within 4 KB)
_LOOKBACK = (4096, 65536)


@dataclass(frozen=True, slots=True)
class Segment:
    """A stretch of a source's bytes and how its cleaned text joins the previous segment's."""

    data: bytes
    #: byte offset of ``data`` in the source
    start: int
    #: what the whitespace between the previous segment and this one becomes ("" for the first)
    joiner: str


@dataclass(frozen=True, slots=True)
class _Cut:
    at: int
    joiner: str


def _windows(lo: int, hi: int) -> Iterator[int]:
    """Where to start looking for a cut in ``(lo, hi]``: close to ``hi`` first, then wider."""
    for width in _LOOKBACK:
        if hi - width <= lo:
            break
        yield hi - width
    yield lo


def _last_run(data: bytearray, lo: int, hi: int, breaks: int) -> re.Match[bytes] | None:
    """The last whitespace run ending in ``(lo, hi]`` holding at least ``breaks`` line breaks."""
    for start in _windows(lo, hi):
        found = None
        for match in _RUN.finditer(data, start, hi + 1):
            if match.end() > lo and match.group().count(b"\n") >= breaks:
                found = match
        if found is not None:
            return found
    return None


def _last_point(pattern: re.Pattern[bytes], data: bytearray, lo: int, hi: int) -> int | None:
    for start in _windows(lo, hi):
        found = deque((m.end() for m in pattern.finditer(data, start, hi + 1) if m.end() > lo), maxlen=1)
        if found:
            return found[0]
    return None


def _cut(data: bytearray, size: int) -> _Cut:
    """Where to end a segment of ``data`` (longer than ``size``): in its second half, at a preferred cut."""
    lo, hi = size // 2, size
    for breaks in _RUN_BREAKS:
        run = _last_run(data, lo, hi, breaks)
        if run is not None:
            return _Cut(run.end(), whitespace_replacement(run.group().decode("ascii"), at_edge=False))
    for pattern in _POINTS:
        point = _last_point(pattern, data, lo, hi)
        if point is not None:
            return _Cut(point, "")
    return _Cut(size, "")  # not UTF-8 here: decoding the segment will say so


def segments(stream: BinaryIO, size: int, *, skip_bom: bool = False) -> Iterator[Segment]:
    """The segments of ``stream``'s bytes, each at most ``size`` bytes; one (perhaps empty) at least."""
    buf = bytearray(stream.read(size + 1))
    start = 0
    if skip_bom and buf.startswith(_BOM):
        del buf[: len(_BOM)]
        buf += stream.read(len(_BOM))
        start = len(_BOM)
    joiner = ""
    while len(buf) > size:
        cut = _cut(buf, size)
        yield Segment(bytes(buf[: cut.at]), start, joiner)
        del buf[: cut.at]
        buf += stream.read(size + 1 - len(buf))
        start, joiner = start + cut.at, cut.joiner
    yield Segment(bytes(buf), start, joiner)
