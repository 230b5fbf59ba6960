"""De-duplication: exact by content hash, near by SimHash within a bit budget."""

from __future__ import annotations

from lamina.data.ingest import Deduplicator, Duplicate, content_sha256, hamming, simhash

BASE = " ".join(f"word{i % 37} token{i % 11} item{i}" for i in range(200))


def test_one_changed_word_is_near_a_different_text_is_far() -> None:
    near = BASE.replace("item100", "changed")
    other = " ".join(f"other{i} text{i % 13}" for i in range(200))
    assert hamming(simhash(BASE), simhash(near)) <= Deduplicator().max_bits
    assert hamming(simhash(BASE), simhash(other)) > 10
    assert simhash(BASE) == simhash(BASE)  # stable across calls and processes (BLAKE2b, not hash())


def test_deduplicator_exact_near_and_off() -> None:
    near = BASE.replace("item100", "changed")
    d = Deduplicator()
    d.keep("a", content_sha256(BASE), simhash(BASE))
    assert d.duplicate_of("b", content_sha256(BASE), simhash(BASE)) == Duplicate("a", "exact")
    assert d.duplicate_of("c", content_sha256(near), simhash(near)) == Duplicate("a", "near")
    off = Deduplicator(max_bits=-1)
    off.keep("a", content_sha256(BASE), simhash(BASE))
    assert off.duplicate_of("c", content_sha256(near), simhash(near)) is None
    assert off.duplicate_of("b", content_sha256(BASE), simhash(BASE)) == Duplicate("a", "exact")


def test_short_texts_hash_too() -> None:
    assert simhash("hi") != simhash("bye") and isinstance(simhash(""), int)
