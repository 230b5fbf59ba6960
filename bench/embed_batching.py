"""How the ONNX engine's passes are sized: texts/s at each token budget per pass, in one run.

    .venv/bin/python bench/embed_batching.py [--rounds 3] [--docs 128] [--queries 256]

The bundled all-MiniLM-L6-v2 embeds SciFact abstracts (up to 1,200 characters, most cut at its 256 tokens)
and SciFact queries (about 20 tokens), in calls of 32 texts as the ingest pipeline makes them, with
``batch_size`` 32 and ``max_batch_tokens`` set to each budget in turn ("none": 32 texts a pass whatever
their length, the engine before the budget; the CPU's default is 512). The int8-compute variant
(``onnx-int8-per-channel``, quantized here) runs one text a pass, as the engine runs a model that
quantizes its activations at run time. Rounds alternate the configurations; the figure is the best
round's. Needs ../shared/data (SciFact). Not a test: the figures go in the README.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import minilm_spec  # noqa: E402

from lamina.models._onnx import ONNXEngine  # noqa: E402
from lamina.models._quantize import quantize_file  # noqa: E402

SCIFACT = ROOT.parent / "shared" / "data" / "retrieval" / "scifact"
BUDGETS: tuple[int | None, ...] = (None, 2048, 1024, 512, 256)


def texts(docs: int, queries: int) -> dict[str, list[str]]:
    if not SCIFACT.is_dir():
        sys.exit(f"SciFact is not at {SCIFACT} (../shared/data)")
    with (SCIFACT / "corpus.jsonl").open() as f:
        abstracts = [json.loads(line)["text"][:1200] for _, line in zip(range(docs), f, strict=False)]
    with (SCIFACT / "queries.jsonl").open() as f:
        asked = [json.loads(line)["text"] for _, line in zip(range(queries), f, strict=False)]
    return {"abstracts": abstracts, "queries": asked}


def rate(engine: ONNXEngine, items: list[str], call: int = 32) -> float:
    started = time.perf_counter()
    for i in range(0, len(items), call):
        engine.embed(items[i : i + call])
    return len(items) / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--docs", type=int, default=128)
    ap.add_argument("--queries", type=int, default=256)
    args = ap.parse_args()
    sets = texts(args.docs, args.queries)
    spec = minilm_spec()
    assert spec.path is not None
    engines: dict[str, ONNXEngine] = {}
    for budget in BUDGETS:
        # "none": a budget no pass of 32 texts of at most 256 tokens reaches
        tokens = budget if budget is not None else 32 * 256
        engines[f"float, {budget or 'none'}"] = ONNXEngine(
            dataclasses.replace(spec, options={"batch_size": 32, "max_batch_tokens": tokens})
        )
    with tempfile.TemporaryDirectory() as tmp:
        variant = quantize_file(spec.path, "onnx-int8-per-channel", Path(tmp) / "q.onnx")
        engines["int8 compute, one text a pass"] = ONNXEngine(dataclasses.replace(spec, path=variant))
        for engine in engines.values():
            engine.embed(sets["queries"][:8])  # warm-up
        best: dict[tuple[str, str], float] = {}
        for r in range(args.rounds):
            names = list(engines) if r % 2 == 0 else list(reversed(engines))
            for name in names:
                for kind, items in sets.items():
                    got = rate(engines[name], items)
                    best[name, kind] = max(best.get((name, kind), 0.0), got)
    print(f"texts/s, best of {args.rounds} rounds, calls of 32 texts, batch_size 32:")
    print(f"  {'engine, tokens per pass':34s} {'abstracts':>10s} {'queries':>10s}")
    for name in engines:
        print(f"  {name:34s} {best[name, 'abstracts']:10.1f} {best[name, 'queries']:10.1f}")


if __name__ == "__main__":
    main()
