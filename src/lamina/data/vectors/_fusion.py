"""Reciprocal rank fusion (Cormack, Clarke and Büttcher, SIGIR 2009): how hybrid search merges rankings.

RRF needs no score calibration between the rankings it merges, which is why it suits vector similarities
and BM25 scores that live on unrelated scales. Each key scores ``sum over rankings of 1 / (k + rank)`` with
``rank`` counted from 1; a key absent from a ranking gets nothing from it. ``k = 60`` is the paper's value
and the common default (Elasticsearch, OpenSearch, Azure AI Search).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lamina.errors import InvalidRequestError

#: The RRF smoothing constant of the original paper.
RRF_K = 60


@dataclass(frozen=True, slots=True)
class Fused:
    """One key of the fused ranking: its RRF score and its 1-based rank in each input (None: absent)."""

    key: str
    score: float
    ranks: tuple[int | None, ...]


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[str]], *, k: int = RRF_K, limit: int | None = None
) -> list[Fused]:
    """Fuse best-first rankings of keys into one, best first.

    A key repeated within one ranking counts at its first (best) position only. Ties in score are broken
    by the best rank the key reached in any input, then by the key, so the result is deterministic.
    """
    if k < 0:
        raise InvalidRequestError(f"the RRF constant k must be >= 0, got {k}; the usual value is {RRF_K}")
    if limit is not None and limit < 0:
        raise InvalidRequestError(f"limit must be >= 0, got {limit}")
    ranks: dict[str, list[int | None]] = {}
    for which, ranking in enumerate(rankings):
        for position, key in enumerate(ranking, start=1):
            slots = ranks.setdefault(key, [None] * len(rankings))
            if slots[which] is None:
                slots[which] = position
    fused = [
        Fused(key=key, score=sum(1.0 / (k + r) for r in slots if r is not None), ranks=tuple(slots))
        for key, slots in ranks.items()
    ]
    fused.sort(key=lambda f: (-f.score, min(r for r in f.ranks if r is not None), f.key))
    return fused if limit is None else fused[:limit]
