"""The accuracy gate's measurements: how close a quantized variant stays to the version it came from.

Embedding models: both embed the same texts through the ONNX engine that serves them; the figures are the
mean and the minimum cosine between each text's two vectors, and, given labelled queries, the drop in
retrieval nDCG@10 (exact cosine ranking over the texts). Chat models (GGUF): both read the same held
prompts with teacher forcing; the figures are the share of positions where their greedy next tokens agree
and the ratio of their perplexities on the prompts. Which figure must stay within what is the tolerance
(:data:`lamina.models._gate_record.LIMITS`); the verdict is :func:`judge`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lamina.config import GateTolerance
from lamina.errors import InvalidRequestError
from lamina.models._builtin_engines import ONNXOptions
from lamina.models._embedder import EngineEmbedder
from lamina.models._gate_record import LIMITS
from lamina.models._model_version import ModelVersion

#: texts embedded when no dataset version is given: short, varied English sentences
HELD_TEXTS: tuple[str, ...] = (
    "The cat sat on the mat and watched the rain.",
    "Quantization stores weights in fewer bits to save memory.",
    "Paris is the capital and most populous city of France.",
    "A man is playing a guitar on a small stage.",
    "How do I reset my password if I forgot my email?",
    "Mitochondria produce most of the chemical energy in a cell.",
    "The stock market fell sharply after the announcement.",
    "Children were building sandcastles on the beach.",
    "Photosynthesis converts light energy into chemical energy.",
    "The recipe calls for two cups of flour and one egg.",
    "Interest rates rose for the third time this year.",
    "The telescope captured images of a distant galaxy.",
    "She finished the marathon in under four hours.",
    "Rust guarantees memory safety without a garbage collector.",
    "The museum opens at nine and closes at five on weekdays.",
    "Vaccines train the immune system to recognise a pathogen.",
)

#: prompts a chat variant reads when none are given: prose, code and dialogue
HELD_PROMPTS: tuple[str, ...] = (
    "The capital of France is Paris, and the capital of Germany is Berlin. Both cities are known for",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Water boils at 100 degrees Celsius at sea level, but at higher altitudes it boils at a lower",
    "User: What is the largest planet in the solar system?\nAssistant: The largest planet is Jupiter,",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "To make a cup of tea, first boil the water, then pour it over the tea leaves and wait",
)


#: tokens of each held prompt read (longer prompts are cut): the context, and the logits kept per prompt
_PROMPT_TOKENS = 128


def limits_for(tolerance: GateTolerance, fmt: str) -> dict[str, float]:
    """The limits of ``tolerance`` that apply to a model of format ``fmt``."""
    keys = [key for key, (figure, _) in LIMITS.items() if (figure in _CHAT_FIGURES) == (fmt == "gguf")]
    return {key: float(getattr(tolerance, key)) for key in keys}


#: the figures a chat model's gate measures; an embedding model's are the others
_CHAT_FIGURES = {"agreement", "perplexity_ratio"}


@dataclass(frozen=True)
class LabelledQuery:
    """A query and the indexes (into the texts) of the passages relevant to it."""

    query: str
    relevant: frozenset[int]


def embedding_figures(
    parent: ModelVersion,
    variant: ModelVersion,
    texts: Sequence[str],
    queries: Sequence[LabelledQuery] = (),
) -> dict[str, float]:
    """Cosine of the two models' vectors per text (mean, min); nDCG@10 of each and its drop if labelled."""
    if not texts:
        raise InvalidRequestError("the gate needs texts to embed; give a dataset version with chunks")
    a = _embed(parent, [*texts, *(q.query for q in queries)])
    b = _embed(variant, [*texts, *(q.query for q in queries)])
    n = len(texts)
    cosines = np.sum(a[:n] * b[:n], axis=1)
    figures = {"cosine_mean": float(cosines.mean()), "cosine_min": float(cosines.min()), "texts": float(n)}
    if queries:
        before = mean_ndcg_at_10(a[n:], a[:n], queries)
        after = mean_ndcg_at_10(b[n:], b[:n], queries)
        figures |= {"ndcg_parent": before, "ndcg_variant": after, "ndcg_drop": max(0.0, before - after)}
    return figures


def _embed(mv: ModelVersion, texts: Sequence[str]) -> np.ndarray:
    embedder = EngineEmbedder(mv, ONNXOptions(batch_size=16))
    try:
        return np.asarray(embedder.embed(texts), dtype=np.float64)
    finally:
        embedder.close()


def mean_ndcg_at_10(queries: np.ndarray, passages: np.ndarray, labelled: Sequence[LabelledQuery]) -> float:
    """Mean nDCG@10 (binary relevance) of ranking ``passages`` by cosine to each query's vector."""
    scores = queries @ passages.T
    total = 0.0
    for row, query in zip(scores, labelled, strict=True):
        ranked = sorted(range(len(row)), key=lambda i: (-row[i], i))[:10]
        total += ndcg_at_10(ranked, query.relevant)
    return total / len(labelled)


def ndcg_at_10(ranked: Sequence[int], relevant: frozenset[int]) -> float:
    dcg = sum(1.0 / math.log2(rank + 2) for rank, i in enumerate(ranked[:10]) if i in relevant)
    ideal = sum(1.0 / math.log2(rank + 2) for rank in range(min(len(relevant), 10)))
    return dcg / ideal if ideal else 0.0


def chat_figures(
    parent: Path, variant: Path, prompts: Sequence[str], *, threads: int = 0
) -> dict[str, float]:
    """Greedy next-token agreement and the perplexity ratio of ``variant`` against ``parent`` on
    ``prompts`` (teacher forced: both read the same tokens)."""
    if not prompts:
        raise InvalidRequestError("the gate needs held prompts for a chat model")
    a = _prompt_logits(parent, prompts, threads)
    b = _prompt_logits(variant, prompts, threads)
    agree = np.concatenate([x.argmax(1) == y.argmax(1) for (_, x), (_, y) in zip(a, b, strict=True)])
    ppl_a = _perplexity(a)
    ppl_b = _perplexity(b)
    return {
        "agreement": float(agree.mean()),
        "perplexity_parent": ppl_a,
        "perplexity_variant": ppl_b,
        "perplexity_ratio": ppl_b / ppl_a,
        "positions": float(agree.size),
    }


def _prompt_logits(path: Path, prompts: Sequence[str], threads: int) -> list[tuple[list[int], np.ndarray]]:
    import llama_cpp

    from lamina.models._builtin_engines import physical_cores
    from lamina.models._gguf import model_params_with_extra_bufts

    with model_params_with_extra_bufts(False):
        llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=_PROMPT_TOKENS,
            logits_all=True,
            verbose=False,
            n_threads=threads or physical_cores(),
        )
    try:
        out = []
        for prompt in prompts:
            tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True)[:_PROMPT_TOKENS]
            llm.reset()  # type: ignore[no-untyped-call]
            llm.eval(tokens)
            out.append((tokens, np.array(llm.scores[: len(tokens)], dtype=np.float64)))
        return out
    finally:
        llm.close()


def _perplexity(read: list[tuple[list[int], np.ndarray]]) -> float:
    """exp of the mean negative log-likelihood of each prompt token given the ones before it."""
    nll = []
    for tokens, logits in read:
        shifted = logits[:-1] - logits[:-1].max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        nll.append(-log_probs[np.arange(len(tokens) - 1), tokens[1:]])
    return float(np.exp(np.concatenate(nll).mean()))
