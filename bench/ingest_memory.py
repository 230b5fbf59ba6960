"""Peak memory of ingesting one large text file: a 5 MB and a 50 MB one, each in a fresh process.

    .venv/bin/python bench/ingest_memory.py [--mb 5 50] [--json] [--long-words] [--chunk-size N] [--overlap N]

Each size runs in its own child process (so one run's peak cannot hide the other's): the child writes a
generated text file (paragraphs of words, a few accented), then ingests it into a LanceDB store with a
SQLite catalog and reports its resident set size before the ingest and its peak after it
(``resource.getrusage``'s ``ru_maxrss``), the growth between them, and the time taken.

The embedder is ``HashingEmbedder``: it implements the data layer's ``EmbeddingTokenizer`` for real
(whitespace tokens with their offsets, a vector from a BLAKE2b digest of the text), so what is measured
is the pipeline, not a model. Not a test; ``tests/test_ingest_memory.py`` runs the 50 MB case and bounds
its growth.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support import HashingEmbedder

from lamina.data import DatasetCatalog, IngestOptions, IngestPipeline, LanceDBStore, LineageEmitter
from lamina.store import Store

_WORDS = [
    "river",
    "mountain",
    "cloud",
    "vector",
    "lamina",
    "store",
    "token",
    "model",
    "data",
    "search",
    "graph",
    "index",
    "query",
    "answer",
    "café",
    "naïve",
    "résumé",
    "pipeline",
    "segment",
    "memory",
]
OPTIONS = IngestOptions(chunk_size=256, chunk_overlap=32, embed_batch_size=1024)


def _vocabulary(long_words: bool) -> list[str]:
    """20,000 distinct words: about 7 characters each, or about 17 with ``long_words``."""
    if long_words:
        return [f"{a}{b}{n}" for a in _WORDS for b in _WORDS[:10] for n in range(100)]
    return [f"{word}{n}" for word in _WORDS for n in range(1000)]


def write_corpus(path: Path, size: int, *, long_words: bool = False, seed: int = 7) -> None:
    """Just under ``size`` bytes of prose: random words, lines of 10, a blank line every 8 lines."""
    rng = np.random.default_rng(seed)
    vocabulary = np.array(_vocabulary(long_words))
    separators = [" "] * 80
    separators[9::10] = ["\n"] * 8
    separators[79] = "\n\n"
    written = 0
    with path.open("wb") as f:
        while True:
            words = vocabulary[rng.integers(0, len(vocabulary), 80_000)].tolist()
            block = "".join(w + sep for w, sep in zip(words, separators * 1000, strict=True)).encode()
            if written + len(block) > size:  # end with the last whole paragraph that fits
                end = block.rfind(b"\n\n", 0, size - written - 1)
                f.write(block[: end + 2] if end >= 0 else b"")
                return
            f.write(block)
            written += len(block)


def maxrss() -> int:
    """This process's peak resident set size so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakWhenWritten:
    """Progress that notes the peak RSS when the last chunk is written (before the index rebuild)."""

    def __init__(self) -> None:
        self.peak = 0

    def files(self, done: int, total: int) -> None:
        pass

    def chunks(self, done: int, total: int) -> None:
        if done == total:
            self.peak = maxrss()


def measure(mb: int, options: IngestOptions, *, long_words: bool = False) -> dict[str, float]:
    """Ingest an ``mb`` MB file in this process; RSS figures in MiB."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = root / "corpus"
        corpus.mkdir()
        write_corpus(corpus / "big.txt", mb * 1_000_000, long_words=long_words)
        meta = Store(f"sqlite:///{root / 'lamina.db'}")
        meta.migrate()
        pipeline = IngestPipeline(
            DatasetCatalog(meta),
            LanceDBStore(root / "vectors"),
            HashingEmbedder(16),
            LineageEmitter(root / "lineage.jsonl"),
        )
        rss_before = psutil.Process().memory_info().rss
        maxrss_before = maxrss()
        written = PeakWhenWritten()
        t0 = time.perf_counter()
        report = pipeline.ingest([str(corpus)], "bench", options, progress=written)
        seconds = time.perf_counter() - t0
        peak = maxrss()
        meta.close()
    mib = 1024 * 1024
    return {
        "mb": mb,
        "chunks": report.counts.get("chunks", 0),
        "seconds": round(seconds, 2),
        "rss_before_mib": round(rss_before / mib, 1),
        "peak_before_mib": round(maxrss_before / mib, 1),
        "peak_mib": round(peak / mib, 1),
        "growth_mib": round((peak - rss_before) / mib, 1),
        "written_growth_mib": round((written.peak - rss_before) / mib, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, nargs="+", default=[5, 50], help="file sizes in MB")
    ap.add_argument("--json", action="store_true", help="one JSON object per size")
    ap.add_argument("--long-words", action="store_true", help="words of ~17 characters: fewer tokens, faster")
    ap.add_argument("--chunk-size", type=int, default=OPTIONS.chunk_size, help="tokens per chunk")
    ap.add_argument("--overlap", type=int, default=OPTIONS.chunk_overlap, help="tokens chunks share")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        options = replace(OPTIONS, chunk_size=args.chunk_size, chunk_overlap=args.overlap)
        print(json.dumps(measure(args.child, options, long_words=args.long_words)))
        return
    shape = ["--chunk-size", str(args.chunk_size), "--overlap", str(args.overlap)]
    results = []
    for mb in args.mb:
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(mb),
                *shape,
                *(["--long-words"] if args.long_words else []),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if child.returncode != 0:
            sys.exit(f"the {mb} MB run failed:\n{child.stderr}")
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    if args.json:
        for result in results:
            print(json.dumps(result))
        return
    columns = ("chunks", 7), ("seconds", 8), ("RSS before", 11), ("peak", 9), ("growth", 9), ("written", 9)
    print(f"{'file':>7} " + " ".join(f"{name:>{width}}" for name, width in columns))
    for r in results:
        print(
            f"{r['mb']:>4} MB {r['chunks']:>7} {r['seconds']:>8.1f} {r['rss_before_mib']:>7.0f} MiB "
            f"{r['peak_mib']:>5.0f} MiB {r['growth_mib']:>5.0f} MiB {r['written_growth_mib']:>5.0f} MiB"
        )
    print("growth: peak RSS of the whole ingest over the RSS before it; written: the same, up to the last")
    print("chunk written (before the vector store rebuilds its index over the dataset)")


if __name__ == "__main__":
    main()
