"""The whole loop on SciFact's train split, on a real `lamina up`: ingest, train, gate, rollout, re-embed.

    .venv/bin/python bench/scifact_loop.py [--data DIR] [--docs N] [--queries N] [--max-steps N] [--json]

Driven as a user would, through the CLI against a stack started on a temporary state directory:

1. ``deploy``: ``lamina deploy minilm-l6-v2 --name embeddings`` (the embedding deployment; a run-time one,
   so that the run leaves the config's own deployment of the model as it was);
2. ``ingest``: ``lamina data ingest`` of the corpus as dataset ``scifact``, one file per document named
   ``<doc id>.txt`` (title and abstract), so the ``eval`` job's document-level relevance applies;
3. ``eval_before``: an ``eval`` job of the bundled model on the held queries; ``retrieve_before``: the same
   queries through the gateway's vector search (``POST /v1/retrieve``);
4. ``train``: a ``train`` job on the labelled train queries (``--held``, 20 %, of them, chosen by a hash of
   the query text, are kept out of training for the gate); it fine-tunes, exports to ONNX, quantizes and
   registers the variant through the accuracy gate (if the int8 variant fails its gate and the trained
   version passed its own, the trained version is the one rolled out);
5. ``rollout``: ``lamina rollout embeddings MODEL@V``, until every replica serves it (checked by embedding
   a query through the gateway before and after);
6. ``embed``: an ``embed`` job re-embedding the dataset with the new model into a new version;
7. ``eval_after``: an ``eval`` job of the new model on the re-embedded version, same held queries;
8. ``retrieve_after``: the held queries through the gateway's vector search of the new version, with no
   restart (the gateway embeds a version's queries with the model that embedded it: the new one through
   the rolled-out deployment); ``retrieve_old``: the same on the version before (its own model, now loaded
   in the gateway's process), which should match ``retrieve_before``.

Queries: SciFact's train qrels only (809 judged queries; the data folder has no test split), written as
``{"query": ..., "relevant": ["<doc id>.txt", ...]}``. ``--queries N`` keeps the first N by id, ``--docs N``
keeps N documents, always including every one relevant to the queries kept (for a smoke run). Printed:
vector nDCG@10 on the held queries before and after, from the ``eval`` job (exact cosine ranking of every
chunk of the version, documents ranked by their best chunk) and from the served vector search (the
version's ANN index, documents in the order of their first chunk among the best 50); each step's wall time
(from the command to its end, CLI start-up included) and, for jobs, the job's own run time. Results as
JSON in bench/results/. Not a test: run by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.support import start_stack, stop_stack  # noqa: E402

from lamina.stack._train import is_held  # noqa: E402  (the train job's split, not a copy of it)

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "retrieval" / "scifact"
RESULTS = ROOT / "bench" / "results"
BASE_MODEL = "minilm-l6-v2"
DEPLOYMENT = "embeddings"
DATASET = "scifact"
#: no bundled deployments (the chat model would only take CPU); the embedding deployment is made at run
#: time. Jobs may use more cores than the machine has: serving sits idle while they run.
CONFIG = """
deployments: []
orchestration:
  health_interval_s: 0.5
  ready_timeout_s: 180
demo:
  enabled: false
jobs:
  cpus: {cpus}
data:
  embedding_model: {model}
