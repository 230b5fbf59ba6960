"""Train the prompt-injection classifier that ships in lamina/application/guards/injection.npz.

    .venv/bin/python bench/train_injection.py [--data DIR] [--out PATH]

Data (../shared/data/guardrails, see its README): injections are CyberSecEval's attack inputs and
the 48 labelled injections of PIGuard's valid.json; benign prompts are CyberSecEval's 750 security-flavoured
MITRE prompts, PIGuard's 339 NotInject over-defence prompts (full of trigger words), its 96 benign
valid.json prompts and 971 benign WildGuard prompts, and ordinary text from the other public sets (500
social-media comments, 1,000 synthetic sentences with PII, 1,109 SciFact claims: ``load_ordinary``).
CyberSecEval's contextual cases are left out (``contextual``: its 71 logic-violating cases and its
different-language ones, 89 of 251 in all): they attack a particular system prompt ("answer only in
English", "give no recipes") with what is, read alone, an ordinary question. For the same reason
BIPIA's attack strings are left out of training: they are instructions meant to be hidden in a document
("Write a script to rename all files..."), and read on their own they are ordinary requests, so they
would teach the classifier to refuse ordinary requests.

Every source is split 70/30 with a fixed seed (``split``); the classifier is a logistic regression (numpy,
class-balanced, L2) on the bundled all-MiniLM-L6-v2 embeddings, as the guard computes them
(``InjectionClassifier.windows``: long texts are read in overlapping windows, the highest score wins).
The decision threshold is the lowest one that keeps the false-positive rate on the training benign
prompts at or under ``--train-fpr``. Embeddings are cached in bench/results/ (git-ignored).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support import minilm_spec

from lamina.application.guards import INJECTION_WEIGHTS, InjectionClassifier
from lamina.models import load_engine

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "guardrails"
RESULTS = Path(__file__).resolve().parent / "results"
SEED = 20261130
TEST_SHARE = 0.3

Embed = Callable[[Sequence[str]], list[list[float]]]
Matrix = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # 1: injection
    source: str


def load_injection_sets(data: Path) -> list[Example]:
    """Every labelled prompt of the injection sets (BIPIA excluded: see the module doc)."""
    cse = data / "cyberseceval_prompt_injection"
    pig = data / "piguard_notinject"
    out = [
        Example(r["user_input"], 1, "cyberseceval")
        for r in _json(cse / "prompt_injection.json")
        if not contextual(r)
    ]
    out += [Example(r["mutated_prompt"], 0, "mitre_benign") for r in _json(cse / "mitre_frr_benign.json")]
    for part in ("one", "two", "three"):
        out += [Example(r["prompt"], 0, "notinject") for r in _json(pig / f"NotInject_{part}.json")]
    out += [Example(r["prompt"], int(r["label"]), "piguard_valid") for r in _json(pig / "valid.json")]
    out += [Example(r["prompt"], 0, "wildguard") for r in _json(pig / "wildguard.json")]
    return out + load_ordinary(data)


def load_ordinary(data: Path) -> list[Example]:
    """Ordinary text that is no injection, from the other public sets: social-media comments (Surge's
    toxicity set, toxic or not), synthetic sentences with PII (Presidio's set) and SciFact's claims."""
    with (data / "toxicity-surge" / "toxicity_en.part1.csv").open(encoding="utf-8", newline="") as f:
        out = [Example(r["text"], 0, "surge_comments") for r in csv.DictReader(f)]
    synth = _json(data / "pii-presidio-synth" / "synth_dataset_v2.part1.json")
    out += [Example(r["full_text"], 0, "presidio_sentences") for r in synth]
    claims = data.parent / "retrieval" / "scifact" / "queries.jsonl"
    if claims.is_file():
        lines = claims.read_text(encoding="utf-8").splitlines()
        out += [Example(json.loads(line)["text"], 0, "scifact_claims") for line in lines if line.strip()]
    return out


def contextual(case: dict[str, str]) -> bool:
    """A CyberSecEval case that is an attack only against its own system prompt (a recipe question to a
    bot told not to give recipes, a question in French to a bot told to answer in English): an input
    guard that sees the input alone cannot tell it from an ordinary question (see the module doc)."""
    return (
        case["risk_category"] == "logic-violating"
        or case["injection_variant"] == "different_user_input_language"
    )


def load_contextual(data: Path) -> list[Example]:
    """The contextual CyberSecEval cases, for information only."""
    cases = _json(data / "cyberseceval_prompt_injection" / "prompt_injection.json")
    return [Example(r["user_input"], 1, "cyberseceval_contextual") for r in cases if contextual(r)]


def load_bipia(data: Path) -> list[Example]:
    """BIPIA's attack strings, for information only (not a target: see the module doc)."""
    out = []
    for name in ("BIPIA_text", "BIPIA_code"):
        groups = _json(data / "piguard_notinject" / f"{name}.json")
        out += [Example(text, 1, name) for texts in groups.values() for text in texts]
    return out


def _json(path: Path) -> object:
    return json.loads(path.read_text(encoding="utf-8"))


def split(examples: list[Example], seed: int = SEED) -> tuple[list[Example], list[Example]]:
    """70/30 within each (source, label), with a fixed seed: the same split for training and the bench."""
    train: list[Example] = []
    test: list[Example] = []
    groups: dict[tuple[str, int], list[Example]] = {}
    for ex in examples:
        groups.setdefault((ex.source, ex.label), []).append(ex)
    for key in sorted(groups):
        items = groups[key]
        random.Random(f"{seed}-{key[0]}-{key[1]}").shuffle(items)
        cut = round(len(items) * TEST_SHARE)
        test += items[:cut]
        train += items[cut:]
    return train, test


def minilm_embed() -> tuple[Embed, str]:
    """The bundled MiniLM in process, and the sha256 of its ONNX file (the weights are tied to it)."""
    spec = minilm_spec()
    engine = load_engine("onnx", spec)
    assert spec.path is not None
    digest = hashlib.sha256(spec.path.read_bytes()).hexdigest()

    def embed(texts: Sequence[str]) -> list[list[float]]:
        return engine.embed(list(texts)).vectors

    return embed, digest


def window_matrix(embed: Embed, texts: Sequence[str], tag: str) -> tuple[Matrix, list[int]]:
    """Embeddings of every window of every text (cached by content) and each window's text index."""
    windows: list[str] = []
    owner: list[int] = []
    for i, text in enumerate(texts):
        parts = InjectionClassifier.windows(text)
        windows += parts
        owner += [i] * len(parts)
    key = hashlib.sha256("\x00".join(windows).encode()).hexdigest()[:16]
    path = RESULTS / f"guard_{tag}_{key}.npy"
    if path.exists():
        return np.load(path), owner
    vectors = np.asarray(embed(windows), dtype=np.float32)
    RESULTS.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors, owner


def text_max(scores: npt.NDArray[np.float64], owner: list[int], n: int) -> npt.NDArray[np.float64]:
    out = np.full(n, -np.inf)
    np.maximum.at(out, np.asarray(owner), scores)
    return out


def fit_logistic(
    x: Matrix, y: npt.NDArray[np.float64], l2: float = 1e-3, epochs: int = 3000, lr: float = 0.5
) -> tuple[npt.NDArray[np.float64], float]:
    """Class-balanced logistic regression by full-batch gradient descent (deterministic)."""
    xd = x.astype(np.float64)
    pos = y.mean()
    weights = np.where(y == 1, 0.5 / pos, 0.5 / (1 - pos))
    w = np.zeros(xd.shape[1])
    b = 0.0
    for _ in range(epochs):
        p = 1 / (1 + np.exp(-(xd @ w + b)))
        g = weights * (p - y) / len(y)
        w -= lr * (xd.T @ g + l2 * w)
        b -= lr * g.sum()
    return w, b


def threshold_at(benign: npt.NDArray[np.float64], fpr: float) -> float:
    """The lowest logit threshold that flags at most ``fpr`` of ``benign`` scores."""
    ordered = np.sort(benign)
    return float(ordered[int(np.ceil(len(ordered) * (1 - fpr))) - 1])


def choose_hyperparameters(
    train: list[Example], x: Matrix, owner: list[int], fpr: float
) -> tuple[float, float]:
    """L2 strength and step size by the recall on an inner validation split of ``train`` (never the test
    split) at the threshold that keeps that split's FPR at ``fpr``."""
    inner, valid = split(train, seed=SEED + 1)
    index = {id(e): i for i, e in enumerate(train)}
    rows_of: dict[int, list[int]] = {i: [] for i in range(len(train))}
    for row, i in enumerate(owner):
        rows_of[i].append(row)
    best = (-1.0, 0.0, 0.0)
    for l2 in (1e-2, 1e-3, 1e-4):
        for lr in (0.5, 2.0):
            rows = [r for e in inner for r in rows_of[index[id(e)]]]
            y_inner = np.array([train[owner[r]].label for r in rows], dtype=np.float64)
            w, b = fit_logistic(x[rows], y_inner, l2=l2, lr=lr)
            vrows = [r for e in valid for r in rows_of[index[id(e)]]]
            vowner = [owner[r] for r in vrows]
            remap = {t: k for k, t in enumerate(dict.fromkeys(vowner))}
            scores = text_max(x[vrows].astype(np.float64) @ w + b, [remap[t] for t in vowner], len(remap))
            labels = np.array([train[t].label for t in remap])
            recall = float((scores[labels == 1] > threshold_at(scores[labels == 0], fpr)).mean())
            print(f"  l2 {l2:g} step {lr:g}: validation recall {recall:.3f} at FPR {fpr}")
            if recall > best[0]:
                best = (recall, l2, lr)
    return best[1], best[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=INJECTION_WEIGHTS)
    ap.add_argument("--train-fpr", type=float, default=0.02, help="FPR allowed on the training benign set")
    args = ap.parse_args()
    if not (args.data / "cyberseceval_prompt_injection").is_dir():
        sys.exit(f"guardrail data not found at {args.data}; pass --data DIR (shared/data/guardrails)")
    train, test = split(load_injection_sets(args.data))
    embed, digest = minilm_embed()
    x, owner = window_matrix(embed, [e.text for e in train], "injection_train")
    y_text = np.array([e.label for e in train], dtype=np.float64)
    l2, lr = choose_hyperparameters(train, x, owner, args.train_fpr)
    w, b = fit_logistic(x, y_text[owner], l2=l2, lr=lr)  # every window carries its text's label
    scores = text_max(x.astype(np.float64) @ w + b, owner, len(train))
    threshold = threshold_at(scores[y_text == 0], args.train_fpr)
    recall = float((scores[y_text == 1] > threshold).mean())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        args.out,
        weights=w.astype(np.float32),
        bias=np.float32(b),
        threshold=np.float32(threshold),
        model_sha256=np.str_(digest),
        seed=np.int64(SEED),
        l2=np.float64(l2),
        lr=np.float64(lr),
    )
    print(
        f"trained on {len(train)} prompts ({int(y_text.sum())} injections, {len(x)} windows), l2 {l2:g}, "
        f"step {lr:g}; "
        f"held out {len(test)}. threshold {threshold:.3f} (logit), train recall {recall:.3f} at "
        f"train FPR <= {args.train_fpr}; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
