"""The statistics of a drift check: pure functions of arrays and an injected random generator.

Two tests decide whether live traffic (current) differs from a dataset (reference) in embedding space:

- the domain classifier: label reference 0 and current 1, fit an L2-regularised logistic regression with
  stratified k-fold cross-validation and score the out-of-fold ROC AUC. 0.5 means the classifier cannot
  tell the two apart; drift above 0.55, Evidently's default, when the AUC is also significantly above 0.5
  (on small samples the threshold alone fires on noise). It answers "can one tell traffic from data?".
- MMD (maximum mean discrepancy) with an RBF kernel whose bandwidth is the median pairwise distance (the
  median heuristic), unbiased estimator, and a permutation p-value: the significance test of the pair.

Two more statistics say how the traffic differs: prompt length (two-sample Kolmogorov-Smirnov) and the
out-of-vocabulary rate, and :func:`nearest_distances` finds the traffic the dataset does not cover.

Everything here is numpy only (no scipy, no scikit-learn): logistic regression by Newton's method is a
dozen lines, and the Kolmogorov distribution a short series.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, TypedDict

import numpy as np
import numpy.typing as npt

from lamina.errors import InvalidRequestError

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: Evidently's default: a domain classifier with a higher out-of-fold ROC AUC means drift.
AUC_THRESHOLD = 0.55
#: MMD drift below this permutation p-value.
P_THRESHOLD = 0.05


class ClassifierResult(TypedDict):
    auc: float
    #: One-sided p-value of AUC > 0.5 (Mann-Whitney normal approximation).
    p_value: float
    threshold: float
    drifted: bool
    folds: int
    n_reference: int
    n_current: int


class MMDResult(TypedDict):
    mmd2: float
    p_value: float
    bandwidth: float
    permutations: int
    threshold: float
    drifted: bool


class KSResult(TypedDict):
    statistic: float
    p_value: float


def as_matrix(x: Any) -> FloatArray:
    """A 2-d float64 array (one row per sample)."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise InvalidRequestError(f"expected one vector per row (a 2-d array), got shape {arr.shape}")
    return arr


def subsample(n: int, limit: int, rng: np.random.Generator) -> IntArray:
    """Sorted indices of at most ``limit`` of ``n`` items, drawn without replacement."""
    if n <= limit:
        return np.arange(n, dtype=np.int64)
    return np.sort(rng.choice(n, size=limit, replace=False)).astype(np.int64)


