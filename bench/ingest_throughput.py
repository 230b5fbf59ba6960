"""Ingestion throughput next to the raw embedder on the same chunks, and the unchanged re-ingest.

    .venv/bin/python bench/ingest_throughput.py [--docs 1000] [--data DIR]

Corpus: the first N SciFact abstracts (../shared/data/retrieval/scifact), one Markdown file each. The
pipeline run (discover, hash, load, clean, de-duplicate, chunk in MiniLM tokens, embed in batches, write
to LanceDB, commit a version) is timed end to end; then the same chunk texts are embedded by the same
embedder alone, in the same batch size ("raw"); then the unchanged corpus is ingested again. Targets:
pipeline >= 85% of raw chunks/s; re-ingest >= 20x faster than the first ingest. Not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lamina.config import LaminaConfig
from lamina.data import IngestOptions
from lamina.stack import open_data_stack

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "retrieval" / "scifact"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = ap.parse_args()
    if not (args.data / "corpus.jsonl").exists():
        sys.exit(f"SciFact not found at {args.data}; pass --data DIR (BEIR layout)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = root / "corpus"
        corpus.mkdir()
        with (args.data / "corpus.jsonl").open(encoding="utf-8") as f:
            for _, line in zip(range(args.docs), f, strict=False):
                doc = json.loads(line)
                (corpus / f"{doc['_id']}.md").write_text(f"# {doc['title']}\n\n{doc['text']}\n")
        config = LaminaConfig()
        data = open_data_stack(config, root / "state")
        try:
            embedder = data.embedder()
            embedder.embed(["warm up the model"])
            options = IngestOptions.from_config(config.data)
            pipeline = data.pipeline()

            t0 = time.perf_counter()
            first = pipeline.ingest([str(corpus)], "bench", options)
            first_s = time.perf_counter() - t0
            assert first.version is not None
            ids = data.catalog.members(first.version)
            texts = [c.text for c in data.vectors.get("bench", ids)]

            t0 = time.perf_counter()
            for start in range(0, len(texts), options.embed_batch_size):
                embedder.embed(texts[start : start + options.embed_batch_size])
            raw_s = time.perf_counter() - t0

            t0 = time.perf_counter()
            again = pipeline.ingest([str(corpus)], "bench", options)
            again_s = time.perf_counter() - t0
        finally:
            data.close()
    n = len(texts)
    shape = f"{config.data.chunk_size} tokens, overlap {config.data.chunk_overlap}"
    print(
        f"{args.docs} SciFact abstracts -> {n} chunks ({shape}), all-MiniLM-L6-v2 int8, "
        f"batch {options.embed_batch_size}"
    )
    print(f"{'':<36} {'seconds':>8} {'chunks/s':>9}")
    print(f"{'pipeline, first ingest':<36} {first_s:>8.2f} {n / first_s:>9.1f}")
    print(f"{'raw embedder, same chunks':<36} {raw_s:>8.2f} {n / raw_s:>9.1f}")
    print(f"{'pipeline, unchanged re-ingest':<36} {again_s:>8.2f}  ({again.state})")
    print(
        f"pipeline / raw chunks/s: {raw_s / first_s:.3f} (target >= 0.85); "
        f"first / re-ingest time: {first_s / again_s:.1f}x (target >= 20x)"
    )


if __name__ == "__main__":
    main()
