"""Loaders: a source file's bytes to documents of clean text, or the reason it cannot be one.

One loader per suffix. ``.txt`` and ``.md`` are one document each, and their byte spans are offsets into
the file itself. Derived text has no such offsets, so its spans refer to the text the loader extracted
(documented per format): ``.html`` (text outside tags, scripts and styles, block elements ending lines,
via the standard library's ``html.parser``), ``.pdf`` (one document per page, ``#page=N``, the page's
text as ``pypdf`` extracts it), ``.jsonl`` (one document per line, ``#line=N``, the record's text field)
and ``.csv`` (one document per row, ``#row=N`` counting data rows from 1, the row's text field).

A file-level problem raises ``Unloadable`` with the reason; a record-level one (a JSONL line that is not
an object) skips that record and is reported in ``Loaded.skipped``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser

from lamina.data.ingest._clean import CleanText, clean_text
from lamina.data.vectors import Scalar

SUFFIXES = (".txt", ".md", ".html", ".htm", ".pdf", ".jsonl", ".csv")
_SNIFF_BYTES = 8192
_BOM = b"\xef\xbb\xbf"


class Unloadable(Exception):
    """A source file that yields no document; ``reason`` says why, for the ingest report."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class LoadOptions:
    """How record formats (JSONL, CSV) become documents."""

    text_field: str = "text"
    meta_fields: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Document:
    """Clean text from one place in a source: the whole file, a page, a line or a row."""

    uri: str
    clean: CleanText
    metadata: dict[str, Scalar] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.clean.text


@dataclass(frozen=True, slots=True)
class Loaded:
    documents: list[Document]
    #: (where, reason) of records skipped inside the file
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _decode(data: bytes) -> tuple[str, int]:
    """The text of ``data`` and the byte offset where it starts (after a BOM)."""
    if b"\x00" in data[:_SNIFF_BYTES]:
        raise Unloadable("binary file (NUL bytes); only text, HTML, PDF, JSONL and CSV are ingested")
    base = len(_BOM) if data.startswith(_BOM) else 0
    try:
        return data[base:].decode("utf-8"), base
    except UnicodeDecodeError as exc:
        raise Unloadable(f"not valid UTF-8 at byte {exc.start + base}; convert it to UTF-8") from exc


def _document(uri: str, text: str, base: int = 0, metadata: dict[str, Scalar] | None = None) -> Document:
    return Document(uri=uri, clean=clean_text(text, base=base), metadata=metadata or {})


def _load_text(uri: str, data: bytes, options: LoadOptions) -> Loaded:
    text, base = _decode(data)
    return Loaded([_document(uri, text, base)])


class _HTMLText(HTMLParser):
    """The visible text of an HTML page, block elements separated by line breaks."""

    _SKIP = frozenset({"script", "style", "noscript", "template", "head"})
    _BLOCK = frozenset(
        {"p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article", "header", "footer",
         "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "title", "hr", "dd", "dt"}
    )  # fmt: skip

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


def _load_html(uri: str, data: bytes, options: LoadOptions) -> Loaded:
    text, _ = _decode(data)
    parser = _HTMLText()
    parser.feed(text)
    parser.close()
    return Loaded([_document(uri, "".join(parser.parts))])


def _load_pdf(uri: str, data: bytes, options: LoadOptions) -> Loaded:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    if not data.startswith(b"%PDF-"):
        raise Unloadable("not a PDF file (no %PDF- header)")
    logging.getLogger("pypdf").setLevel(logging.ERROR)  # it logs every recoverable oddity of a file
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pypdf warns about recoverable structure errors
            reader = PdfReader(io.BytesIO(data))
            pages = [page.extract_text() or "" for page in reader.pages]
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as exc:
        raise Unloadable(f"unreadable PDF ({type(exc).__name__}: {exc})") from exc
    return Loaded([_document(f"{uri}#page={n}", text) for n, text in enumerate(pages, start=1)])


def _record(
    uri: str, record: object, options: LoadOptions, skipped: list[tuple[str, str]]
) -> Document | None:
    if not isinstance(record, dict):
        skipped.append((uri, "not an object"))
        return None
    text = record.get(options.text_field)
    if not isinstance(text, str):
        skipped.append((uri, f"no text field {options.text_field!r} (choose one with --text-field)"))
        return None
    metadata: dict[str, Scalar] = {}
    for key in options.meta_fields:
        value = record.get(key)
        if isinstance(value, str | int | float | bool):
            metadata[key] = value
    return _document(uri, text, metadata=metadata)


def _load_jsonl(uri: str, data: bytes, options: LoadOptions) -> Loaded:
    text, _ = _decode(data)
    documents: list[Document] = []
    skipped: list[tuple[str, str]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{uri}#line={n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            skipped.append((where, f"invalid JSON ({exc.msg})"))
            continue
        doc = _record(where, record, options, skipped)
        if doc is not None:
            documents.append(doc)
    return Loaded(documents, skipped)


def _load_csv(uri: str, data: bytes, options: LoadOptions) -> Loaded:
    text, _ = _decode(data)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None or options.text_field not in reader.fieldnames:
        raise Unloadable(
            f"CSV has no column {options.text_field!r} (columns: {', '.join(reader.fieldnames or [])}); "
            "choose one with --text-field"
        )
    skipped: list[tuple[str, str]] = []
    try:
        documents = [
            doc
            for n, row in enumerate(reader, start=1)
            if (doc := _record(f"{uri}#row={n}", row, options, skipped)) is not None
        ]
    except csv.Error as exc:
        raise Unloadable(f"malformed CSV ({exc})") from exc
    return Loaded(documents, skipped)


_LOADERS: dict[str, Callable[[str, bytes, LoadOptions], Loaded]] = {
    ".txt": _load_text,
    ".md": _load_text,
    ".html": _load_html,
    ".htm": _load_html,
    ".pdf": _load_pdf,
    ".jsonl": _load_jsonl,
    ".csv": _load_csv,
}


def load_source(uri: str, suffix: str, data: bytes, options: LoadOptions = LoadOptions()) -> Loaded:
    """The non-empty documents of one source file's bytes; ``Unloadable`` if there are none."""
    loader = _LOADERS.get(suffix.lower())
    if loader is None:
        raise Unloadable(f"unsupported file type {suffix or '(none)'!r}; supported: {', '.join(SUFFIXES)}")
    if not data:
        raise Unloadable("empty file")
    loaded = loader(uri, data, options)
    documents = [d for d in loaded.documents if d.text]
    if not documents:
        raise Unloadable("no text after cleaning (empty or whitespace only)")
    return Loaded(documents, loaded.skipped)
