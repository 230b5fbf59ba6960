"""De-duplication: exact by content hash, near-duplicates by SimHash.

Exact: two documents whose cleaned text has the same sha256 are one; the first kept wins.

Near: each document gets a 64-bit SimHash (Charikar 2002) of its word 3-shingles (lower-cased words,
shingles hashed with BLAKE2b-64, each bit voted by every shingle). Two documents are near-duplicates when
their SimHashes differ in at most ``max_bits`` bits. Manku, Jain and Das Sarma (WWW 2007) used 3 on
weighted web-page features; with plain shingles a few edited words in a page already move 2 to 6 bits, so
the default is 6. Unrelated texts differ in about 32 bits, and 6 or fewer happens with probability below
1e-10 (binomial tail), so the looser budget costs no false matches in practice. Short texts have few
shingles and move further per changed word: only texts that are mostly the same collide.

Lookups use Manku et al.'s pigeonhole trick: split the 64 bits into ``max_bits + 1`` blocks; two
hashes within ``max_bits`` bits agree exactly on at least one block, so candidates come from per-block
buckets instead of comparing all pairs.

SimHash rather than MinHash: one 64-bit integer per document is all that must be stored to compare
later ingests against the documents a version already holds (MinHash needs ~128 of them per document),
and its threshold is a bit count a person can reason about.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

_WORD = re.compile(r"\w+")
_SHINGLE = 3
_BITS = 64
_WEIGHTS = np.left_shift(np.uint64(1), np.arange(_BITS, dtype=np.uint64))


def content_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def simhash(text: str) -> int:
    """The 64-bit SimHash of ``text``'s word 3-shingles (of its words when it has fewer than three)."""
    words = _WORD.findall(text.lower())
    if len(words) < _SHINGLE:
        shingles = words or [text]
    else:
        shingles = [" ".join(words[i : i + _SHINGLE]) for i in range(len(words) - _SHINGLE + 1)]
    digests = np.frombuffer(
        b"".join(
            hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=8).digest() for s in shingles
        ),
        dtype="<u8",
    )
    bits = (digests[:, None] & _WEIGHTS[None, :]) != 0
    votes = bits.sum(axis=0, dtype=np.int64) * 2 - len(shingles)
    return int(np.sum(_WEIGHTS[votes > 0], dtype=np.uint64))


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


@dataclass
class Deduplicator:
    """Decides, document by document, whether it repeats one already kept.

    ``max_bits`` < 0 turns near-duplicate detection off. Seed it with the documents a version already
    holds (``keep``) so that new documents are compared with them too.
    """

    max_bits: int = 6
    _hashes: dict[str, str] = field(default_factory=dict)
    _buckets: list[defaultdict[int, list[tuple[int, str]]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._blocks = self.max_bits + 1 if self.max_bits >= 0 else 0
        self._buckets = [defaultdict(list) for _ in range(self._blocks)]

    def _keys(self, sim: int) -> list[int]:
        if not self._blocks:
            return []
        width = -(-_BITS // self._blocks)
        return [(sim >> (i * width)) & ((1 << width) - 1) for i in range(self._blocks)]

    def duplicate_of(self, uri: str, sha256: str, sim: int) -> tuple[str, str] | None:
        """(kept uri, "exact" | "near") if this document repeats a kept one, else None."""
        if sha256 in self._hashes:
            return self._hashes[sha256], "exact"
        for bucket, key in zip(self._buckets, self._keys(sim), strict=True):
            for other_sim, other_uri in bucket.get(key, ()):
                if hamming(sim, other_sim) <= self.max_bits:
                    return other_uri, "near"
        return None

    def keep(self, uri: str, sha256: str, sim: int) -> None:
        self._hashes.setdefault(sha256, uri)
        for bucket, key in zip(self._buckets, self._keys(sim), strict=True):
            bucket[key].append((sim, uri))
