"""A drift check: a dataset version (reference) against the sampled traffic of a time window (current).

The reference is the version's chunks, read back with their vectors from the vector store (a seeded sample
of at most ``max_reference`` of them); the current sample is the drift window's requests of the last
``--window``, drawn by weight so that busy hours count as much as they were busy. The verdict is "drift"
when both embedding tests fire (domain classifier and MMD), "possible_drift" when one does; prompt length
and vocabulary say how the traffic differs, not whether it does: chunk lengths are set by the chunker,
so a length shift alone says more about chunking than about users. Every report is stored in
``drift_reports`` and can be exported as Prometheus gauges.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, cast

import numpy as np
from sqlalchemy import insert, select

from lamina.clock import Clock, utcnow
from lamina.data.drift import _stats as stats
from lamina.data.drift._coverage import coverage
from lamina.data.drift._explain import explain
from lamina.data.drift._records import DriftMetricsJSON, DriftReport, LengthResult, OOVResult, Verdict
from lamina.data.drift._window import DriftWindow, Sample, parse_window
from lamina.data.vectors import Chunk, EnglishAnalyzer, VectorStore
from lamina.data.versions import DatasetCatalog
from lamina.errors import NotFoundError
from lamina.observability import DriftMetrics
from lamina.store import Store, drift_reports


class VersionResolver(Protocol):
    """``NAME[@V]`` to its dataset, version id and chunk ids; the dataset catalog implements it."""

    def resolve(self, ref: str) -> tuple[str, str, Collection[str]]: ...


class CatalogResolver:
    """A drift check's resolver over the dataset catalog: its version and that version's chunk ids."""

    def __init__(self, catalog: DatasetCatalog) -> None:
        self.catalog = catalog

    def resolve(self, ref: str) -> tuple[str, str, Collection[str]]:
        version = self.catalog.resolve(ref)
        return version.dataset, version.version_id, self.catalog.members(version)


@dataclass(frozen=True, slots=True)
class DriftSettings:
    """The knobs of a drift check; the defaults are what ``lamina data drift`` uses."""

    #: Fewer current samples than this: no verdict ("insufficient_data"), rather than a guess.
    min_current: int = 30
    #: Fewer reference chunks than this: no verdict either.
    min_reference: int = 30
    #: Samples per side for the classifier and MMD (larger sides are subsampled).
    max_per_side: int = 1000
    #: Reference chunks read for coverage and vocabulary.
    max_reference: int = 5000
    folds: int = 5
    permutations: int = 200
    auc_threshold: float = stats.AUC_THRESHOLD
    p_threshold: float = stats.P_THRESHOLD
    #: The current OOV rate must exceed the held-out reference's by this much to count as a shift.
    oov_margin: float = 0.05
    #: Share of the reference held out to measure its own OOV rate.
    oov_holdout: float = 0.2
    #: Current samples farther from the reference than this quantile of the reference's own
    #: nearest-neighbour distances count as not covered.
    coverage_quantile: float = 0.95
    #: Examples of uncovered traffic shown.
    examples: int = 5


class DriftReports:
    """The stored reports (table ``drift_reports``)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def save(self, report: DriftReport) -> None:
        with self.store.begin() as conn:
            conn.execute(
                insert(drift_reports).values(
                    id=report.id,
                    dataset=report.dataset,
                    version=report.version,
                    window=report.window,
                    created_at=report.created_at,
                    verdict=report.verdict,
                    drifted=report.drifted,
                    metrics=report.metrics,
                    explanation=report.explanation,
                )
            )

    def history(self, dataset: str | None = None, *, limit: int = 100) -> list[DriftReport]:
        """Newest first."""
        query = select(drift_reports).order_by(drift_reports.c.created_at.desc()).limit(limit)
        if dataset is not None:
            query = query.where(drift_reports.c.dataset == dataset)
        with self.store.begin() as conn:
            rows = conn.execute(query).all()
        return [_from_row(r) for r in rows]

    def get(self, report_id: str) -> DriftReport:
        with self.store.begin() as conn:
            row = conn.execute(select(drift_reports).where(drift_reports.c.id == report_id)).first()
        if row is None:
            raise NotFoundError(f"no drift report {report_id!r}; `lamina data drift NAME` makes one")
        return _from_row(row)

    def latest(self) -> list[DriftReport]:
        """The newest report of each dataset."""
        newest: dict[str, DriftReport] = {}
        for report in self.history(limit=10_000):
            newest.setdefault(report.dataset, report)
        return list(newest.values())


def _from_row(row: Any) -> DriftReport:
    return DriftReport(
        id=row.id,
        dataset=row.dataset,
        version=row.version,
        window=row.window,
        created_at=row.created_at,
        verdict=cast(Verdict, row.verdict),
        metrics=cast(DriftMetricsJSON, row.metrics),
        explanation=row.explanation,
    )


def publish_drift_metrics(reports: Sequence[DriftReport], metrics: DriftMetrics) -> None:
    """Set the drift gauges from reports (e.g. :meth:`DriftReports.latest`), one series per dataset."""
    for report in reports:
        m = report.metrics
        metrics.set(
            report.dataset,
            auc=m["classifier"]["auc"] if m["classifier"] else None,
            mmd2=m["mmd"]["mmd2"] if m["mmd"] else None,
            p_value=m["mmd"]["p_value"] if m["mmd"] else None,
            drifted=report.drifted,
        )


def weighted_pick(samples: Sequence[Sample], limit: int, rng: np.random.Generator) -> list[Sample]:
    """At most ``limit`` samples, each drawn with probability growing with its weight (Efraimidis-Spirakis).

    In time order, so that reports are stable for one seed.
    """
    if len(samples) <= limit:
        return list(samples)
    weights = np.array([s.weight for s in samples])
    keys = np.log(rng.random(len(samples))) / weights
    chosen = np.sort(np.argsort(-keys)[:limit])
    return [samples[i] for i in chosen]


