"""Precision, recall and false-positive rate of each guard on the public sets, and what the input guards
cost per request.

    .venv/bin/python bench/guardrails_quality.py [--data DIR] [--repeat N]

Sets (../shared/data/guardrails, see its README):
- injection: the held-out 30% of ``bench/train_injection.py``'s split (the classifier never saw it):
  CyberSecEval and PIGuard injections against CyberSecEval's benign MITRE prompts, PIGuard's NotInject
  over-defence prompts, its benign valid.json prompts, WildGuard's benign prompts and ordinary text.
  BIPIA's attack strings and CyberSecEval's contextual cases are reported apart, for information (see
  train_injection.py on why).
- pii: Presidio's 1,000 synthetic sentences; only the entities a pattern guard can find count (the set
  also labels names, addresses and organisations, which need an NLP model the guard does not load). A
  finding is right when it overlaps a labelled span of its type.
- toxicity: Surge AI's 500 labelled comments against the bundled word list.
Costs: CPU milliseconds (process time) per check of a ~200-character prompt, per guard and for the whole
input policy as the gateway runs it (guards in worker threads). Prints a table; writes JSON to
bench/results/guardrails_quality-<time>.json. Targets: injection recall >= 0.85 at FPR <= 0.05 on benign
prompts; PII recall >= 0.9 on the pattern entities.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_injection as training
from tests.support import minilm_spec

from lamina.application import ANONYMOUS, Call
from lamina.application.guards import (
    GuardPolicy,
    GuardRecorder,
    GuardSettings,
    InjectionClassifier,
    InjectionGuard,
    PiiGuard,
    heuristic_findings,
    looks_suspicious,
    profanity_guard,
)
from lamina.models import load_engine

RESULTS = Path(__file__).resolve().parent / "results"
PATTERN_ENTITIES = ("CREDIT_CARD", "EMAIL_ADDRESS", "IBAN_CODE", "IP_ADDRESS", "PHONE_NUMBER", "US_SSN")
TYPICAL = (
    "Can you summarize the main arguments for and against remote work for a software team of about twenty "
    "people, and suggest a policy that balances focus time with collaboration? Keep it under 300 words."
)


@dataclass
class Row:
    guard: str
    data: str
    positives: int
    negatives: int
    recall: float
    fpr: float | None
    precision: float | None


def rates(predicted: Sequence[bool], labels: Sequence[int]) -> tuple[float, float, float]:
    p, y = np.asarray(predicted, dtype=bool), np.asarray(labels, dtype=bool)
    tp, fp = int((p & y).sum()), int((p & ~y).sum())
    recall = tp / max(int(y.sum()), 1)
    fpr = fp / max(int((~y).sum()), 1)
    precision = tp / (tp + fp) if tp + fp else 0.0
    return recall, fpr, precision


def row(guard: str, data: str, predicted: Sequence[bool], labels: Sequence[int]) -> Row:
    recall, fpr, precision = rates(predicted, labels)
    pos = sum(labels)
    return Row(guard, data, pos, len(labels) - pos, recall, fpr if pos < len(labels) else None, precision)


def cached_embed(embed: training.Embed, tags: dict[str, list[str]]) -> training.Embed:
    """``embed`` that reads windows from train_injection's cache first (the bench re-embeds nothing)."""
    known: dict[str, list[float]] = {}
    for tag, texts in tags.items():
        vectors, owner = training.window_matrix(embed, texts, tag)
        windows = [w for t in texts for w in InjectionClassifier.windows(t)]
        known.update(zip(windows, vectors.tolist(), strict=True))
        assert len(owner) == len(windows)

    def lookup(texts: Sequence[str]) -> list[list[float]]:
        missing = [t for t in texts if t not in known]
        if missing:
            known.update(zip(missing, embed(missing), strict=True))
        return [known[t] for t in texts]

    return lookup


