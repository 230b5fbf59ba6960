"""Loaders: a source file's bytes to pieces of clean text, or the reason it cannot be read.

One loader per suffix, each reading a stream, so that no file is held whole where that can be avoided.
``.txt`` and ``.md`` are one document each, read a segment (about ``segment_bytes``) at a time
(``_segments``), and their byte spans are offsets into the file itself. ``.jsonl`` (one document per
line, ``#line=N``, the record's text field) and ``.csv`` (one document per row, ``#row=N`` counting data
rows from 1, the row's text field) are read a record at a time. Derived text has no offsets into the
file, so its spans refer to the text the loader extracted: ``.html`` (text outside tags, scripts and
styles, block elements ending lines, via the standard library's ``html.parser``) and ``.pdf`` (one
document per page, ``#page=N``, the page's text as ``pypdf`` extracts it); both parse the file whole.

A loader yields ``Piece`` s: a whole small document, or one segment of a large one. A file-level
problem raises ``Unloadable`` with the reason (even after some pieces were yielded: the caller drops
them); a record-level one (a JSONL line that is not an object, metadata a store cannot hold) yields a
``Skipped`` for that record and the file goes on.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import BinaryIO

from lamina.data.ingest._clean import CleanText, clean_text, join_clean
from lamina.data.ingest._records import Skipped
from lamina.data.ingest._segments import MIN_SEGMENT_BYTES, segments
from lamina.data.vectors import Scalar, check_metadata
from lamina.errors import InvalidRequestError

SUFFIXES = (".txt", ".md", ".html", ".htm", ".pdf", ".jsonl", ".csv")
_SNIFF_BYTES = 8192
_BOM = b"\xef\xbb\xbf"
_BINARY = "binary file (NUL bytes); only text, HTML, PDF, JSONL and CSV are ingested"


class Unloadable(Exception):
    """A source file that yields no document; ``reason`` says why, for the ingest report."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class LoadOptions:
    """How files become documents: the fields of record formats (JSONL, CSV), the size of segments."""

    text_field: str = "text"
    meta_fields: tuple[str, ...] = ()
    #: large texts are cleaned, chunked and embedded this many bytes at a time (about)
    segment_bytes: int = 1_000_000

    def __post_init__(self) -> None:
        if self.segment_bytes < MIN_SEGMENT_BYTES:
            raise InvalidRequestError(
                f"segment_bytes {self.segment_bytes} is too small; use {MIN_SEGMENT_BYTES} or more",
                param="segment_bytes",
            )


@dataclass(frozen=True, slots=True)
class Piece:
    """Clean text from one place in a source (the file, a page, a line, a row), or a segment of it."""

    uri: str
    clean: CleanText
    metadata: Mapping[str, Scalar] = field(default_factory=dict)
    #: True for a document's first piece; a later one continues the document before it
    first: bool = True
    #: what separates this piece's text from the previous piece's in the document
    joiner: str = ""


@dataclass(frozen=True, slots=True)
class Document:
    """Clean text from one place in a source: the whole file, a page, a line or a row."""

    uri: str
    clean: CleanText
    metadata: Mapping[str, Scalar] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.clean.text


@dataclass(frozen=True, slots=True)
class Loaded:
    documents: list[Document]
    #: records skipped inside the file, with the reason
    skipped: list[Skipped] = field(default_factory=list)


def _decode(data: bytes, start: int = 0) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Unloadable(f"not valid UTF-8 at byte {exc.start + start}; convert it to UTF-8") from exc


def _sniff(data: bytes, start: int) -> None:
    if start < _SNIFF_BYTES and b"\x00" in data[: _SNIFF_BYTES - start]:
        raise Unloadable(_BINARY)


def _stream_pieces(
    uri: str, stream: BinaryIO, size: int, metadata: Mapping[str, Scalar], *, raw_file: bool
) -> Iterator[Piece]:
    """The pieces of one document whose UTF-8 bytes ``stream`` holds, a segment at a time."""
    for n, seg in enumerate(segments(stream, size, skip_bom=raw_file)):
        if raw_file:
            _sniff(seg.data, seg.start)
            text = _decode(seg.data, seg.start)
        else:  # text we encoded ourselves, lone surrogates (from JSON escapes) included
            text = seg.data.decode("utf-8", "surrogatepass")
        yield Piece(uri, clean_text(text, base=seg.start), metadata, first=n == 0, joiner=seg.joiner)


def _text_pieces(
    uri: str, text: str, size: int, metadata: Mapping[str, Scalar] | None = None
) -> Iterator[Piece]:
    """The pieces of a document given as a string (spans: its UTF-8 bytes)."""
    if len(text) <= size // 4:  # at most ``size`` bytes: one segment
        yield Piece(uri, clean_text(text), metadata or {})
        return
    data = io.BytesIO(text.encode("utf-8", "surrogatepass"))
    yield from _stream_pieces(uri, data, size, metadata or {}, raw_file=False)


def _load_text(uri: str, stream: BinaryIO, options: LoadOptions) -> Iterator[Piece | Skipped]:
    yield from _stream_pieces(uri, stream, options.segment_bytes, {}, raw_file=True)


def _whole(stream: BinaryIO) -> str:
    data = stream.read()
    _sniff(data, 0)
    base = len(_BOM) if data.startswith(_BOM) else 0
    return _decode(data[base:], base)