"""

Labelled = dict[str, Any]


def held_split(rows: list[Labelled], held: float) -> tuple[list[Labelled], list[Labelled]]:
    """(train, held): the ``train`` job's own rule (a hash of each query's text) applied to ``rows``."""
    train: list[Labelled] = []
    kept_out: list[Labelled] = []
    for row in rows:
        (kept_out if is_held(str(row["query"]), held) else train).append(row)
    return train, kept_out


# -- the data ------------------------------------------------------------------------------------------


def load_train(data: Path) -> tuple[dict[str, dict[str, str]], dict[str, str], dict[str, list[str]]]:
    """Corpus (id -> title, text), query texts, and the train qrels (query id -> relevant doc ids)."""
    corpus = {}
    for line in (data / "corpus.jsonl").open(encoding="utf-8"):
        doc = json.loads(line)
        corpus[doc["_id"]] = {"title": doc.get("title", ""), "text": doc["text"]}
    queries = {q["_id"]: q["text"] for q in map(json.loads, (data / "queries.jsonl").open(encoding="utf-8"))}
    qrels: dict[str, list[str]] = defaultdict(list)
    for line in (data / "qrels" / "train.tsv").read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[0] != "query-id" and int(fields[2]) > 0:
            qrels[fields[0]].append(fields[1])
    return corpus, queries, dict(qrels)


def select(
    corpus: dict[str, dict[str, str]],
    queries: dict[str, str],
    qrels: dict[str, list[str]],
    n_queries: int | None,
    n_docs: int | None,
) -> tuple[list[str], list[Labelled]]:
    """The doc ids to ingest and the labelled queries: the first ``n_queries`` judged ones by id, and
    every document relevant to them plus the corpus's first others up to ``n_docs``."""
    qids = sorted(qrels, key=int)[:n_queries]
    rows = [{"query": queries[q], "relevant": [f"{d}.txt" for d in qrels[q]]} for q in qids]
    needed = {d for q in qids for d in qrels[q]}
    docs = [d for d in corpus if d in needed]
    docs += [d for d in corpus if d not in needed][: max(0, (n_docs or len(corpus)) - len(docs))]
    return docs, rows


def write_inputs(
    tmp: Path, corpus: dict[str, dict[str, str]], docs: list[str], rows: list[Labelled], held: float
) -> dict[str, Any]:
    """The corpus as one file per document, the labelled queries (all, and the held part)."""
    folder = tmp / "corpus"
    folder.mkdir()
    for d in docs:
        (folder / f"{d}.txt").write_text(f"{corpus[d]['title']}\n\n{corpus[d]['text']}\n", encoding="utf-8")
    train, kept_out = held_split(rows, held)
    paths = {"corpus": folder, "queries": tmp / "train_queries.jsonl", "held": tmp / "held_queries.jsonl"}
    paths["queries"].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    paths["held"].write_text("".join(json.dumps(r) + "\n" for r in kept_out), encoding="utf-8")
    if not kept_out:
        raise SystemExit(f"no query of {len(rows)} falls in the held part ({held:.0%}); use more --queries")
    return {**paths, "n_train": len(train), "held_rows": kept_out, "sample": kept_out[0]["query"]}


# -- the stack, through the CLI ------------------------------------------------------------------------


