"""The accuracy gate's pure parts: the verdict from figures and tolerance, nDCG@10, the limits per format."""

from __future__ import annotations

import pytest

from lamina.config import GateTolerance, LaminaConfig
from lamina.errors import InvalidRequestError
from lamina.models import GateRecord
from lamina.models._gate import limits_for, ndcg_at_10
from lamina.models._gate_record import judge, refusal
from lamina.models._quantize import check_method


@pytest.mark.parametrize(
    ("figures", "tolerance", "failing"),
    [
        ({"cosine_min": 0.993, "cosine_mean": 0.995}, {"min_cosine": 0.98, "min_mean_cosine": 0.99}, []),
        ({"cosine_min": 0.993, "cosine_mean": 0.995}, {"min_cosine": 0.99999}, ["min_cosine"]),
        (
            {"cosine_min": 0.98, "cosine_mean": 0.98},
            {"min_cosine": 0.98, "min_mean_cosine": 0.99},
            ["min_mean_cosine"],
        ),
        ({"ndcg_drop": 0.011}, {"max_ndcg_drop": 0.01}, ["max_ndcg_drop"]),
        ({"ndcg_drop": 0.01}, {"max_ndcg_drop": 0.01}, []),
        # nDCG not measured (no labelled queries): its limit does not count
        ({"cosine_min": 0.99, "cosine_mean": 0.99}, {"max_ndcg_drop": 0.0}, []),
        (
            {"agreement": 0.68, "perplexity_ratio": 1.53},
            {"min_agreement": 0.9, "max_perplexity_ratio": 1.1},
            ["min_agreement", "max_perplexity_ratio"],
        ),
        (
            {"agreement": 0.98, "perplexity_ratio": 1.004},
            {"min_agreement": 0.9, "max_perplexity_ratio": 1.1},
            [],
        ),
    ],
)
def test_judge_names_each_figure_outside_its_limit(
    figures: dict[str, float], tolerance: dict[str, float], failing: list[str]
) -> None:
    reasons = judge(figures, tolerance)
    assert [r.rsplit("(", 1)[1].rstrip(")") for r in reasons] == failing


def test_a_failed_record_refuses_with_its_figures_and_tolerance() -> None:
    record = GateRecord(
        "1", "onnx-int8-per-tensor", "failed", {"cosine_min": 0.95367}, {"min_cosine": 0.99999}
    )
    assert record.reasons and not record.passed
    error = refusal("m@1-x", record)
    assert error.code == "gate_failed" and error.status == 409
    assert "0.95367" in error.message and "0.99999" in error.message and "@1" in error.message
    assert error.details["gate"]["tolerance"] == {"min_cosine": 0.99999}


def test_ndcg_at_10() -> None:
    assert ndcg_at_10([3, 1, 2], frozenset({3})) == 1.0
    assert ndcg_at_10([1, 3], frozenset({3})) == pytest.approx(1 / 1.58496, rel=1e-4)
    assert ndcg_at_10(list(range(20)), frozenset({15})) == 0.0


def test_tolerance_limits_per_format_and_defaults() -> None:
    tol = GateTolerance()
    assert limits_for(tol, "onnx") == {"min_cosine": 0.98, "min_mean_cosine": 0.99, "max_ndcg_drop": 0.01}
    assert limits_for(tol, "gguf") == {"min_agreement": 0.9, "max_perplexity_ratio": 1.1}
    with pytest.raises(ValueError):
        GateTolerance(min_cosine=1.5)
    configured = LaminaConfig.model_validate({"quantization": {"tolerance": {"min_cosine": 0.995}}})
    assert configured.quantization.tolerance.min_cosine == 0.995
    assert configured.quantization.tolerance.min_mean_cosine == 0.99


def test_methods_fit_their_format() -> None:
    assert check_method("gguf-q8_0", "gguf", "m@1") == "gguf-q8_0"
    with pytest.raises(InvalidRequestError, match="gguf-q4_0"):
        check_method("onnx-int8-per-channel", "gguf", "m@1")
