"""Prometheus series for the request path at a fraction of prometheus_client's cost per update.

prometheus_client guards every value with a lock and checks on each ``inc`` and ``observe`` that the metric
has labels; a chat request updates about thirty series, which cost more than all of its spans. Here a
series is a plain object whose update is one addition (a histogram's: a bisection and two additions), and
one collector on the registry turns them into the usual exposition when scraped: the same names, types,
labels and buckets (counters end in ``_total``; no ``_created`` samples).

No lock: these series are updated by the gateway's event loop only (the request path). The metrics other
threads update (devices, drift, guards, the span writer's losses) stay prometheus_client's.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector


class Value:
    """One counter or gauge series (counters only ever ``inc``)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)


class Buckets:
    """One histogram series: a count per bucket (the last one +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: a value equal to a bound is in its bucket
        self.sum += value

    def observe_many(self, values: Sequence[float] | np.ndarray) -> None:
        """``observe`` each of ``values`` (finite numbers): a batch of more than a few at once, with numpy
        (one bisection and one tally for all of them)."""
        if len(values) <= _FEW:
            counts, bounds, total = self.counts, self.bounds, self.sum
            for value in values:
                counts[bisect_left(bounds, value)] += 1
                total += value
            self.sum = float(total)
            return
        array = np.asarray(values, dtype=np.float64)
        tally = np.bincount(np.searchsorted(self.bounds, array, side="left"), minlength=len(self.counts))
        counts = self.counts
        for i, count in enumerate(tally.tolist()):
            counts[i] += count
        self.sum += float(array.sum())


#: how many values a histogram takes one at a time (numpy's setup costs more than a few bisections)
_FEW = 8


class Family:
    """A metric (name, help, type, label names) and its series by label values."""

    def __init__(
        self, kind: str, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]
    ) -> None:
        self.kind = kind
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.bounds = tuple(float(b) for b in buckets)
        self.series: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> Any:
        """The series of ``values`` (one per label name), made on first use."""
        found = self.series.get(values)
        if found is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes the labels {self.labelnames}, got {values!r}")
            found = self.series[values] = Buckets(self.bounds) if self.kind == "histogram" else Value()
        return found

    def collect(self) -> Any:
        names = list(self.labelnames)
        if self.kind == "counter":
            counter = CounterMetricFamily(self.name, self.documentation, labels=names)
            for values, series in list(self.series.items()):
                counter.add_metric(list(values), series.value)
            return counter
        if self.kind == "gauge":
            gauge = GaugeMetricFamily(self.name, self.documentation, labels=names)
            for values, series in list(self.series.items()):
                gauge.add_metric(list(values), series.value)
            return gauge
        histogram = HistogramMetricFamily(self.name, self.documentation, labels=names)
        bounds = [*(_bound(b) for b in self.bounds), "+Inf"]
        for values, series in list(self.series.items()):
            counts, running, cumulative = list(series.counts), 0, []
            for bound, count in zip(bounds, counts, strict=True):
                running += count
                cumulative.append((bound, float(running)))
            histogram.add_metric(list(values), cumulative, series.sum)
        return histogram


def _bound(value: float) -> str:
    return repr(value)


class FastMetrics(Collector):
    """The families of one registry, collected together; make them with :meth:`counter`, :meth:`gauge`
    and :meth:`histogram` (names as prometheus_client takes them: a counter without ``_total``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.families: list[Family] = []
        #: called before each collection (what counts in batches folds its pending updates in)
        self.before_collect: list[Callable[[], None]] = []
        registry.register(self)

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Family:
        return self._add(Family("counter", name, documentation, labelnames, ()))

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Family:
        return self._add(Family("gauge", name, documentation, labelnames, ()))

    def histogram(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]
    ) -> Family:
        return self._add(Family("histogram", name, documentation, labelnames, buckets))

    def _add(self, family: Family) -> Family:
        self.families.append(family)
        return family

    def collect(self) -> Iterator[Any]:
        for hook in self.before_collect:
            hook()
        for family in self.families:
            yield family.collect()

    def describe(self) -> Iterator[Any]:
        return iter(())  # no names claimed up front: collect() is cheap enough to run at registration