class Loop:
    """One `lamina up` and the CLI calls against it; each step's timing."""

    def __init__(self, tmp: Path, job_cpus: float) -> None:
        self.tmp = tmp
        self.job_cpus = job_cpus
        self.config = tmp / "lamina.yaml"  # start_stack writes it
        self.stack = start_stack(tmp, CONFIG.format(cpus=job_cpus, model=BASE_MODEL))
        self.steps: dict[str, dict[str, Any]] = {}

    def cli(self, *args: str, url: bool = False) -> Any:
        argv = [sys.executable, "-m", "lamina.cli", *args, "--json"]
        argv += ["--url", self.stack.base_url] if url else ["--state-dir", str(self.stack.state_dir)]
        argv += [] if url else ["--config", str(self.config)]
        done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"`lamina {' '.join(args)}` exited {done.returncode}:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout)

    @contextmanager
    def step(self, name: str) -> Iterator[dict[str, Any]]:
        record: dict[str, Any] = {}
        t0 = time.perf_counter()
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
        yield record
        record["wall_s"] = round(time.perf_counter() - t0, 1)
        self.steps[name] = record
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {record}", file=sys.stderr, flush=True)

    def job(self, kind: str, **args: Any) -> dict[str, Any]:
        """Submit a job, follow its log to the end, and return it (its result, or an error if it failed)."""
        pairs = [f"--arg={k}={v}" for k, v in args.items() if v is not None]
        job = self.cli("jobs", "submit", kind, *pairs)
        state = ["--state-dir", str(self.stack.state_dir), "--config", str(self.config)]
        subprocess.run(
            [sys.executable, "-m", "lamina.cli", "jobs", "logs", job["id"], "--follow", *state],
            stdout=sys.stderr,
            check=False,
            cwd=ROOT,
        )
        job = self.cli("jobs", "show", job["id"])
        if job["state"] != "succeeded":
            raise RuntimeError(f"{kind} job {job['id']} {job['state']}: {job['error'] or job['message']}")
        return dict(job)

    def evaluate(self, step: str, dataset: str, queries: Path, model: str) -> float:
        """An ``eval`` job of ``model`` on ``dataset``, timed as ``step``; its nDCG@10."""
        with self.step(step) as s:
            job = self.job("eval", dataset=dataset, queries=queries, model=model)
            s |= {"job_s": _job_s(job), **job["result"]}
        return float(s["ndcg@10"])

    def search(self, step: str, dataset: str, rows: list[Labelled]) -> float:
        """The served vector search of ``dataset``, timed as ``step``; its nDCG@10."""
        with self.step(step) as s:
            s |= retrieval_ndcg(self.stack.base_url, dataset, rows)
        return float(s["ndcg@10"])

    def deployment(self) -> dict[str, Any]:
        data = httpx.get(f"{self.stack.base_url}/admin/v1/deployments", timeout=30).json()["data"]
        return next(d for d in data if d["name"] == DEPLOYMENT)

    def wait(self, cond: Callable[[dict[str, Any]], bool], what: str, timeout_s: float = 900) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond(described := self.deployment()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}: {described}")
            time.sleep(0.5)

    def embed_one(self, text: str) -> list[float]:
        body = {"model": DEPLOYMENT, "input": [text]}
        reply = httpx.post(f"{self.stack.base_url}/v1/embeddings", json=body, timeout=120)
        reply.raise_for_status()
        return list(reply.json()["data"][0]["embedding"])


def retrieval_ndcg(base_url: str, dataset: str, rows: list[Labelled], depth: int = 50) -> dict[str, Any]:
    """nDCG@10 of the documents the gateway's vector search (``POST /v1/retrieve``, mode vector, the
    dataset's ANN index) ranks first, from its ``depth`` best chunks."""
    total, t0 = 0.0, time.perf_counter()
    with httpx.Client(base_url=base_url, timeout=120) as client:
        for row in rows:
            body = {"dataset": dataset, "query": row["query"], "k": depth, "mode": "vector"}
            reply = client.post("/v1/retrieve", json=body)
            if reply.status_code != 200:
                raise RuntimeError(f"POST /v1/retrieve {dataset}: {reply.status_code} {reply.text[:500]}")
            docs = [Path(unquote(urlparse(c["source_uri"]).path)).name for c in reply.json()["data"]]
            total += ndcg_at_10(list(dict.fromkeys(docs)), set(row["relevant"]))
    seconds = time.perf_counter() - t0
    return {
        "ndcg@10": round(total / len(rows), 4),
        "queries": len(rows),
        "query_ms": 1000 * seconds / len(rows),
    }


def ndcg_at_10(ranked: list[str], relevant: set[str]) -> float:
    dcg = sum(1 / math.log2(i + 2) for i, d in enumerate(ranked[:10]) if d in relevant)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(len(relevant), 10)))
    return dcg / ideal if ideal else 0.0


def _rolled_out(described: dict[str, Any]) -> bool:
    phase = (described["rollout"] or {}).get("phase")
    if phase in ("rolling_back", "rolled_back"):
        raise RuntimeError(f"the rollout was rolled back: {described['rollout']}")
    return bool(phase == "done")


def _job_s(job: dict[str, Any]) -> float | None:
    if not job.get("started_at") or not job.get("finished_at"):
        return None
    span = datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])
    return round(span.total_seconds(), 1)