def roc_auc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """ROC AUC as the Mann-Whitney U statistic: P(score of a positive > score of a negative), ties 1/2."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise InvalidRequestError("ROC AUC needs both classes among the labels")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    ranks[order] = np.arange(1, len(s) + 1)
    # ties share their average rank
    uniq, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    if len(uniq) < len(s):
        sums = np.bincount(inverse, weights=ranks)
        ranks = (sums / counts)[inverse]
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def stratified_folds(labels: npt.ArrayLike, k: int, rng: np.random.Generator) -> IntArray:
    """A fold number in ``[0, k)`` per sample, each class spread evenly over the folds."""
    y = np.asarray(labels)
    folds = np.empty(len(y), dtype=np.int64)
    for cls in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == cls))
        folds[idx] = np.arange(len(idx)) % k
    return folds


def fit_logistic(x: FloatArray, y: FloatArray, *, l2: float = 1.0, max_iter: int = 50) -> FloatArray:
    """Weights (intercept last) minimising log-loss + ``l2``/2 ||w||^2 (intercept free), by Newton's method.

    ``l2 = 1`` is scikit-learn's default ``C = 1``. The loss is strictly convex, so Newton converges in a
    handful of steps; each step solves one (d+1)-square system.
    """
    xb = np.hstack([x, np.ones((len(x), 1))])
    penalty = np.full(xb.shape[1], l2)
    penalty[-1] = 0.0
    w = np.zeros(xb.shape[1])
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-np.clip(xb @ w, -30, 30)))
        grad = xb.T @ (p - y) + penalty * w
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-7:
            break
    return w


def predict_logistic(w: FloatArray, x: FloatArray) -> FloatArray:
    """The decision function (log-odds of class 1); ranking by it is ranking by probability."""
    result: FloatArray = x @ w[:-1] + w[-1]
    return result


def domain_classifier(
    reference: Any,
    current: Any,
    rng: np.random.Generator,
    *,
    folds: int = 5,
    max_per_side: int = 1000,
    l2: float = 1.0,
    threshold: float = AUC_THRESHOLD,
    significance: float = P_THRESHOLD,
) -> ClassifierResult:
    """Out-of-fold ROC AUC of a classifier telling current (1) from reference (0), on balanced samples.

    Drift: AUC above ``threshold`` and significantly above 0.5 (see :func:`auc_p_value`).
    """
    ref, cur = as_matrix(reference), as_matrix(current)
    m = min(len(ref), len(cur), max_per_side)
    if m < 2:
        raise InvalidRequestError("the domain classifier needs at least 2 samples on each side")
    ref, cur = ref[subsample(len(ref), m, rng)], cur[subsample(len(cur), m, rng)]
    x = np.vstack([ref, cur])
    y = np.concatenate([np.zeros(m), np.ones(m)])
    k = min(folds, m)
    fold = stratified_folds(y, k, rng)
    scores = np.empty(len(y))
    for f in range(k):
        test = fold == f
        w = fit_logistic(x[~test], y[~test], l2=l2)
        scores[test] = predict_logistic(w, x[test])
    auc = roc_auc(y, scores)
    p = auc_p_value(auc, m, m)
    return ClassifierResult(
        auc=auc,
        p_value=p,
        threshold=threshold,
        drifted=auc > threshold and p < significance,
        folds=k,
        n_reference=m,
        n_current=m,
    )


def auc_p_value(auc: float, n_pos: int, n_neg: int) -> float:
    """P(AUC >= auc) when the classes are indistinguishable: the Mann-Whitney normal approximation.

    Why beside the 0.55 threshold: on 30 + 30 samples the AUC of pure noise has a standard deviation of
    0.075, so the threshold alone would cry drift one time in four. Requiring both, the threshold is an
    effect-size floor and the p-value keeps false alarms on small windows near ``significance``.
    """
    se = np.sqrt((n_pos + n_neg + 1) / (12.0 * n_pos * n_neg))
    return 0.5 * math.erfc((auc - 0.5) / se / math.sqrt(2.0))


def squared_distances(a: FloatArray, b: FloatArray) -> FloatArray:
    """Pairwise squared Euclidean distances, never negative."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    result: FloatArray = np.maximum(d, 0.0)
    return result


def median_bandwidth(sq: FloatArray) -> float:
    """The median heuristic: the median distance between distinct points (1.0 if they all coincide)."""
    upper = sq[np.triu_indices(len(sq), k=1)]
    median = float(np.sqrt(np.median(upper))) if len(upper) else 0.0
    return median if median > 0 else 1.0


def _mmd2_from_sums(s_xx: FloatArray, s_xy: FloatArray, total: float, n: int, m: int) -> FloatArray:
    s_yy = total - s_xx - 2.0 * s_xy
    result: FloatArray = s_xx / (n * (n - 1)) + s_yy / (m * (m - 1)) - 2.0 * s_xy / (n * m)
    return result


def mmd_test(
    reference: Any,
    current: Any,
    rng: np.random.Generator,
    *,
    permutations: int = 200,
    max_per_side: int = 1000,
    bandwidth: float | None = None,
    threshold: float = P_THRESHOLD,
) -> MMDResult:
    """Unbiased MMD^2 with an RBF kernel and its permutation p-value.

    With ``Kd`` the kernel matrix of the pooled sample with a zero diagonal and ``e`` the indicator of the
    reference rows, the within- and cross-sums are ``e'Kd e`` and ``e'Kd 1 - e'Kd e``, so every permutation
    costs one row of a matrix product and all of them run as one.
    """
    ref, cur = as_matrix(reference), as_matrix(current)
    ref = ref[subsample(len(ref), max_per_side, rng)]
    cur = cur[subsample(len(cur), max_per_side, rng)]
    n, m = len(ref), len(cur)
    if n < 2 or m < 2:
        raise InvalidRequestError("MMD needs at least 2 samples on each side")
    z = np.vstack([ref, cur])
    sq = squared_distances(z, z)
    sigma = bandwidth if bandwidth is not None else median_bandwidth(sq)
    kd = np.exp(-sq / (2.0 * sigma * sigma))
    np.fill_diagonal(kd, 0.0)
    row_sums, total = kd.sum(1), float(kd.sum())
    e = np.zeros((permutations + 1, n + m))
    e[0, :n] = 1.0
    for i in range(1, permutations + 1):
        e[i, rng.permutation(n + m)[:n]] = 1.0
    s_xx = ((e @ kd) * e).sum(1)
    s_xy = e @ row_sums - s_xx
    stats = _mmd2_from_sums(s_xx, s_xy, total, n, m)
    p = float((1 + np.sum(stats[1:] >= stats[0] - 1e-12)) / (1 + permutations))
    return MMDResult(
        mmd2=float(stats[0]),
        p_value=p,
        bandwidth=sigma,
        permutations=permutations,
        threshold=threshold,
        drifted=p < threshold,
    )


