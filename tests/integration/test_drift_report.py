"""Drift checks end to end: the real MiniLM embedder, both vector backends (LanceDB with the metadata in
SQLite; pgvector with the metadata in the same PostgreSQL database), the drift window, stored reports,
the CLI.

Reference: a "recipes" dataset of cooking questions. Current: other cooking questions from the same
generator (no drift), or astronomy questions (drift, with astronomy as the uncovered examples).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from typer import Typer
from typer.testing import CliRunner

from lamina.cli._drift import drift, make_drift_command
from lamina.config import LaminaConfig
from lamina.data import Chunk, VectorStore
from lamina.data.drift import (
    DriftChecker,
    DriftReport,
    DriftReports,
    DriftSettings,
    DriftWindow,
    VersionResolver,
    WindowPolicy,
    publish_drift_metrics,
)
from lamina.errors import NotFoundError
from lamina.models import load_engine
from lamina.observability import DriftMetrics
from lamina.store import Store
from tests.support import VectorBackend, minilm_spec

Corpus = dict[str, list[float]]
Split = tuple[list[str], list[str], list[str]]
World = tuple[Store, VectorStore, VersionResolver]

NOW = datetime(2025, 3, 1, 9, 30, tzinfo=UTC)
#: Room for all of a test's traffic in one hour's bucket.
WIDE = WindowPolicy(capacity=168 * 500)

FOODS = [
    *("chicken thighs", "salmon fillets", "basmati rice", "fresh pasta", "bread dough", "beef stew"),
    *("tomato sauce", "pancakes", "roast potatoes", "vegetable soup", "chocolate cake", "risotto"),
    *("an omelette", "pizza dough", "lamb chops", "banana bread", "lentil curry", "apple pie"),
    *("scrambled eggs", "pork belly", "mushroom gravy", "shortbread cookies", "fried tofu", "carrot cake"),
    *("duck breast", "polenta", "grilled corn", "meatballs", "pumpkin soup", "cheesecake", "couscous"),
    *("roast turkey", "fish tacos", "cauliflower gratin", "ramen noodles", "blueberry muffins"),
]
COOKING = [
    "How long should I bake {x} in the oven?",
    "Which spices and herbs go well with {x}?",
    "Can I prepare {x} a day ahead and reheat it?",
    "Why did my {x} turn out dry and bland?",
    "At what temperature should I cook {x}?",
    "How much salt and butter goes into {x}?",
    "What side dish should I serve with {x} for dinner?",
    "Which pan or pot is best for cooking {x}?",
    "How do I keep {x} moist while it cooks?",
    "Is it safe to freeze leftover {x}?",
    "What can I use instead of flour when making {x}?",
    "How do I know when {x} is fully cooked?",
    "Give me a quick weeknight recipe for {x}.",
]
SKY = [
    *("Jupiter", "the Andromeda galaxy", "a neutron star", "the Orion nebula", "Saturn's rings"),
    *("a black hole", "the Milky Way", "a red dwarf star", "Mars", "Halley's comet", "a supernova"),
    *("the cosmic microwave background", "a pulsar", "Alpha Centauri", "the Crab nebula"),
]
ASTRONOMY = [
    "How far is {x} from Earth in light years?",
    "What telescope do I need to observe {x}?",
    "How did {x} form after the Big Bang?",
    "What is the mass of {x} compared to the Sun?",
    "Can I see {x} from the northern hemisphere tonight?",
    "Which space probe has studied {x}?",
]


def texts(templates: Sequence[str], things: Sequence[str]) -> list[str]:
    return [t.format(x=x) for t, x in itertools.product(templates, things)]


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    """Every text of these tests embedded once by the real all-MiniLM-L6-v2 (int8 ONNX)."""
    engine = load_engine("onnx", minilm_spec(batch_size=64))
    all_texts = sorted({*texts(COOKING, FOODS), *texts(ASTRONOMY, SKY)})
    try:
        vectors = engine.embed(all_texts).vectors
    finally:
        engine.close()
    return dict(zip(all_texts, vectors, strict=True))


@pytest.fixture(scope="module")
def split() -> Split:
    """Reference cooking texts, held-back cooking texts (same generator), astronomy texts."""
    cooking = texts(COOKING, FOODS)
    order = np.random.default_rng(1).permutation(len(cooking))
    shuffled = [cooking[i] for i in order]
    return shuffled[:250], shuffled[250:], texts(ASTRONOMY, SKY)


class OneVersion:
    """The test's catalog: one dataset version."""

    def __init__(self, dataset: str, chunk_ids: Collection[str]) -> None:
        self.dataset, self.chunk_ids = dataset, list(chunk_ids)

    def resolve(self, ref: str) -> tuple[str, str, Collection[str]]:
        if ref.partition("@")[0] != self.dataset:
            raise NotFoundError(f"dataset {ref!r} has no versions")
        return self.dataset, "v1hash", self.chunk_ids


