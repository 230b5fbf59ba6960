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

A large document arrives in pieces (``_segments``); ``DocumentHasher`` takes them one at a time and gives
the hashes of the whole: words cut by a piece's end are carried into the next, and shingles span pieces.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

_WORD = re.compile(r"\w+")
_SHINGLE = 3
_BITS = 64
_VOTE_BATCH = 8192
_shingle_hash = functools.partial(hashlib.blake2b, digest_size=8)
_WEIGHTS = np.left_shift(np.uint64(1), np.arange(_BITS, dtype=np.uint64))


def content_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class DocumentHash:
    sha256: str
    simhash: int


class DocumentHasher:
    """The sha256 and SimHash of a text fed in consecutive pieces; equal to hashing it whole.

    Words are lower-cased a piece at a time: only a capital sigma right at a cut (its lower case depends
    on the letter after it) could differ, and segments are cut in whitespace.
    """

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._whole = hashlib.blake2b(digest_size=8)  # a text without words is its own one shingle
        self._votes = np.zeros(_BITS, dtype=np.int64)
        self._shingles = 0
        self._last: list[str] = []  # the last two words, to shingle across pieces
        self._words = 0
        self._carry = ""  # a word the previous piece ended in, perhaps continued by this one

    def update(self, text: str) -> None:
        data = text.encode("utf-8", "surrogatepass")
        self._sha.update(data)
        self._whole.update(data)
        lowered = self._carry + text.lower()
        words = _WORD.findall(lowered)
        self._carry = words.pop() if words and _WORD.fullmatch(lowered[-1]) else ""
        self._add(words)

    def _add(self, words: list[str]) -> None:
        run = self._last + words
        self._words += len(words)
        for start in range(0, max(len(run) - _SHINGLE + 1, 0), _VOTE_BATCH):  # a batch at a time
            stop = start + _VOTE_BATCH + _SHINGLE - 1
            encoded = [w.encode("utf-8", "surrogatepass") for w in run[start:stop]]
            # each shingle: _SHINGLE consecutive words (zip stops at the last whole one)
            self._vote(list(map(b" ".join, zip(*(encoded[k:] for k in range(_SHINGLE)), strict=False))))
        self._last = run[-(_SHINGLE - 1) :]

    def _vote(self, shingles: list[bytes]) -> None:
        if not shingles:
            return
        digests = b"".join([_shingle_hash(s).digest() for s in shingles])
        # bit i of each little-endian 64-bit digest, as a column
        bits = np.unpackbits(np.frombuffer(digests, dtype=np.uint8).reshape(-1, 8), axis=1, bitorder="little")
        self._votes += bits.sum(axis=0, dtype=np.int64)
        self._shingles += len(shingles)

    def finish(self) -> DocumentHash:
        if self._carry:
            self._add([self._carry])
            self._carry = ""
        if self._words < _SHINGLE:  # too few words for one shingle: each word is one, or the text is
            self._votes[:] = 0
            self._shingles = 0
            short = [w.encode("utf-8", "surrogatepass") for w in self._last]
            if short:
                self._vote(short)
            else:
                self._vote_digest(self._whole.digest())
        votes = self._votes * 2 - self._shingles
        return DocumentHash(self._sha.hexdigest(), int(np.sum(_WEIGHTS[votes > 0], dtype=np.uint64)))

    def _vote_digest(self, digest: bytes) -> None:
        bits = np.unpackbits(np.frombuffer(digest, dtype=np.uint8), bitorder="little")
        self._votes += bits.astype(np.int64)
        self._shingles += 1


def simhash(text: str) -> int:
    """The 64-bit SimHash of ``text``'s word 3-shingles (of its words when it has fewer than three)."""
    hasher = DocumentHasher()
    hasher.update(text)
    return hasher.finish().simhash


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


@dataclass(frozen=True, slots=True)
class Duplicate:
    """The kept document a document repeats, and how."""

    of: str
    kind: Literal["exact", "near"]


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

    def duplicate_of(self, uri: str, sha256: str, sim: int) -> Duplicate | None:
        """The kept document this one repeats, exactly or nearly, or None."""
        if sha256 in self._hashes:
            return Duplicate(self._hashes[sha256], "exact")
        for bucket, key in zip(self._buckets, self._keys(sim), strict=True):
            for other_sim, other_uri in bucket.get(key, ()):
                if hamming(sim, other_sim) <= self.max_bits:
                    return Duplicate(other_uri, "near")
        return None

    def keep(self, uri: str, sha256: str, sim: int) -> None:
        self._hashes.setdefault(sha256, uri)
        for bucket, key in zip(self._buckets, self._keys(sim), strict=True):
            bucket[key].append((sim, uri))


class StagedDeduplicator:
    """One file's view of a run's ``Deduplicator``: its documents reach the run's only by ``commit``.

    A file that fails part-way is dropped whole, so the documents it had kept must not make later
    files' documents look like duplicates.
    """

    def __init__(self, base: Deduplicator) -> None:
        self._base = base
        self._own = Deduplicator(base.max_bits)
        self._kept: list[tuple[str, str, int]] = []

    def duplicate_of(self, uri: str, sha256: str, sim: int) -> Duplicate | None:
        return self._base.duplicate_of(uri, sha256, sim) or self._own.duplicate_of(uri, sha256, sim)

    def keep(self, uri: str, sha256: str, sim: int) -> None:
        self._own.keep(uri, sha256, sim)
        self._kept.append((uri, sha256, sim))

    def commit(self) -> None:
        for uri, sha256, sim in self._kept:
            self._base.keep(uri, sha256, sim)
        self._kept.clear()
