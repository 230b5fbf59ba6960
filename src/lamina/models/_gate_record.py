"""What the accuracy gate recorded about a quantized variant, and how it is kept in ``model_gate``.

A variant is a ``model_versions`` row like any other; its ``model_gate`` row (written in the same
transaction) says which version it came from, how it was quantized, what the evaluation measured and the
tolerance it was held to. A ``failed`` row keeps the variant from serving: the registry refuses to resolve it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Connection, delete, insert, select

from lamina.clock import utcnow
from lamina.errors import GateFailedError
from lamina.store import model_gate

GateStatus = Literal["passed", "failed"]

#: each tolerance: the figure it bounds, and whether that figure must stay at least or at most the limit
LIMITS: dict[str, tuple[str, Literal["at least", "at most"]]] = {
    "min_cosine": ("cosine_min", "at least"),
    "min_mean_cosine": ("cosine_mean", "at least"),
    "max_ndcg_drop": ("ndcg_drop", "at most"),
    "min_agreement": ("agreement", "at least"),
    "max_perplexity_ratio": ("perplexity_ratio", "at most"),
}

#: gate records by (name, version)
GateMap = dict[tuple[str, str], "GateRecord"]


@dataclass(frozen=True)
class GateRecord:
    """The gate's verdict on one variant: its origin, its figures and the tolerance they were held to."""

    parent_version: str
    method: str
    status: GateStatus
    figures: dict[str, float]
    tolerance: dict[str, float]
    #: the dataset version the texts came from, when one was given
    dataset: str | None = None

    @property
    def reasons(self) -> tuple[str, ...]:
        return judge(self.figures, self.tolerance)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_json(self) -> dict[str, Any]:
        return {
            "parent_version": self.parent_version,
            "method": self.method,
            "status": self.status,
            "figures": dict(self.figures),
            "tolerance": dict(self.tolerance),
            "dataset": self.dataset,
            "reasons": list(self.reasons),
        }

    def summary(self) -> str:
        """One line: the verdict and every figure, for tables and error messages."""
        figures = ", ".join(f"{k} {v:.5g}" for k, v in self.figures.items())
        limits = ", ".join(f"{k} {v:g}" for k, v in self.tolerance.items())
        return f"{self.status} ({self.method} of @{self.parent_version}): {figures}; tolerance {limits}"


def judge(figures: dict[str, float], tolerance: dict[str, float]) -> tuple[str, ...]:
    """Each figure outside its tolerance, in words; empty when every measured figure is within.

    A tolerance whose figure was not measured (nDCG without labelled queries) does not count."""
    reasons = []
    for key, limit in tolerance.items():
        figure, sense = LIMITS[key]
        value = figures.get(figure)
        if value is None:
            continue
        if (value < limit) if sense == "at least" else (value > limit):
            reasons.append(f"{figure} {value:.5f} is not {sense} {limit:g} ({key})")
    return tuple(reasons)


def refusal(ref: str, record: GateRecord) -> GateFailedError:
    """The error a failed variant raises wherever it would be resolved to serve."""
    why = "; ".join(record.reasons) or "a figure fell outside the tolerance"
    return GateFailedError(
        f"{ref} failed its accuracy gate and never serves: {why} ({record.summary()}); serve "
        f"@{record.parent_version} instead, or quantize again with another --method or a looser --tolerance",
        param="model",
        gate=record.to_json(),
    )


def gates_by_version(conn: Connection, name: str | None) -> GateMap:
    """Every gate record (of ``name`` only, when given)."""
    query = select(model_gate)
    if name is not None:
        query = query.where(model_gate.c.name == name)
    return {(row.name, row.version): _from_row(row) for row in conn.execute(query)}


def write_gate(conn: Connection, name: str, version: str, record: GateRecord) -> None:
    """Record (or replace) the gate's verdict on ``name@version``."""
    where = (model_gate.c.name == name) & (model_gate.c.version == version)
    conn.execute(delete(model_gate).where(where))
    conn.execute(
        insert(model_gate).values(
            name=name,
            version=version,
            parent_version=record.parent_version,
            method=record.method,
            status=record.status,
            figures=record.figures,
            tolerance=record.tolerance,
            dataset=record.dataset,
            created_at=utcnow(),
        )
    )


def drop_gate(conn: Connection, name: str, version: str) -> None:
    conn.execute(delete(model_gate).where((model_gate.c.name == name) & (model_gate.c.version == version)))


def _from_row(row: Any) -> GateRecord:
    return GateRecord(
        parent_version=row.parent_version,
        method=row.method,
        status="passed" if row.status == "passed" else "failed",
        figures={k: float(v) for k, v in row.figures.items()},
        tolerance={k: float(v) for k, v in row.tolerance.items()},
        dataset=row.dataset,
    )