def injection(data: Path) -> list[Row]:
    _, test = training.split(training.load_injection_sets(data))
    bipia = training.load_bipia(data)
    engine_embed, _ = training.minilm_embed()
    embed = cached_embed(engine_embed, {"injection_test": [e.text for e in test]})
    classifier = InjectionClassifier(embed)
    texts, labels = [e.text for e in test], [e.label for e in test]
    heur = [bool(heuristic_findings(t)) for t in texts]
    logits = classifier.logits(texts)
    clf = [classifier.is_injection(x) for x in logits]
    both = [h or c for h, c in zip(heur, clf, strict=True)]
    suspicious = InjectionGuard(GuardSettings(), classifier=classifier, mode="suspicious")
    susp = [bool(suspicious.find(t)) for t in texts]
    rows = [
        row("injection: heuristics", "test split", heur, labels),
        row("injection: classifier", "test split", clf, labels),
        row("injection: both (always)", "test split", both, labels),
        row("injection: both (suspicious)", "test split", susp, labels),
    ]
    for mode, predicted in (("always", both), ("suspicious", susp)):
        for source in sorted({e.source for e in test if e.label == 0}):
            picked = [(p, e.label) for p, e in zip(predicted, test, strict=True) if e.source == source]
            label = "piguard_valid (both kinds)" if source == "piguard_valid" else f"benign {source}"
            rows.append(row(f"injection: both ({mode})", label, *map(list, zip(*picked, strict=True))))
    share = float(np.mean([looks_suspicious(e.text) for e in test if e.label == 0]))
    rows.append(Row("injection: suspicious filter", "benign: share embedded", 0, 0, share, None, None))
    guard = InjectionGuard(GuardSettings(), classifier=classifier, mode="always")
    for name, examples in (
        ("BIPIA strings", bipia),
        ("contextual CSE cases", training.load_contextual(data)),
    ):
        hits = [bool(guard.find(e.text)) for e in examples]
        rows.append(row("injection: both (always)", f"{name} (info)", hits, [1] * len(hits)))
    return rows


def pii(data: Path) -> list[Row]:
    records = json.loads((data / "pii-presidio-synth" / "synth_dataset_v2.part1.json").read_text("utf-8"))
    guard = PiiGuard(GuardSettings(action="flag"), entities=[*PATTERN_ENTITIES, "API_KEY", "PRIVATE_KEY"])
    found = {e: [0, 0, 0] for e in PATTERN_ENTITIES}  # labelled, recalled, findings that are right
    findings_total = dict.fromkeys(PATTERN_ENTITIES, 0)
    clean_texts = clean_hits = 0
    for record in records:
        text, spans = (
            record["full_text"],
            [s for s in record["spans"] if s["entity_type"] in PATTERN_ENTITIES],
        )
        got = [f for f in guard.find(text) if f.entity in PATTERN_ENTITIES]
        for span in spans:
            counts = found[span["entity_type"]]
            counts[0] += 1
            if any(_overlap(f.start, f.end, span) and f.entity == span["entity_type"] for f in got):
                counts[1] += 1
        for f in got:
            findings_total[f.entity] += 1
            if any(_overlap(f.start, f.end, s) and s["entity_type"] == f.entity for s in spans):
                found[f.entity][2] += 1
        if not spans:
            clean_texts += 1
            clean_hits += bool(got)
    rows = []
    for entity, (labelled, recalled, right) in found.items():
        precision = right / findings_total[entity] if findings_total[entity] else None
        rows.append(
            Row(f"pii: {entity}", "presidio synth", labelled, 0, recalled / max(labelled, 1), None, precision)
        )
    labelled = sum(c[0] for c in found.values())
    recalled = sum(c[1] for c in found.values())
    right, total = sum(c[2] for c in found.values()), sum(findings_total.values())
    rows.append(
        Row(
            "pii: all pattern entities",
            "presidio synth",
            labelled,
            clean_texts,
            recalled / labelled,
            clean_hits / max(clean_texts, 1),
            right / total if total else None,
        )
    )
    return rows


def _overlap(start: int, end: int, span: dict[str, Any]) -> bool:
    return start < span["end_position"] and span["start_position"] < end


