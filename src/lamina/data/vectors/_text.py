"""The English analyser and BM25 scoring behind keyword search, shared by every vector-store backend.

Both backends index the terms this module produces and score them with the same formula, so that they
rank identically for identical data. The analyser follows Lucene's ``EnglishAnalyzer``, the one behind the
published BM25 baselines (Anserini, BEIR's Elasticsearch runs):

1. tokenise on Unicode word boundaries the way ``StandardTokenizer`` does for Latin text: letters and
   digits form words; ``.``, ``'`` and ``:`` join letters (``e.g``, ``don't``); ``.``, ``,``, ``;`` and
   ``'`` join digits (``1,000``, ``3.5``);
2. drop an English possessive ``'s`` (``EnglishPossessiveFilter``);
3. lowercase;
4. remove Lucene's 33 English stopwords (``EnglishAnalyzer.ENGLISH_STOP_WORDS_SET``);
5. stem with the original Porter algorithm (``PorterStemFilter``; Snowball's ``porter``).

So a term holds only letters, digits and ``. ' , ; :`` (or U+2019): never whitespace or a backslash,
which lets the PostgreSQL backend COPY postings as plain text.

Scoring is Okapi BM25 with Anserini's BEIR parameters, ``k1 = 0.9`` and ``b = 0.4``, and Lucene's
non-negative idf::

    idf(t)      = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))
    score(d, q) = sum over query terms t of  qtf(t) * idf(t) * tf(t, d) * (k1 + 1)
                                            / (tf(t, d) + k1 * (1 - b + b * len(d) / avgdl))

``N`` and ``avgdl`` are taken over the searched scope (a whole dataset, or one pinned version of it),
``len(d)`` counts a chunk's indexed terms (stopwords excluded, as Lucene's norms do), and ``qtf`` is how often
a term occurs in the query (Anserini's bag-of-words query weights). Unlike Lucene, document lengths are
exact rather than one-byte norms, so scores differ from Lucene's in the third decimal, not in kind.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import Stemmer  # type: ignore[import-not-found]  # PyStemmer ships no type information

#: BM25 term-frequency saturation (Anserini's BEIR baseline).
BM25_K1 = 0.9
#: BM25 length normalisation (Anserini's BEIR baseline).
BM25_B = 0.4

#: Lucene's ``EnglishAnalyzer.ENGLISH_STOP_WORDS_SET``.
ENGLISH_STOPWORDS = frozenset(
    {
        *("a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it"),
        *("no", "not", "of", "on", "or", "such", "that", "the", "their", "then", "there", "these", "they"),
        *("this", "to", "was", "will", "with"),
    }
)

_WORD = r"[^\W_]"
_LETTER = r"[^\W\d_]"
# A run of letters/digits; letters may be joined by . ' U+2019 : and digits by . , ; ' U+2019
# (UAX #29 MidLetter, MidNum, MidNumLet), as Lucene's StandardTokenizer does.
_TOKEN = re.compile(
    rf"{_WORD}+(?:(?:(?<={_LETTER})[.'\u2019:](?={_LETTER})|(?<=\d)[.,;'\u2019](?=\d)){_WORD}+)*",
)
_POSSESSIVES = frozenset({"'s", "\u2019s"})
_MAX_TOKEN_CHARS = 255
_STEM_CACHE_WORDS = 500_000


@dataclass(frozen=True, slots=True)
class IndexedText:
    """What a backend stores to score a chunk with BM25: its distinct terms, their counts, its length."""

    terms: list[str]
    tfs: list[int]
    length: int


class EnglishAnalyzer:
    """Text to BM25 terms, as Lucene's ``EnglishAnalyzer`` would produce them.

    A PyStemmer ``Stemmer`` is not safe to share between threads, so each thread gets its own, with a
    word-to-stem cache (three times faster than PyStemmer's own), emptied when it reaches
    ``_STEM_CACHE_WORDS`` words.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def _stem(self, words: list[str]) -> list[str]:
        local = self._local
        if not hasattr(local, "stemmer"):
            local.stemmer, local.cache = Stemmer.Stemmer("porter", 0), {}
        cache: dict[str, str] = local.cache
        if len(cache) > _STEM_CACHE_WORDS:
            cache.clear()
        stems = []
        for word in words:
            stem = cache.get(word)
            if stem is None:
                stem = cache[word] = local.stemmer.stemWord(word)
            stems.append(stem)
        return stems

    def tokens(self, text: str) -> list[str]:
        """The analysed terms of ``text`` in order, stopwords removed, stemmed."""
        words = []
        for word in _TOKEN.findall(text.lower()):
            if word[-2:] in _POSSESSIVES:
                word = word[:-2]
            if word not in ENGLISH_STOPWORDS and len(word) <= _MAX_TOKEN_CHARS:
                words.append(word)
        return self._stem(words)

    def index(self, text: str) -> IndexedText:
        """The distinct terms of ``text`` (sorted) with their frequencies and the text's length in terms."""
        counts = Counter(self.tokens(text))
        terms = sorted(counts)
        return IndexedText(terms=terms, tfs=[counts[t] for t in terms], length=sum(counts.values()))

    def query(self, text: str) -> tuple[list[str], list[int]]:
        """A query's distinct terms and how often each occurs in it (its bag-of-words weights)."""
        indexed = self.index(text)
        return indexed.terms, indexed.tfs


def bm25_idf(n_docs: int, df: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """Lucene's idf, never negative: ``ln(1 + (N - df + 0.5) / (df + 0.5))``."""
    dfs = df.astype(np.float64)
    # ln(1 + x), not log1p(x): the same operations PostgreSQL runs, so both backends agree to the last bit.
    result: npt.NDArray[np.float64] = np.log(1.0 + (n_docs - dfs + 0.5) / (dfs + 0.5))
    return result


def bm25_term_scores(
    tf: npt.NDArray[np.int64],
    doc_len: npt.NDArray[np.int64],
    weight: npt.NDArray[np.float64],
    avgdl: float,
    *,
    k1: float = BM25_K1,
    b: float = BM25_B,
) -> npt.NDArray[np.float64]:
    """One BM25 contribution per (term, document) posting; ``weight`` is ``qtf * idf`` of its term."""
    tfs = tf.astype(np.float64)
    lengths = doc_len.astype(np.float64)
    norm = k1 * (1.0 - b + b * lengths / avgdl) if avgdl > 0 else np.full_like(tfs, k1)
    result: npt.NDArray[np.float64] = weight * tfs * (k1 + 1.0) / (tfs + norm)
    return result


def bm25_scores(
    *,
    term_idx: npt.NDArray[np.int64],
    doc: npt.NDArray[np.int64],
    tf: npt.NDArray[np.int64],
    doc_len: npt.NDArray[np.int64],
    qtfs: list[int],
    n_docs: int,
    avgdl: float,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """BM25 per document from the query terms' postings in scope, one array entry per posting.

    ``term_idx`` is the posting's position in the query's term list, ``doc`` its document (any integer
    key), ``doc_len`` that document's length. Document frequencies are counted over the postings given,
    so they must be all of the scope's postings for the query terms. Returns the distinct documents and
    their scores.
    """
    df = np.bincount(term_idx, minlength=len(qtfs)).astype(np.int64)
    weight = np.asarray(qtfs, dtype=np.float64) * bm25_idf(n_docs, df)
    contrib = bm25_term_scores(tf, doc_len, weight[term_idx], avgdl)
    docs, which = np.unique(doc, return_inverse=True)
    return docs, np.bincount(which, weights=contrib, minlength=len(docs)).astype(np.float64)