class _HTMLText(HTMLParser):
    """The visible text of an HTML page, block elements separated by line breaks."""

    _SKIP = frozenset({"script", "style", "noscript", "template", "head"})
    _BLOCK = frozenset(
        {"p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article", "header", "footer"}
        | {"h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "title", "hr", "dd", "dt"}
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skipping += 1
        elif tag in self._BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skipping = max(0, self._skipping - 1)
        elif tag in self._BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data)


def _load_html(uri: str, stream: BinaryIO, options: LoadOptions) -> Iterator[Piece | Skipped]:
    parser = _HTMLText()
    parser.feed(_whole(stream))
    parser.close()
    yield from _text_pieces(uri, "".join(parser.parts), options.segment_bytes)


def _pdf_pages(data: bytes) -> list[str]:
    from pypdf import PdfReader

    if not data.startswith(b"%PDF-"):
        raise Unloadable("not a PDF file (no %PDF- header)")
    logging.getLogger("pypdf").setLevel(logging.ERROR)  # it logs every recoverable oddity of a file
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pypdf warns about recoverable structure errors
            reader = PdfReader(io.BytesIO(data))
            return [page.extract_text() or "" for page in reader.pages]
    except Exception as exc:  # a malformed PDF makes pypdf raise almost anything: skip the file, go on
        raise Unloadable(f"unreadable PDF ({type(exc).__name__}: {exc})") from exc


def _load_pdf(uri: str, stream: BinaryIO, options: LoadOptions) -> Iterator[Piece | Skipped]:
    for n, text in enumerate(_pdf_pages(stream.read()), start=1):
        yield from _text_pieces(f"{uri}#page={n}", text, options.segment_bytes)


def _record(where: str, record: object, options: LoadOptions) -> Iterator[Piece | Skipped]:
    if not isinstance(record, dict):
        yield Skipped(where, "not an object")
        return
    text = record.get(options.text_field)
    if not isinstance(text, str):
        yield Skipped(where, f"no text field {options.text_field!r} (choose one with --text-field)")
        return
    metadata: dict[str, Scalar] = {}
    for key in options.meta_fields:
        value = record.get(key)
        if isinstance(value, str | int | float | bool):
            metadata[key] = value
    try:
        check_metadata(metadata)
    except InvalidRequestError as exc:
        yield Skipped(where, exc.message)
        return
    yield from _text_pieces(where, text, options.segment_bytes, metadata)


def _lines(stream: BinaryIO) -> Iterator[str]:
    """The lines of a UTF-8 stream (split at ``\\n`` only, endings kept), decoded as they are read.

    No sniffing for NUL bytes: UTF-8 decoding refuses a binary file, and a NUL in one record is that
    record's problem (its metadata is refused, its text cleaned), not the file's.
    """
    offset = 0
    for raw in stream:
        line = raw[len(_BOM) :] if offset == 0 and raw.startswith(_BOM) else raw
        yield _decode(line, offset + len(raw) - len(line))
        offset += len(raw)


def _load_jsonl(uri: str, stream: BinaryIO, options: LoadOptions) -> Iterator[Piece | Skipped]:
    for n, line in enumerate(_lines(stream), start=1):
        if not line.strip():
            continue
        where = f"{uri}#line={n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            yield Skipped(where, f"invalid JSON ({exc.msg})")
            continue
        yield from _record(where, record, options)


def _load_csv(uri: str, stream: BinaryIO, options: LoadOptions) -> Iterator[Piece | Skipped]:
    try:
        reader = csv.DictReader(_lines(stream))
        if reader.fieldnames is None or options.text_field not in reader.fieldnames:
            raise Unloadable(
                f"CSV has no column {options.text_field!r} (columns: {', '.join(reader.fieldnames or [])}); "
                "choose one with --text-field"
            )
        for n, row in enumerate(reader, start=1):
            yield from _record(f"{uri}#row={n}", row, options)
    except csv.Error as exc:
        raise Unloadable(f"malformed CSV ({exc})") from exc


_LOADERS: dict[str, Callable[[str, BinaryIO, LoadOptions], Iterator[Piece | Skipped]]] = {
    ".txt": _load_text,
    ".md": _load_text,
    ".html": _load_html,
    ".htm": _load_html,
    ".pdf": _load_pdf,
    ".jsonl": _load_jsonl,
    ".csv": _load_csv,
}


def read_pieces(
    uri: str, suffix: str, stream: BinaryIO, options: LoadOptions = LoadOptions()
) -> Iterator[Piece | Skipped]:
    """The pieces (and skipped records) of one source file, read from ``stream`` as they are needed.

    The caller refuses an empty file first; ``Unloadable`` may come at any point of the iteration.
    """
    loader = _LOADERS.get(suffix.lower())
    if loader is None:
        raise Unloadable(f"unsupported file type {suffix or '(none)'!r}; supported: {', '.join(SUFFIXES)}")
    return loader(uri, stream, options)


def _documents(pieces: Iterator[Piece | Skipped], skipped: list[Skipped]) -> Iterator[Document]:
    """Whole documents from their pieces (what cleaning each document whole would give)."""
    parts: list[Piece] = []
    for item in [*pieces, None]:
        if isinstance(item, Skipped):
            skipped.append(item)
            continue
        if parts and (item is None or item.first):
            joined = join_clean([p.clean for p in parts], [p.joiner for p in parts])
            yield Document(parts[0].uri, joined, parts[0].metadata)
            parts = []
        if item is not None:
            parts.append(item)


def load_source(uri: str, suffix: str, data: bytes, options: LoadOptions = LoadOptions()) -> Loaded:
    """The non-empty documents of one source file's bytes, each whole; ``Unloadable`` if there are none."""
    if not data:
        raise Unloadable("empty file")
    skipped: list[Skipped] = []
    documents = [
        d for d in _documents(read_pieces(uri, suffix, io.BytesIO(data), options), skipped) if d.text
    ]
    if not documents:
        raise Unloadable("no text after cleaning (empty or whitespace only)")
    return Loaded(documents, skipped)