def _lengths(reference: Sequence[Chunk], current: Sequence[Sample], p_threshold: float) -> LengthResult:
    ref = [len(c.text) for c in reference]
    cur = [s.length for s in current]
    ks = stats.ks_2samp(ref, cur)
    return LengthResult(
        unit="chars",
        reference_median=float(np.median(ref)),
        current_median=float(np.median(cur)),
        ks=ks["statistic"],
        p_value=ks["p_value"],
        shifted=ks["p_value"] < p_threshold,
    )


def _oov(
    reference: Sequence[Chunk], current: Sequence[Sample], settings: DriftSettings, rng: np.random.Generator
) -> OOVResult:
    analyzer = EnglishAnalyzer()
    ref_tokens = [analyzer.tokens(c.text) for c in reference]
    order = rng.permutation(len(ref_tokens))
    held = max(1, int(len(order) * settings.oov_holdout))
    vocabulary = {t for i in order[held:] for t in ref_tokens[i]}
    ref_rate = stats.oov_rate(vocabulary, [ref_tokens[i] for i in order[:held]])
    cur_rate = stats.oov_rate(vocabulary, [analyzer.tokens(s.text) for s in current])
    return OOVResult(
        reference_rate=ref_rate,
        current_rate=cur_rate,
        vocabulary=len(vocabulary),
        shifted=cur_rate > ref_rate + settings.oov_margin,
    )


class DriftChecker:
    """Runs drift checks: reads both sides, computes every statistic, explains, stores."""

    def __init__(
        self,
        *,
        resolver: VersionResolver,
        vectors: VectorStore,
        window: DriftWindow,
        reports: DriftReports | None = None,
        settings: DriftSettings | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self.resolver = resolver
        self.vectors = vectors
        self.window = window
        self.reports = reports
        self.settings = settings or DriftSettings()
        self._clock = clock

    def check(self, ref: str, window: str = "24h", *, rng: np.random.Generator | None = None) -> DriftReport:
        """Compare ``ref``'s version with the traffic of the last ``window``; stored if reports are given."""
        rng = rng if rng is not None else np.random.default_rng()
        span = parse_window(window)
        dataset, version, members = self.resolver.resolve(ref)
        chunk_ids = sorted(members)  # a stable order: the same seed picks the same reference
        s = self.settings
        # the current side is capped like the reference: the tests subsample further to max_per_side
        current = weighted_pick(self.window.samples(dataset, span), s.max_reference, rng)
        picked = stats.subsample(len(chunk_ids), s.max_reference, rng)
        reference = self.vectors.get(dataset, [chunk_ids[i] for i in picked], with_vectors=True)
        metrics = DriftMetricsJSON(
            n_reference=len(reference),
            n_current=len(current),
            min_current=s.min_current,
            min_reference=s.min_reference,
            classifier=None,
            mmd=None,
            prompt_length=None,
            oov=None,
            coverage=None,
        )
        verdict: Verdict = "insufficient_data"
        if len(current) >= s.min_current and len(reference) >= s.min_reference:
            self._compute(metrics, dataset, chunk_ids, reference, current, rng)
            fired = [metrics["classifier"]["drifted"], metrics["mmd"]["drifted"]]  # type: ignore[index]
            verdict = "drift" if all(fired) else "possible_drift" if any(fired) else "no_drift"
        report = DriftReport(
            id=uuid.uuid4().hex,
            dataset=dataset,
            version=version,
            window=window,
            created_at=self._clock(),
            verdict=verdict,
            metrics=metrics,
            explanation="",
        )
        report = replace(report, explanation=explain(report))
        if self.reports is not None:
            self.reports.save(report)
        return report

    def _compute(
        self,
        metrics: DriftMetricsJSON,
        dataset: str,
        chunk_ids: Sequence[str],
        reference: Sequence[Chunk],
        current: Sequence[Sample],
        rng: np.random.Generator,
    ) -> None:
        s = self.settings
        ref_vectors = np.array([c.vector for c in reference], dtype=np.float64)
        cur_vectors = np.array([x.vector for x in current], dtype=np.float64)
        metrics["classifier"] = stats.domain_classifier(
            ref_vectors,
            cur_vectors,
            rng,
            folds=s.folds,
            max_per_side=s.max_per_side,
            threshold=s.auc_threshold,
            significance=s.p_threshold,
        )
        metrics["mmd"] = stats.mmd_test(
            ref_vectors,
            cur_vectors,
            rng,
            permutations=s.permutations,
            max_per_side=s.max_per_side,
            threshold=s.p_threshold,
        )
        metrics["prompt_length"] = _lengths(reference, current, s.p_threshold)
        metrics["oov"] = _oov(reference, current, s, rng)
        metrics["coverage"] = coverage(
            ref_vectors,
            cur_vectors,
            [x.text for x in current],
            quantile=s.coverage_quantile,
            examples=s.examples,
            nearest=lambda v: self._nearest_chunk(dataset, chunk_ids, v),
            reference_texts=[c.text for c in reference],
        )

    def _nearest_chunk(
        self, dataset: str, chunk_ids: Sequence[str], vector: Any
    ) -> tuple[str, str, float] | None:
        """The version's nearest chunk to ``vector`` in the whole version: (id, source URI, similarity)."""
        hits = self.vectors.search(dataset, query_vector=vector, k=1, chunk_ids=chunk_ids)
        return (hits[0].chunk.chunk_id, hits[0].chunk.source_uri, hits[0].score) if hits else None