def ingest(vectors: VectorStore, reference: list[str], corpus: Corpus) -> list[str]:
    chunks = []
    for i, text in enumerate(reference):
        digest = hashlib.sha256(text.encode()).hexdigest()
        chunks.append(
            Chunk(
                digest[:32],
                "recipes",
                "v1hash",
                text,
                f"file:///recipes/{i}.md",
                0,
                len(text),
                digest,
                {},
                corpus[text],
            )
        )
    vectors.upsert("recipes", chunks)
    return [c.chunk_id for c in chunks]


@pytest.fixture
def world(
    vstore: VectorBackend,
    backend: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    corpus: Corpus,
    split: Split,
) -> Iterator[World]:
    """A dataset version in each vector store, with the metadata on SQLite (LanceDB) or PostgreSQL."""
    on_pg = backend == "pgvector"
    store = Store(request.getfixturevalue("pg_database") if on_pg else f"sqlite:///{tmp_path / 'lamina.db'}")
    store.migrate()
    ids = ingest(vstore, split[0], corpus)
    yield store, vstore, OneVersion("recipes", ids)
    store.close()


def record(store: Store, current: list[str], corpus: Corpus) -> None:
    window = DriftWindow(
        store, policy=WIDE, clock=lambda: NOW - timedelta(hours=2), rng=np.random.default_rng(0)
    )
    for text in current:
        window.record("recipes", text, corpus[text])


def check(world: World, window: str = "24h") -> DriftReport:
    store, vectors, resolver = world
    checker = DriftChecker(
        resolver=resolver,
        vectors=vectors,
        window=DriftWindow(store, policy=WIDE, clock=lambda: NOW),
        reports=DriftReports(store),
        clock=lambda: NOW,
    )
    return checker.check("recipes@1", window, rng=np.random.default_rng(42))


def test_same_topic_traffic_is_not_drift(world: World, corpus: Corpus, split: Split) -> None:
    record(world[0], split[1], corpus)
    report = check(world)
    m = report.metrics
    assert report.verdict == "no_drift", report.explanation
    assert m["n_current"] == len(split[1]) and m["n_reference"] == 250
    assert m["classifier"] is not None and m["classifier"]["auc"] <= 0.55
    assert m["mmd"] is not None and m["mmd"]["p_value"] >= 0.05
    assert m["oov"] is not None and not m["oov"]["shifted"]
    assert "no drift" in report.explanation.splitlines()[0]


def test_astronomy_traffic_is_drift_explained_with_astronomy_examples(
    world: World, corpus: Corpus, split: Split
) -> None:
    astronomy = split[2]
    record(world[0], astronomy, corpus)
    report = check(world)
    m = report.metrics
    assert report.drifted, report.explanation
    assert m["classifier"] is not None and m["classifier"]["drifted"] and m["classifier"]["auc"] > 0.9
    assert m["mmd"] is not None and m["mmd"]["drifted"] and m["mmd"]["p_value"] < 0.01
    assert m["oov"] is not None and m["oov"]["shifted"]
    cov = m["coverage"]
    assert cov is not None and cov["uncovered_share"] > 0.5
    assert len(cov["examples"]) == 5
    for example in cov["examples"]:
        assert example["text"] in astronomy
        assert example["nearest_source_uri"] is not None and example["nearest_source_uri"].startswith(
            "file:///recipes/"
        )
    text = report.explanation
    assert "DRIFT" in text and "Domain classifier FIRED" in text and "MMD FIRED" in text
    assert cov["examples"][0]["text"] in text
    assert "lamina data ingest" in text


def test_reports_are_stored_and_exported(world: World, corpus: Corpus, split: Split) -> None:
    record(world[0], split[2], corpus)
    report = check(world)
    reports = DriftReports(world[0])
    (stored,) = reports.history("recipes")
    assert stored == report
    assert reports.get(report.id).metrics == report.metrics
    registry = CollectorRegistry()
    publish_drift_metrics(reports.latest(), DriftMetrics(registry))
    labels = {"dataset": "recipes"}
    assert registry.get_sample_value("lamina_drift_detected", labels) == 1.0
    assert registry.get_sample_value("lamina_drift_auc", labels) == pytest.approx(
        report.metrics["classifier"]["auc"]  # type: ignore[index]
    )
    assert registry.get_sample_value("lamina_drift_p_value", labels) < 0.05  # type: ignore[operator]
    assert registry.get_sample_value("lamina_drift_mmd", labels) > 0  # type: ignore[operator]


