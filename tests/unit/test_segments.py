"""Segments and the streaming cleaner and hasher: a text taken in pieces gives what it gives whole.

The cleaner is compared with a straightforward per-character version of the same rules (kept here as
the reference), and the segmented load of a file with cleaning the file whole, offsets included.
"""

from __future__ import annotations

import io
import random
import re
import unicodedata

import numpy as np
import pytest

from lamina.data.ingest import (
    DocumentHasher,
    LoadOptions,
    clean_text,
    content_sha256,
    join_clean,
    load_source,
    segments,
    simhash,
)
from lamina.errors import InvalidRequestError

# a pool that exercises every rule: whitespace runs and line breaks (CR LF too), controls (and the
# characters that are both), compatibility forms NFKC folds, combining marks, surrogates, non-BMP
POOL = [*"abc xyz.,", " ", "  ", "\n", "\r\n", "\r", "\t", "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\u2028"]
POOL += ["\u00a0", "\u3000", "\x00", "\x07", "\x7f", "\x9f", "é", "ﬁ", "\uff21", "①", "\u1100", "\u1161"]
POOL += ["가", "😀", "\ud800", "ß", "İ", "\ufeff", "\u200b", "\u0301", "\u0327", "e\u0301", "\u212b"]

_RUNS = re.compile(r"\s+|[\x00-\x08\x0e-\x1f\x7f-\x9f]+")
_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")


def reference_clean(text: str, base: int = 0) -> tuple[str, list[int], list[int]]:
    """The cleaning rules one character at a time: (text, byte starts, byte ends)."""
    offsets = [base]
    for c in text:
        offsets.append(offsets[-1] + len(c.encode("utf-8", "surrogatepass")))
    norm, src_start, src_end = "", [], []
    i = 0
    while i < len(text):  # a base character with the combining marks that follow it
        j = i + 1
        while j < len(text) and unicodedata.combining(text[j]):
            j += 1
        piece = (
            text[i:j]
            if unicodedata.is_normalized("NFKC", text[i:j])
            else unicodedata.normalize("NFKC", text[i:j])
        )
        norm += piece
        src_start += [i] * len(piece) if piece != text[i:j] else list(range(i, j))
        src_end += [j] * len(piece) if piece != text[i:j] else list(range(i + 1, j + 1))
        i = j
    out, pos = "", 0
    starts: list[int] = []
    ends: list[int] = []
    for m in _RUNS.finditer(norm):
        a, b = m.span()
        out, starts, ends = out + norm[pos:a], starts + src_start[pos:a], ends + src_end[pos:a]
        run = m.group()
        breaks = sum(c in _BREAKS for c in run) - run.count("\r\n")
        edge = a == 0 or b == len(norm)
        piece = "" if edge or not run.isspace() else "\n\n" if breaks >= 2 else "\n" if breaks else " "
        out, starts, ends = (
            out + piece,
            starts + [src_start[a]] * len(piece),
            ends + [src_end[b - 1]] * len(piece),
        )
        pos = b
    out, starts, ends = out + norm[pos:], starts + src_start[pos:], ends + src_end[pos:]
    lead, stop = len(out) - len(out.lstrip()), len(out.rstrip())
    return out[lead:stop], [offsets[s] for s in starts[lead:stop]], [offsets[e] for e in ends[lead:stop]]


def test_the_cleaner_matches_the_per_character_rules() -> None:
    rng = random.Random(1)
    for _ in range(3000):
        text = "".join(rng.choice(POOL) for _ in range(rng.randint(0, 40)))
        base = rng.randint(0, 4)
        clean = clean_text(text, base=base)
        want_text, want_starts, want_ends = reference_clean(text, base)
        assert clean.text == want_text, repr(text)
        assert clean.starts.tolist() == want_starts and clean.ends.tolist() == want_ends, repr(text)


def random_prose(rng: random.Random, size: int, newline: str = "\n") -> str:
    words = [
        "alpha",
        "beta",
        "gamma",
        "café",
        "ﬁne",
        "naïve",
        "e\u0301te\u0301",
        "\uff37ide",
        "x\u00a0y",
        "日本語",
    ]
    out: list[str] = []
    while sum(map(len, out)) < size:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        out.append(line + (newline * rng.choice([1, 1, 1, 2, 3])) + rng.choice(["", " ", "\t"]))
    return "".join(out)


@pytest.mark.parametrize(
    ("newline", "size"), [("\n", 60_000), ("\r\n", 60_000), (" ", 30_000)], ids=["lf", "crlf", "one-line"]
)
def test_a_text_cut_in_segments_cleans_as_it_does_whole(newline: str, size: int) -> None:
    raw = ("\ufeff  " + random_prose(random.Random(size), size, newline) + "\n\n").encode("utf-8")
    options = LoadOptions(segment_bytes=2048)
    parts = list(segments(io.BytesIO(raw), options.segment_bytes, skip_bom=True))
    assert len(parts) > 10 and all(len(p.data) <= 2048 for p in parts)
    assert b"".join(p.data for p in parts) == raw[3:] and parts[0].start == 3
    whole = clean_text(raw[3:].decode("utf-8"), base=3)
    doc = load_source("file:///big.txt", ".txt", raw, options).documents[0]
    assert doc.text == whole.text
    assert np.array_equal(doc.clean.starts, whole.starts) and np.array_equal(doc.clean.ends, whole.ends)


def test_a_text_without_spaces_is_cut_between_characters_and_still_joins() -> None:
    raw = ("ab" * 5000 + "日本語" * 3000).encode("utf-8")
    parts = list(segments(io.BytesIO(raw), 4096))
    assert len(parts) > 3 and b"".join(p.data for p in parts) == raw
    for p in parts:
        p.data.decode("utf-8")  # every cut falls on a character boundary
    pieces = [clean_text(p.data.decode("utf-8"), base=p.start) for p in parts]
    joined = join_clean(pieces, [p.joiner for p in parts])
    assert joined.text == clean_text(raw.decode("utf-8")).text


def test_hashing_in_pieces_equals_hashing_whole() -> None:
    # cut anywhere, even inside words (no capital sigma, whose lower case depends on what follows it)
    rng = random.Random(5)
    for _ in range(500):
        text = "".join(
            rng.choice([*POOL, "word", "Wörd", "b_c", "x1", "日本"]) for _ in range(rng.randint(0, 60))
        )
        cuts = sorted(rng.sample(range(len(text) + 1), min(4, len(text) + 1)))
        hasher, prev = DocumentHasher(), 0
        for cut in [*cuts, len(text)]:
            hasher.update(text[prev:cut])
            prev = cut
        hashed = hasher.finish()
        assert (hashed.sha256, hashed.simhash) == (content_sha256(text), simhash(text)), repr(text)


def test_segments_smaller_than_the_minimum_are_refused() -> None:
    with pytest.raises(InvalidRequestError, match="segment_bytes"):
        LoadOptions(segment_bytes=100)
