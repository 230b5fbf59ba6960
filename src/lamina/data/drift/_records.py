"""What a drift check produces: its metrics as stored JSON, and the report."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypedDict

from lamina.data.drift._coverage import CoverageResult
from lamina.data.drift._stats import ClassifierResult, MMDResult

#: drift: both embedding tests fired; possible_drift: one did (each fires on 5% of same-distribution
#: windows by design, so one alone is a reason to look, not an alarm); no_drift; insufficient_data.
Verdict = Literal["drift", "possible_drift", "no_drift", "insufficient_data"]


class LengthResult(TypedDict):
    unit: str
    reference_median: float
    current_median: float
    ks: float
    p_value: float
    shifted: bool


class OOVResult(TypedDict):
    reference_rate: float
    current_rate: float
    vocabulary: int
    shifted: bool


class DriftMetricsJSON(TypedDict):
    n_reference: int
    n_current: int
    min_current: int
    min_reference: int
    classifier: ClassifierResult | None
    mmd: MMDResult | None
    prompt_length: LengthResult | None
    oov: OOVResult | None
    coverage: CoverageResult | None


@dataclass(frozen=True, slots=True)
class DriftReport:
    """One drift check, as stored."""

    id: str
    dataset: str
    version: str
    window: str
    created_at: datetime
    verdict: Verdict
    metrics: DriftMetricsJSON
    explanation: str

    @property
    def drifted(self) -> bool:
        return self.verdict == "drift"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "dataset": self.dataset,
            "version": self.version,
            "window": self.window,
            "created_at": self.created_at.isoformat(),
            "verdict": self.verdict,
            "drifted": self.drifted,
            "metrics": self.metrics,
            "explanation": self.explanation,
        }
