"""A drift report in words: which tests fired, what that means, which traffic is not covered, what to do.

Rendered from the stored metrics alone, so a report read back later explains itself the same way.
"""

from __future__ import annotations

from lamina.data.drift._coverage import CoverageResult
from lamina.data.drift._records import DriftMetricsJSON, DriftReport

_EXAMPLE_CHARS = 160
_HEADLINES = {
    "drift": "DRIFT",
    "possible_drift": "POSSIBLE DRIFT (one test of two fired)",
    "no_drift": "no drift",
    "insufficient_data": "too little data",
}


def _short(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _EXAMPLE_CHARS else flat[: _EXAMPLE_CHARS - 1] + "…"


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _tests(m: DriftMetricsJSON) -> list[str]:
    lines = []
    c, mmd = m["classifier"], m["mmd"]
    if c is not None:
        if c["drifted"]:
            lines.append(
                f"- Domain classifier FIRED: a classifier tells live requests from the dataset's chunks "
                f"with ROC AUC {c['auc']:.3f} (drift above {c['threshold']:.2f}; 0.5 means it cannot; "
                f"{_p(c['p_value'])}): traffic is about things, or phrased in ways, the dataset does not "
                "contain."
            )
        else:
            lines.append(
                f"- Domain classifier: ROC AUC {c['auc']:.3f} ({_p(c['p_value'])}; drift needs above "
                f"{c['threshold']:.2f} and p < 0.05): requests cannot be told apart from the dataset."
            )
    if mmd is not None:
        verdict = (
            "FIRED: the embedding distributions differ" if mmd["drifted"] else "no significant difference"
        )
        lines.append(
            f"- MMD {verdict} (MMD² {mmd['mmd2']:.4f}, {_p(mmd['p_value'])} over "
            f"{mmd['permutations']} permutations; drift below {mmd['threshold']:.2f})."
        )
    return lines


def _signals(m: DriftMetricsJSON) -> list[str]:
    lines = []
    length, oov = m["prompt_length"], m["oov"]
    if length is not None:
        ref, cur = length["reference_median"], length["current_median"]
        how = "longer" if cur > ref else "shorter"
        shift = f"shifted: prompts are {how}" if length["shifted"] else "no significant shift"
        lines.append(
            f"- Prompt length {shift} (median {cur:.0f} vs {ref:.0f} {length['unit']} per chunk; KS "
            f"{length['ks']:.2f}, {_p(length['p_value'])}). Chunk sizes are set by the chunker, so read "
            "this beside the tests above."
        )
    if oov is not None:
        cur_pct, ref_pct = 100 * oov["current_rate"], 100 * oov["reference_rate"]
        lead = "Vocabulary shifted" if oov["shifted"] else "Vocabulary"
        lines.append(
            f"- {lead}: {cur_pct:.1f}% of the words in requests never occur in the dataset (its own "
            f"held-out text: {ref_pct:.1f}%)."
        )
    return lines


def _coverage(cov: CoverageResult, drifted: bool) -> list[str]:
    share = 100 * cov["uncovered_share"]
    lines = [
        f"{cov['uncovered']} sampled requests ({share:.0f}%) are farther from every chunk than "
        f"{100 * cov['quantile']:.0f}% of the chunks are from their nearest neighbour (cosine distance "
        f"above {cov['threshold']:.3f})."
    ]
    if cov["examples"] and (cov["uncovered"] or drifted):
        title = "Examples the dataset does not cover" if cov["uncovered"] else "Farthest requests"
        lines.append(f"{title} (distance to the nearest chunk):")
        for ex in cov["examples"]:
            near = f"  [nearest: {ex['nearest_source_uri']}]" if ex["nearest_source_uri"] else ""
            lines.append(f"  {ex['distance']:.3f}  {_short(ex['text'])}{near}")
    if cov["clusters"]:
        lines.append("Uncovered requests group into:")
        for cl in cov["clusters"]:
            lines.append(
                f"  {cl['size']} requests ({100 * cl['share']:.0f}%) about {', '.join(cl['terms'])}; "
                f'e.g. "{_short(cl["example"])}"'
            )
    return lines


def explain(report: DriftReport) -> str:
    """The report as a few lines a person can act on."""
    m = report.metrics
    head = (
        f"{report.dataset}@{report.version[:12]} vs the last {report.window} of traffic "
        f"({m['n_current']} sampled requests, {m['n_reference']} reference chunks): "
    )
    if report.verdict == "insufficient_data":
        if m["n_current"] < m["min_current"]:
            return head + (
                f"TOO LITTLE DATA to judge: at least {m['min_current']} sampled requests are needed. Widen "
                "the window (--window 7d), wait for more traffic, or check that requests using this "
                "dataset reach the gateway."
            )
        return head + (
            f"TOO LITTLE DATA to judge: the version has fewer than {m['min_reference']} chunks with "
            "vectors; ingest more sources into it first."
        )
    lines = [head + _HEADLINES[report.verdict], *_tests(m), *_signals(m)]
    if m["coverage"] is not None:
        lines += _coverage(m["coverage"], report.verdict != "no_drift")
    if report.verdict == "possible_drift":
        lines.append(
            "What to do: one test alone fires on about 1 window in 20 of unchanged traffic; look at the "
            "examples above and run the check again on a wider window (--window 7d) to confirm."
        )
    if report.drifted:
        lines.append(
            "What to do: add sources that cover the examples above (`lamina data ingest PATH --dataset "
            f"{report.dataset}`), then run `lamina data drift {report.dataset}` again; if that traffic "
            "should not use this dataset, route it elsewhere."
        )
    return "\n".join(lines)