def test_too_little_traffic_gives_no_verdict(world: World, corpus: Corpus, split: Split) -> None:
    record(world[0], split[2][:12], corpus)
    report = check(world)
    assert report.verdict == "insufficient_data" and not report.drifted
    assert report.metrics["classifier"] is None and report.metrics["n_current"] == 12
    assert "TOO LITTLE DATA" in report.explanation and "30" in report.explanation


def test_the_window_excludes_older_traffic(world: World, corpus: Corpus, split: Split) -> None:
    record(world[0], split[2], corpus)  # two hours ago
    report = check(world, window="1h")
    assert report.metrics["n_current"] == 0 and report.verdict == "insufficient_data"


def test_settings_change_the_thresholds(world: World, corpus: Corpus, split: Split) -> None:
    store, vectors, resolver = world
    record(store, split[1][:60], corpus)
    strict = DriftSettings(auc_threshold=0.0, p_threshold=1.0, permutations=50)
    checker = DriftChecker(
        resolver=resolver,
        vectors=vectors,
        window=DriftWindow(store, policy=WIDE, clock=lambda: NOW),
        settings=strict,
        clock=lambda: NOW,
    )
    report = checker.check("recipes", "24h", rng=np.random.default_rng(0))
    assert report.drifted and report.metrics["mmd"]["permutations"] == 50  # type: ignore[index]
    assert DriftReports(store).history() == []  # no reports store given: nothing stored


def test_one_test_alone_is_possible_drift(world: World, corpus: Corpus, split: Split) -> None:
    store, vectors, resolver = world
    record(store, split[2], corpus)
    window = DriftWindow(store, policy=WIDE, clock=lambda: NOW)
    no_classifier = DriftSettings(auc_threshold=1.0)  # an AUC can never exceed 1: only MMD can fire
    checker = DriftChecker(
        resolver=resolver, vectors=vectors, window=window, settings=no_classifier, clock=lambda: NOW
    )
    report = checker.check("recipes", "24h", rng=np.random.default_rng(0))
    assert report.verdict == "possible_drift" and not report.drifted
    assert "POSSIBLE DRIFT" in report.explanation and "--window 7d" in report.explanation
    assert "Examples the dataset does not cover" in report.explanation


def test_cli_prints_the_explanation_and_json(
    world: World, corpus: Corpus, split: Split, tmp_path: Path
) -> None:
    _, vectors, resolver = world
    state = tmp_path / "state"

    @contextmanager
    def opener(cfg: LaminaConfig, root: Path) -> Iterator[DriftChecker]:
        store = Store(cfg.database_url(root))
        store.migrate()
        try:
            window = DriftWindow(store, rng=np.random.default_rng(0))  # the real clock: traffic "now"
            yield DriftChecker(resolver=resolver, vectors=vectors, window=window, reports=DriftReports(store))
        finally:
            store.close()

    with opener(LaminaConfig(), state) as checker:
        for text in split[2]:
            checker.window.record("recipes", text, corpus[text])
    app = Typer()
    app.command()(make_drift_command(opener))
    runner = CliRunner()
    result = runner.invoke(app, ["recipes@1", "--window", "1h", "--state-dir", str(state)])
    assert result.exit_code == 0, result.output
    assert "DRIFT" in result.output and "stored as drift report" in result.output
    result = runner.invoke(app, ["recipes@1", "--json", "--state-dir", str(state)])
    body = json.loads(result.output)
    assert body["drifted"] is True and body["dataset"] == "recipes" and body["version"] == "v1hash"
    assert body["metrics"]["coverage"]["examples"][0]["text"] in split[2]
    with opener(LaminaConfig(), state) as checker:
        assert len(DriftReports(checker.window.store).history("recipes")) == 2
    bad = runner.invoke(app, ["recipes", "--window", "soon", "--state-dir", str(state)])
    assert bad.exit_code == 1 and "cannot read the window" in bad.output
    missing = runner.invoke(app, ["nosuch", "--state-dir", str(state)])
    assert missing.exit_code == 1 and "not_found" in missing.output


def test_the_real_command_resolves_through_the_dataset_catalog(tmp_path: Path) -> None:
    app = Typer()
    app.command()(drift)
    result = CliRunner().invoke(app, ["docs@2", "--state-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "not_found" in result.output and "lamina data ingest" in result.output
