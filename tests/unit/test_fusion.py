"""Reciprocal rank fusion, table-driven: scores, ranks, ties and limits."""

from __future__ import annotations

import pytest

from lamina.data import RRF_K, Fused, reciprocal_rank_fusion
from lamina.errors import InvalidRequestError


def rrf(*ranks: int) -> float:
    return sum(1.0 / (RRF_K + r) for r in ranks)


@pytest.mark.parametrize(
    ("rankings", "expected"),
    [
        pytest.param([], [], id="nothing"),
        pytest.param([[], []], [], id="two-empty"),
        pytest.param(
            [["a", "b", "c"]],
            [Fused("a", rrf(1), (1,)), Fused("b", rrf(2), (2,)), Fused("c", rrf(3), (3,))],
            id="one-ranking-keeps-its-order",
        ),
        pytest.param(
            [["a", "b"], ["b", "c"]],
            [Fused("b", rrf(2, 1), (2, 1)), Fused("a", rrf(1), (1, None)), Fused("c", rrf(2), (None, 2))],
            id="agreement-wins",
        ),
        pytest.param(
            [["x", "y"], ["y", "x"]],
            [Fused("x", rrf(1, 2), (1, 2)), Fused("y", rrf(2, 1), (2, 1))],
            id="tie-broken-by-key",
        ),
        pytest.param(
            [["b", "a"], ["z"]],
            [Fused("b", rrf(1), (1, None)), Fused("z", rrf(1), (None, 1)), Fused("a", rrf(2), (2, None))],
            id="tie-across-rankings-by-key",
        ),
        pytest.param(
            [["a", "b", "a"], ["a"]],
            [Fused("a", rrf(1, 1), (1, 1)), Fused("b", rrf(2), (2, None))],
            id="repeat-counts-once-at-best-rank",
        ),
        pytest.param(
            [["a", "b", "c", "d"], ["d", "c", "b", "a"]],
            [
                Fused("a", rrf(1, 4), (1, 4)),
                Fused("d", rrf(4, 1), (4, 1)),
                Fused("b", rrf(2, 3), (2, 3)),
                Fused("c", rrf(3, 2), (3, 2)),
            ],
            id="reversed-rankings",
        ),
    ],
)
def test_fusion_table(rankings: list[list[str]], expected: list[Fused]) -> None:
    assert reciprocal_rank_fusion(rankings) == expected


def test_known_scores_with_k_60() -> None:
    fused = reciprocal_rank_fusion([["a", "b"], ["b"]])
    assert fused[0].key == "b"
    assert fused[0].score == pytest.approx(1 / 62 + 1 / 61)
    assert fused[1].score == pytest.approx(1 / 61)


@pytest.mark.parametrize(("k", "first"), [(0, "a"), (60, "b"), (1000, "b")])
def test_k_trades_top_positions_against_agreement(k: int, first: str) -> None:
    # "a" is first in one ranking and fifth in the other; "b" is second in both. A small k rewards the
    # top spot (k=0: 1/1 + 1/5 > 1/2 + 1/2), the usual k=60 rewards agreement.
    rankings = [["a", "b"], ["c", "b", "d", "e", "a"]]
    assert reciprocal_rank_fusion(rankings, k=k)[0].key == first


@pytest.mark.parametrize(("limit", "keys"), [(0, []), (1, ["b"]), (2, ["b", "a"]), (None, ["b", "a", "c"])])
def test_limit(limit: int | None, keys: list[str]) -> None:
    assert [f.key for f in reciprocal_rank_fusion([["a", "b"], ["b", "c"]], limit=limit)] == keys


@pytest.mark.parametrize("bad", [{"k": -1}, {"limit": -1}])
def test_bad_arguments_are_refused(bad: dict[str, int]) -> None:
    with pytest.raises(InvalidRequestError):
        reciprocal_rank_fusion([["a"]], **bad)