def train(loop: Loop, dataset: str, inputs: dict[str, Any], args: argparse.Namespace) -> str:
    """The train job (it quantizes and gates its model too); the registered model version."""
    with loop.step("train") as s:
        train = {"epochs": args.epochs, "batch_size": args.batch_size, "max_steps": args.max_steps}
        job = loop.job("train", dataset=dataset, queries=inputs["queries"], held=args.held, **train)
        s |= {"job_s": _job_s(job), **job["result"]}
    if s["passed"]:
        return str(s["model"])
    if s["gate"]["status"] == "passed":  # the int8 variant failed its gate: the trained version serves
        print(f"{s['model']} failed its gate {s['reasons']}; rolling out {s['trained']}", file=sys.stderr)
        s["rolled_out"] = s["trained"]
        return str(s["trained"])
    raise RuntimeError(f"the trained model {s['trained']} failed the accuracy gate: {s['gate']}")


def run_loop(loop: Loop, inputs: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Every step; returns what they measured (nDCG@10 before and after, the new model, ...)."""
    out, dataset, before_vec = baseline(loop, inputs)
    model = train(loop, dataset, inputs, args)
    return out | roll_out(loop, inputs, dataset, model, before_vec)


def baseline(loop: Loop, inputs: dict[str, Any]) -> tuple[dict[str, Any], str, list[float]]:
    """Deploy the base model, ingest, and measure it: (nDCG@10s, the dataset version, a served vector)."""
    out: dict[str, Any] = {}
    with loop.step("deploy") as s:
        loop.cli("deploy", BASE_MODEL, "--name", DEPLOYMENT, url=True)
        loop.wait(lambda d: d["state"] == "ready", "the embedding deployment")
        before_vec = loop.embed_one(inputs["sample"])
    with loop.step("ingest") as s:
        report = loop.cli("data", "ingest", str(inputs["corpus"]), "--dataset", DATASET)
        s |= {"version": report["version"]["ref"], "counts": report.get("counts")}
    dataset = s["version"]
    out["ndcg_before"] = loop.evaluate("eval_before", dataset, inputs["held"], BASE_MODEL)
    out["retrieve_ndcg_before"] = loop.search("retrieve_before", dataset, inputs["held_rows"])
    return out, dataset, before_vec


def roll_out(
    loop: Loop, inputs: dict[str, Any], dataset: str, model: str, before_vec: list[float]
) -> dict[str, Any]:
    """Roll ``model`` out, re-embed ``dataset`` with it, and measure it again."""
    out: dict[str, Any] = {}
    with loop.step("rollout") as s:
        loop.cli("rollout", DEPLOYMENT, model, url=True)
        loop.wait(_rolled_out, f"the rollout of {model}")
        described = loop.deployment()
        after_vec = loop.embed_one(inputs["sample"])
        cos = sum(a * b for a, b in zip(before_vec, after_vec, strict=True))
        s |= {"model_version": described["model_version"], "versions": described["versions"]}
        s["served_cosine_to_base"] = round(cos, 4)  # unit vectors: below 1 means the new model answers
    with loop.step("embed") as s:
        job = loop.job("embed", dataset=dataset, model=model)
        s |= {"job_s": _job_s(job), **job["result"]}
    new_version = s["version"] or dataset  # None: nothing changed (the same chunks and model)
    out["ndcg_after"] = loop.evaluate("eval_after", new_version, inputs["held"], model)
    # no restart: the gateway embeds each version's queries with the model that embedded it, the new
    # version's through the rolled-out deployment, the old one's in its own process
    out["retrieve_ndcg_after"] = loop.search("retrieve_after", new_version, inputs["held_rows"])
    # the version before, after the rollout: still searched with its own model
    out["retrieve_ndcg_old_after_rollout"] = loop.search("retrieve_old", dataset, inputs["held_rows"])
    return out | {"model": model, "dataset_before": dataset, "dataset_after": new_version}


# -- the report ----------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the timings ran on, and how busy it was (other work shares this machine's cores)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpus": psutil.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": sys.version.split()[0],
    }


def report(result: dict[str, Any]) -> str:
    lines = [f"{'step':<12} {'wall s':>8} {'job s':>8}  notes"]
    for name, s in result["steps"].items():
        job_s = "" if s.get("job_s") is None else f"{s['job_s']:.1f}"
        notes = {
            "ingest": lambda s: f"{s['version']} {s.get('counts')}",
            "eval_before": lambda s: f"nDCG@10 {s['ndcg@10']:.4f} on {s['queries']} held queries",
            "train": lambda s: (
                f"{s['model']} passed={s['passed']} base {s['ndcg_base']} -> trained {s['ndcg_trained']} "
                f"({s['train_pairs']} pairs, {s['steps']} steps)"
            ),
            "rollout": lambda s: f"serving {s['versions']}, cosine to base {s['served_cosine_to_base']}",
            "embed": lambda s: f"{s['source']} -> {s['version']} with {s['model']}",
            "eval_after": lambda s: f"nDCG@10 {s['ndcg@10']:.4f} on {s['queries']} held queries",
            "retrieve_before": lambda s: f"served vector search: nDCG@10 {s['ndcg@10']:.4f}",
            "retrieve_after": lambda s: f"served vector search: nDCG@10 {s['ndcg@10']:.4f}",
            "retrieve_old": lambda s: f"the version before, after the rollout: nDCG@10 {s['ndcg@10']:.4f}",
        }.get(name, lambda s: "")(s)
        lines.append(f"{name:<12} {s['wall_s']:>8.1f} {job_s:>8}  {notes}")
    lines.append(f"{'total':<12} {result['total_s']:>8.1f}")
    if "ndcg_after" in result:
        lines.append(
            f"vector nDCG@10 on the held train queries: {result['ndcg_before']:.4f} (base) -> "
            f"{result['ndcg_after']:.4f} ({result['model']})"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SciFact in BEIR layout")
    ap.add_argument("--docs", type=int, default=None, help="documents to ingest (all relevant ones kept)")
    ap.add_argument("--queries", type=int, default=None, help="judged train queries to use (first by id)")
    ap.add_argument("--held", type=float, default=0.2, help="share of the queries held out of training")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-steps", type=int, default=None, help="stop training after N steps")
    ap.add_argument("--job-cpus", type=float, default=8.0, help="jobs.cpus of the stack (its job capacity)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the stack's files in this folder")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    if not (args.data / "qrels" / "train.tsv").exists():
        sys.exit(f"SciFact not found at {args.data}; pass --data DIR (BEIR layout with qrels/train.tsv)")
    result: dict[str, Any] = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    corpus, queries, qrels = load_train(args.data)
    docs, rows = select(corpus, queries, qrels, args.queries, args.docs)
    with tempfile.TemporaryDirectory(prefix="scifact-loop-") as tmp_name:
        tmp = args.keep or Path(tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        inputs = write_inputs(tmp, corpus, docs, rows, args.held)
        result |= {"docs": len(docs), "queries": len(rows), "train_queries": inputs["n_train"]}
        result["held_queries"] = len(inputs["held_rows"])
        t0 = time.perf_counter()
        loop = Loop(tmp, args.job_cpus)
        result["stack_start_s"] = round(time.perf_counter() - t0, 1)
        try:
            result |= run_loop(loop, inputs, args)
        except RuntimeError as exc:
            result["error"] = str(exc)
            print(f"stopped: {exc}\n(stack log: {loop.stack.log_path})", file=sys.stderr)
        finally:
            result["steps"] = loop.steps
            result["total_s"] = round(time.perf_counter() - t0, 1)
            result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
            stop_stack(loop.stack)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"scifact_loop-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str) if args.json else report(result))
    print(f"written to {out.relative_to(ROOT)}", file=sys.stderr)
    if "error" in result:
        sys.exit(1)


if __name__ == "__main__":
    main()