def kolmogorov_sf(lam: float) -> float:
    """P(K > lam) for the Kolmogorov distribution: 2 sum_{j>=1} (-1)^(j-1) exp(-2 j^2 lam^2)."""
    if lam < 0.2:  # the series converges slowly here, and the probability is 1 to 12 decimals
        return 1.0
    j = np.arange(1, 101)
    terms = 2.0 * (-1.0) ** (j - 1) * np.exp(-2.0 * j * j * lam * lam)
    return float(min(max(terms.sum(), 0.0), 1.0))


def ks_2samp(a: npt.ArrayLike, b: npt.ArrayLike) -> KSResult:
    """Two-sample Kolmogorov-Smirnov statistic and its asymptotic p-value (Stephens' small-n correction)."""
    x = np.sort(np.asarray(a, dtype=np.float64))
    y = np.sort(np.asarray(b, dtype=np.float64))
    if len(x) == 0 or len(y) == 0:
        raise InvalidRequestError("the KS test needs at least one value on each side")
    grid = np.concatenate([x, y])
    cdf_x = np.searchsorted(x, grid, side="right") / len(x)
    cdf_y = np.searchsorted(y, grid, side="right") / len(y)
    d = float(np.max(np.abs(cdf_x - cdf_y)))
    en = np.sqrt(len(x) * len(y) / (len(x) + len(y)))
    return KSResult(statistic=d, p_value=kolmogorov_sf((en + 0.12 + 0.11 / en) * d))


def oov_rate(vocabulary: set[str], token_lists: Iterable[Sequence[str]]) -> float:
    """The share of tokens not in ``vocabulary`` (0.0 when there are no tokens)."""
    total = missing = 0
    for tokens in token_lists:
        total += len(tokens)
        missing += sum(1 for t in tokens if t not in vocabulary)
    return missing / total if total else 0.0


def unit_rows(x: FloatArray) -> FloatArray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    result: FloatArray = x / np.where(norms > 0, norms, 1.0)
    return result


def nearest_distances(
    queries: Any, reference: Any, *, exclude_self: bool = False, block: int = 512
) -> tuple[FloatArray, IntArray]:
    """Cosine distance from each query row to its nearest reference row, and that row's index.

    ``exclude_self`` (queries == reference) skips each row's match with itself: leave-one-out distances.
    """
    q, r = unit_rows(as_matrix(queries)), unit_rows(as_matrix(reference))
    dist = np.empty(len(q))
    nearest = np.empty(len(q), dtype=np.int64)
    for start in range(0, len(q), block):
        sims = q[start : start + block] @ r.T
        if exclude_self:
            rows = np.arange(len(sims))
            sims[rows, start + rows] = -np.inf
        best = np.argmax(sims, axis=1)
        nearest[start : start + block] = best
        dist[start : start + block] = 1.0 - sims[np.arange(len(sims)), best]
    return dist, nearest


def leader_clusters(vectors: Any, *, min_similarity: float = 0.5) -> list[list[int]]:
    """Greedy clusters: each row joins the first cluster whose leader it is this cosine-similar to.

    Rows are taken in the order given (the report gives the farthest first, so leaders are the most
    uncovered requests). Clusters come back largest first.
    """
    v = unit_rows(as_matrix(vectors))
    leaders: list[int] = []
    clusters: list[list[int]] = []
    for i in range(len(v)):
        if leaders:
            sims = v[leaders] @ v[i]
            best = int(np.argmax(sims))
            if sims[best] >= min_similarity:
                clusters[best].append(i)
                continue
        leaders.append(i)
        clusters.append([i])
    return sorted(clusters, key=len, reverse=True)