def toxicity(data: Path) -> list[Row]:
    with (data / "toxicity-surge" / "toxicity_en.part1.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    guard = profanity_guard(GuardSettings())
    predicted = [bool(guard.find(r["text"])) for r in rows]
    labels = [int(r["is_toxic"] == "Toxic") for r in rows]
    return [row("toxicity: word list", "surge comments", predicted, labels)]


def cpu_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()
    start = time.process_time()
    for _ in range(repeat):
        fn()
    return (time.process_time() - start) / repeat * 1000


def costs(repeat: int) -> dict[str, float]:
    settings = GuardSettings()
    pii_all = PiiGuard(settings)
    heuristics = InjectionGuard(settings, mode="never")
    threads = {n: load_engine("onnx", minilm_spec(intra_op_threads=n)) for n in (None, 1)}
    classifiers = {
        n: InjectionClassifier(lambda t, e=e: e.embed(list(t)).vectors) for n, e in threads.items()
    }
    tox = profanity_guard(settings)
    with_pii = TYPICAL[:140] + " Mail me at jane.roe@example.org or call +1 415 555 0132."
    policy = GuardPolicy([heuristics, pii_all, tox], GuardRecorder(None))

    def body() -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": TYPICAL}]}

    async def admit_many(n: int) -> float:
        """CPU ms per admission, all in one event loop (as the gateway runs them)."""
        for _ in range(20):
            await policy.admit(Call(ANONYMOUS, "chat", "m", "m", None, body(), False, 60, 0))
        start = time.process_time()
        for _ in range(n):
            await policy.admit(Call(ANONYMOUS, "chat", "m", "m", None, body(), False, 60, 0))
        return (time.process_time() - start) / n * 1000

    out = {
        "prompt_chars": float(len(TYPICAL)),
        "pii (presidio, all entities, prefiltered)": cpu_ms(lambda: pii_all.check(TYPICAL), repeat),
        "pii on a prompt with an email and a phone": cpu_ms(lambda: pii_all.check(with_pii), repeat // 4),
        "injection heuristics": cpu_ms(lambda: heuristics.check(TYPICAL), repeat),
        "injection classifier, ONNX Runtime's default threads": cpu_ms(
            lambda: classifiers[None].logits([TYPICAL]), max(repeat // 50, 5)
        ),
        "injection classifier, one thread (as the gateway runs it)": cpu_ms(
            lambda: classifiers[1].logits([TYPICAL]), max(repeat // 50, 5)
        ),
        "toxicity word list": cpu_ms(lambda: tox.check(TYPICAL), repeat),
        "input policy (heuristics + pii + toxicity, one worker thread)": anyio.run(admit_many, repeat),
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=training.DEFAULT_DATA)
    ap.add_argument("--repeat", type=int, default=2000, help="checks per cost measurement")
    args = ap.parse_args()
    if not (args.data / "cyberseceval_prompt_injection").is_dir():
        sys.exit(f"guardrail data not found at {args.data}; pass --data DIR (shared/data/guardrails)")
    injection_rows = injection(args.data)
    rows = [*injection_rows, *pii(args.data), *toxicity(args.data)]
    print(f"{'guard':<36} {'data':<26} {'pos':>5} {'neg':>5} {'recall':>7} {'FPR':>6} {'prec.':>6}")
    for r in rows:
        fpr = "" if r.fpr is None else f"{r.fpr:.3f}"
        prec = "" if r.precision is None else f"{r.precision:.3f}"
        counts = f"{r.positives:>5} {r.negatives:>5}"
        print(f"{r.guard:<36} {r.data:<26} {counts} {r.recall:>7.3f} {fpr:>6} {prec:>6}")
    cost = costs(args.repeat)
    print("\nCPU ms per check of a typical prompt")
    for name, ms in cost.items():
        print(f"  {name:<62} {ms:8.3f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"guardrails_quality-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(
        json.dumps({"rows": [asdict(r) for r in rows], "cpu_ms": cost}, indent=2), encoding="utf-8"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
