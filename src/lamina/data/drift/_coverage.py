"""Which traffic the dataset does not cover: the examples a person can act on.

"Not covered" is measured against the dataset's own density: a request is uncovered when its nearest
chunk is farther (cosine distance) than ``quantile`` of the chunks are from their own nearest other chunk.
A fixed distance would mean different things for different embedders and corpora; this one reads as
"farther from the data than 95% of the data is from itself".
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypedDict

import numpy as np

from lamina.data.drift import _stats as stats
from lamina.data.vectors import ENGLISH_STOPWORDS

#: (chunk id, source URI, cosine similarity) of the version's nearest chunk, or None.
NearestChunk = Callable[[Any], "tuple[str, str, float] | None"]

#: Reference rows whose leave-one-out distances set the threshold (a random sample already).
_SELF_QUERIES = 1000
_WORD = re.compile(r"[^\W\d_]{3,}")
_CLUSTER_TERMS = 5
_MAX_CLUSTERS = 3


class Example(TypedDict):
    text: str
    distance: float
    nearest_chunk_id: str | None
    nearest_source_uri: str | None


class Cluster(TypedDict):
    size: int
    share: float
    terms: list[str]
    example: str


class CoverageResult(TypedDict):
    threshold: float
    quantile: float
    uncovered: int
    uncovered_share: float
    examples: list[Example]
    clusters: list[Cluster]


def words(text: str) -> set[str]:
    """The distinct words of ``text`` (3+ letters, lowercased, no stopwords), as a person would read them."""
    return {w for w in _WORD.findall(text.lower()) if w not in ENGLISH_STOPWORDS}


def top_terms(texts: Sequence[str], n: int = _CLUSTER_TERMS, known: Collection[str] = ()) -> list[str]:
    """The most frequent words of ``texts`` (each counted once per text), words not in ``known`` first.

    ``known`` is the reference's words: what a group of requests asks that the dataset never mentions
    names the topic better than its most frequent words ("how", "what") do.
    """
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(words(text))
    ranked = sorted(counts.items(), key=lambda kv: (kv[0] in known, -kv[1], kv[0]))
    return [w for w, _ in ranked[:n]]


def _examples(
    order: Sequence[int],
    distances: Any,
    vectors: Any,
    texts: Sequence[str],
    limit: int,
    nearest: NearestChunk | None,
) -> list[Example]:
    """The farthest requests, one per distinct text, with the version's nearest chunk when searchable."""
    seen: set[str] = set()
    result: list[Example] = []
    for i in order:
        if len(result) == limit:
            break
        if texts[i] in seen:
            continue
        seen.add(texts[i])
        found = nearest(vectors[i]) if nearest is not None else None
        distance = float(distances[i]) if found is None else min(float(distances[i]), 1.0 - found[2])
        result.append(
            Example(
                text=texts[i],
                distance=round(distance, 4),
                nearest_chunk_id=found[0] if found else None,
                nearest_source_uri=found[1] if found else None,
            )
        )
    return result


def _interleave(groups: Sequence[Sequence[int]]) -> list[int]:
    """The first of each group, then the second of each, ...: examples from every group, not one."""
    longest = max((len(g) for g in groups), default=0)
    return [g[i] for i in range(longest) for g in groups if i < len(g)]


def _floor(uncovered: Sequence[int]) -> int:
    """The size from which a group of uncovered requests counts as a cluster: 3, and 10% of them."""
    return max(3, math.ceil(0.1 * len(uncovered)))


def _example_order(groups: Sequence[Sequence[int]], uncovered: list[int], order: list[int]) -> list[int]:
    """Clusters' members interleaved (one example per topic first), then the farthest of the rest."""
    if not uncovered:
        return order  # nothing uncovered: the farthest requests, for a report that still wants examples
    first = _interleave([g for g in groups if len(g) >= _floor(uncovered)])
    taken = set(first)
    return first + [i for i in uncovered if i not in taken]


def _clusters(
    uncovered: Sequence[int], groups: Sequence[Sequence[int]], texts: Sequence[str], known: Collection[str]
) -> list[Cluster]:
    """Groups among the uncovered requests, shown only when obvious (see :func:`_floor`)."""
    if len(uncovered) < 3:
        return []
    floor = _floor(uncovered)
    result = []
    for group in groups[:_MAX_CLUSTERS]:
        if len(group) < floor:
            break
        members = list(group)
        result.append(
            Cluster(
                size=len(group),
                share=round(len(group) / len(uncovered), 4),
                terms=top_terms([texts[m] for m in members], known=known),
                example=texts[members[0]],
            )
        )
    return result


def coverage(
    reference: Any,
    current: Any,
    texts: Sequence[str],
    *,
    quantile: float = 0.95,
    examples: int = 5,
    nearest: NearestChunk | None = None,
    reference_texts: Sequence[str] = (),
) -> CoverageResult:
    """How much of ``current`` lies beyond the reference's own nearest-neighbour distances, and examples.

    Examples are the farthest request of each group of uncovered requests first, then the next of each.
    """
    ref, cur = stats.as_matrix(reference), stats.as_matrix(current)
    own, _ = stats.nearest_distances(ref[:_SELF_QUERIES], ref, exclude_self=True)
    threshold = float(np.quantile(own, quantile)) if len(ref) > 1 else 0.0
    distances, _ = stats.nearest_distances(cur, ref)
    order = [int(i) for i in np.argsort(-distances, kind="stable")]
    uncovered = [i for i in order if distances[i] > threshold]
    groups = [[uncovered[g] for g in group] for group in stats.leader_clusters(cur[uncovered])]
    known = set().union(*(words(t) for t in reference_texts))
    return CoverageResult(
        threshold=round(threshold, 4),
        quantile=quantile,
        uncovered=len(uncovered),
        uncovered_share=round(len(uncovered) / len(cur), 4) if len(cur) else 0.0,
        examples=_examples(
            _example_order(groups, uncovered, order), distances, cur, texts, examples, nearest
        ),
        clusters=_clusters(uncovered, groups, texts, known),
    )
