"""The drift statistics on synthetic data with known answers (seeded generators, no model)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lamina.data.drift import _stats as stats
from lamina.data.drift import coverage, top_terms
from lamina.errors import InvalidRequestError


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize(
    ("labels", "scores", "auc"),
    [
        ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75),  # scikit-learn's documented example
        ([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], 1.0),
        ([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1], 0.0),
        ([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5], 0.5),  # all ties
        ([0, 0, 1], [0.2, 0.5, 0.5], 0.75),  # one tie between classes counts 1/2
    ],
)
def test_roc_auc_known_values(labels: list[int], scores: list[float], auc: float) -> None:
    assert stats.roc_auc(labels, scores) == pytest.approx(auc)


def test_roc_auc_needs_both_classes() -> None:
    with pytest.raises(InvalidRequestError):
        stats.roc_auc([1, 1], [0.1, 0.2])


@pytest.mark.parametrize(
    ("auc", "n", "p"),
    [(0.5, 30, 0.5), (1.0, 30, 0.0), (0.55, 30, 0.2534), (0.55, 1000, 5.39e-5), (0.4, 100, 0.9926)],
)
def test_auc_p_value(auc: float, n: int, p: float) -> None:
    assert stats.auc_p_value(auc, n, n) == pytest.approx(p, rel=0.01, abs=1e-6)


def test_stratified_folds_spread_each_class_evenly() -> None:
    labels = np.array([0] * 10 + [1] * 15)
    folds = stats.stratified_folds(labels, 5, rng())
    for f in range(5):
        assert (labels[folds == f] == 0).sum() == 2
        assert (labels[folds == f] == 1).sum() == 3


def test_logistic_regression_separates_and_is_regularised() -> None:
    x = np.array([[-2.0], [-1.0], [1.0], [2.0]])
    y = np.array([0.0, 0.0, 1.0, 1.0])
    w = stats.fit_logistic(x, y, l2=1.0)
    assert w[0] > 0 and abs(w[1]) < 1e-6  # symmetric data: no intercept
    strong = stats.fit_logistic(x, y, l2=100.0)
    assert 0 < strong[0] < w[0]  # stronger L2 shrinks the weight
    # the gradient vanishes at the optimum: X'(p - y) + l2 w = 0 on the weight, X'(p - y) = 0 on the bias
    p = 1 / (1 + np.exp(-(x[:, 0] * w[0] + w[1])))
    assert (x[:, 0] @ (p - y) + w[0]) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    ("shift", "drifted", "low", "high"),
    [(0.0, False, 0.35, 0.55), (0.3, True, 0.6, 0.9), (3.0, True, 0.99, 1.0)],
)
def test_domain_classifier_table(shift: float, drifted: bool, low: float, high: float) -> None:
    g = rng(1)
    reference = g.normal(size=(400, 8))
    current = g.normal(size=(300, 8)) + shift
    result = stats.domain_classifier(reference, current, rng(2))
    assert low <= result["auc"] <= high
    assert result["drifted"] is drifted
    assert (result["p_value"] < 0.05) is drifted
    assert result["n_reference"] == result["n_current"] == 300  # balanced: the larger side subsampled
    assert result["folds"] == 5


def test_domain_classifier_caps_each_side() -> None:
    g = rng(3)
    result = stats.domain_classifier(
        g.normal(size=(500, 4)), g.normal(size=(500, 4)), rng(), max_per_side=100
    )
    assert result["n_reference"] == result["n_current"] == 100


def test_median_bandwidth_is_the_median_distance() -> None:
    points = np.array([[0.0], [1.0], [3.0]])  # distances 1, 2, 3
    assert stats.median_bandwidth(stats.squared_distances(points, points)) == pytest.approx(2.0)
    same = np.zeros((3, 2))
    assert stats.median_bandwidth(stats.squared_distances(same, same)) == 1.0


def test_unbiased_mmd_has_the_closed_form_value() -> None:
    # X = Y = {0, 1}: MMD²_u = k01 + k01 - 2 (1 + 1 + 2 k01) / 4 = k01 - 1
    x = np.array([[0.0], [1.0]])
    result = stats.mmd_test(x, x, rng(), permutations=10, bandwidth=1.0)
    assert result["mmd2"] == pytest.approx(math.exp(-0.5) - 1.0)


@pytest.mark.parametrize(("shift", "drifted"), [(0.0, False), (1.0, True)])
def test_mmd_permutation_test(shift: float, drifted: bool) -> None:
    g = rng(4)
    result = stats.mmd_test(g.normal(size=(150, 5)), g.normal(size=(100, 5)) + shift, rng(5))
    assert result["drifted"] is drifted
    assert result["permutations"] == 200
    if drifted:
        assert result["p_value"] == pytest.approx(1 / 201)  # no permutation reached the observed value
    else:
        assert result["p_value"] > 0.05


def test_mmd_is_seeded() -> None:
    g = rng(6)
    a, b = g.normal(size=(60, 3)), g.normal(size=(60, 3)) + 0.2
    assert stats.mmd_test(a, b, rng(7)) == stats.mmd_test(a, b, rng(7))


@pytest.mark.parametrize(("lam", "p"), [(0.1, 1.0), (1.0, 0.26999967), (1.358, 0.05004), (2.0, 0.00067)])
def test_kolmogorov_distribution(lam: float, p: float) -> None:
    assert stats.kolmogorov_sf(lam) == pytest.approx(p, rel=2e-3)


def test_ks_two_samples() -> None:
    disjoint = stats.ks_2samp([1, 2, 3, 4, 5], [6, 7, 8, 9, 10])
    assert disjoint["statistic"] == 1.0 and disjoint["p_value"] < 0.01
    assert stats.ks_2samp([1, 2, 3], [1, 2, 3])["statistic"] == 0.0
    half = stats.ks_2samp([1, 2, 3, 4], [3, 4, 5, 6])
    assert half["statistic"] == pytest.approx(0.5)
    g = rng(8)
    same = stats.ks_2samp(g.normal(size=300), g.normal(size=300))
    assert same["p_value"] > 0.05


def test_oov_rate() -> None:
    assert stats.oov_rate({"apple", "banana"}, [["zebra", "apple"], ["banana"]]) == pytest.approx(1 / 3)
    assert stats.oov_rate({"a"}, []) == 0.0


def test_nearest_distances_leave_one_out() -> None:
    ref = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    dist, idx = stats.nearest_distances(np.array([[0.0, 2.0]]), ref)
    assert idx.tolist() == [1] and dist[0] == pytest.approx(0.0)
    _, nearest = stats.nearest_distances(ref, ref, exclude_self=True)
    assert nearest.tolist() == [2, 2, 0]


def test_leader_clusters_group_by_direction() -> None:
    v = np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9], [0.95, 0.0]])
    assert stats.leader_clusters(v) == [[0, 2, 4], [1, 3]]


def test_top_terms_count_words_once_per_text_unknown_words_first() -> None:
    texts = ["The galaxy and the galaxy", "a galaxy of stars", "stars shine"]
    assert top_terms(texts, 2) == ["galaxy", "stars"]
    assert top_terms(texts, 2, known={"galaxy"}) == ["stars", "shine"]


def test_coverage_finds_the_uncovered_cluster() -> None:
    g = rng(9)
    centre_a, centre_b = np.eye(16)[0] * 5, np.eye(16)[1] * 5
    reference = centre_a + g.normal(size=(200, 16))
    near = centre_a + g.normal(size=(40, 16))
    far = centre_b + 0.5 * g.normal(size=(10, 16))
    texts = [f"cooking question {i}" for i in range(40)] + [f"telescope galaxy {i}" for i in range(10)]
    result = coverage(reference, np.vstack([near, far]), texts, examples=3, reference_texts=["cooking"])
    assert result["uncovered"] >= 10
    assert all("galaxy" in ex["text"] for ex in result["examples"])
    assert result["clusters"][0]["terms"][:2] == ["galaxy", "telescope"]
    assert result["clusters"][0]["size"] == 10


def test_coverage_examples_come_from_every_group() -> None:
    g = rng(10)
    reference = np.eye(8)[0] * 5 + g.normal(size=(100, 8))
    groups = [np.eye(8)[k] * 5 + 0.3 * g.normal(size=(6, 8)) for k in (1, 2)]
    texts = [f"moon {i}" for i in range(6)] + [f"tax {i}" for i in range(6)]
    result = coverage(reference, np.vstack(groups), texts, examples=2)
    assert sorted(ex["text"].split()[0] for ex in result["examples"]) == ["moon", "tax"]
    assert [c["size"] for c in result["clusters"]] == [6, 6]
