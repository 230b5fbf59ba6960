"""Loaders and cleaning: documents per format, skip reasons, and byte spans that point into the source."""

from __future__ import annotations

import pytest

from lamina.data.ingest import LoadOptions, Unloadable, clean_text, load_source
from tests.support import make_pdf


def test_text_spans_point_into_the_file_bytes() -> None:
    raw = "\ufeff  Café  déjà\r\n\r\n\r\nvu\u00a0ok ﬁn\x07e  ".encode()
    doc = load_source("file:///t.txt", ".txt", raw).documents[0]
    assert doc.text == "Café déjà\n\nvu ok fine"
    for word in ("Café", "déjà", "vu", "fine"):
        start = doc.text.index(word)
        a, b = doc.clean.byte_span(start, start + len(word))
        source = raw[a:b].decode()
        assert source.replace("\x07", "").replace("ﬁ", "fi") == word


def test_nfkc_and_combining_sequences_map_back() -> None:
    clean = clean_text("e\u0301te\u0301 \uff21\uff22")
    assert clean.text == "été AB"
    assert clean.byte_span(0, 1) == (0, 3) and clean.byte_span(4, 6) == (8, 14)


def test_html_keeps_visible_text_only() -> None:
    html = b"<html><head><title>x</title><style>p{}</style></head><body><h1>Title</h1><p>One &amp; two</p>"
    html += b"<script>var a = 1;</script><div>three</div></body></html>"
    assert load_source("u", ".html", html).documents[0].text == "Title\n\nOne & two\n\nthree"


def test_jsonl_records_with_metadata_and_skipped_lines() -> None:
    raw = b'{"body": "first", "lang": "en", "n": 3}\nnot json\n{"other": 1}\n\n[1]\n{"body": "second"}\n'
    loaded = load_source("file:///r.jsonl", ".jsonl", raw, LoadOptions("body", ("lang", "n")))
    assert [(d.uri, d.text, d.metadata) for d in loaded.documents] == [
        ("file:///r.jsonl#line=1", "first", {"lang": "en", "n": 3}),
        ("file:///r.jsonl#line=6", "second", {}),
    ]
    assert [s.path.rsplit("#", 1)[1] for s in loaded.skipped] == ["line=2", "line=3", "line=5"]


def test_csv_rows_and_a_missing_column() -> None:
    raw = b'text,src\n"hello, world",a\n"multi\nline",b\n'
    loaded = load_source("f", ".csv", raw, LoadOptions(meta_fields=("src",)))
    assert [(d.uri, d.text, d.metadata) for d in loaded.documents] == [
        ("f#row=1", "hello, world", {"src": "a"}),
        ("f#row=2", "multi\nline", {"src": "b"}),
    ]
    with pytest.raises(Unloadable, match="no column 'body'"):
        load_source("f", ".csv", raw, LoadOptions(text_field="body"))


def test_pdf_one_document_per_page() -> None:
    docs = load_source("file:///d.pdf", ".pdf", make_pdf(["Hello page one", "Second page here"])).documents
    assert [(d.uri, d.text) for d in docs] == [
        ("file:///d.pdf#page=1", "Hello page one"),
        ("file:///d.pdf#page=2", "Second page here"),
    ]
    assert docs[1].clean.byte_span(0, 6) == (0, 6)  # spans refer to the page's extracted text


@pytest.mark.parametrize(
    ("suffix", "raw", "reason"),
    [
        (".txt", b"", "empty"),
        (".txt", b" \n\t ", "no text"),
        (".txt", b"abc\x00def", "binary"),
        (".md", "caf\xe9".encode("latin-1"), "UTF-8"),
        (".pdf", b"%PDF-1.4 truncated garbage", "unreadable PDF"),
        (".pdf", b"plain text", "not a PDF"),
        (".docx", b"x", "unsupported"),
    ],
)
def test_unloadable_files_say_why(suffix: str, raw: bytes, reason: str) -> None:
    with pytest.raises(Unloadable, match=reason):
        load_source("f", suffix, raw)


def test_records_whose_metadata_a_store_cannot_hold_are_skipped_alone() -> None:
    raw = b'{"text": "ok", "n": 1}\n{"text": "nan", "n": NaN}\n{"text": "inf", "n": -Infinity}\n'
    raw += (
        b'{"text": "nul", "n": "a\\u0000b"}\n{"text": "reserved", "source_uri": "x"}\n{"text": "also ok"}\n'
    )
    loaded = load_source("f", ".jsonl", raw, LoadOptions(meta_fields=("n", "source_uri")))
    assert [d.text for d in loaded.documents] == ["ok", "also ok"]
    reasons = {s.path: s.reason for s in loaded.skipped}
    assert "finite" in reasons["f#line=2"] and "finite" in reasons["f#line=3"]
    assert "NUL" in reasons["f#line=4"] and "reserved" in reasons["f#line=5"]
    csv_raw = b"text,src\nfirst,a\nsecond,a\x00b\n"  # a NUL byte in a CSV field: that row only
    loaded = load_source("c", ".csv", csv_raw, LoadOptions(meta_fields=("src",)))
    assert [d.text for d in loaded.documents] == ["first"] and "NUL" in loaded.skipped[0].reason


def test_a_pdf_that_makes_the_parser_raise_anything_is_unloadable() -> None:
    # a broken trailer makes pypdf raise AttributeError, none of its own error types
    broken = make_pdf(["Hello page one"]).replace(b"trailer\n<<", b"trailer\n 0 R ")
    with pytest.raises(Unloadable, match="unreadable PDF"):
        load_source("f", ".pdf", broken)
