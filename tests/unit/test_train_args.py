"""The ``train`` job kind's arguments and its split of labelled queries (no PyTorch needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lamina.config import LaminaConfig
from lamina.errors import InvalidRequestError
from lamina.models._train import require_training
from lamina.stack import job_kinds
from lamina.stack._train import PASSAGES_PER_QUERY, is_held, split


def check(tmp_path: Path, **args: str) -> dict[str, object]:
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"query": "q", "relevant": ["a.txt"]}\n')
    kind = job_kinds(LaminaConfig(register_bundled=False, deployments=[]), tmp_path)["train"]
    assert kind.check_args is not None
    return kind.check_args({"dataset": "docs", "queries": str(queries), **args})


def test_arguments_are_parsed_with_their_defaults(tmp_path: Path) -> None:
    args = check(tmp_path, epochs="2", max_steps="5", **{"tolerance.min_cosine": "0.9"})
    assert args["held"] == 0.2 and args["batch_size"] == 32 and args["seed"] == 0
    assert args["epochs"] == 2 and args["max_steps"] == 5 and args["tolerance"] is None
    assert args["queries"] == str((tmp_path / "q.jsonl").resolve())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"held": "0"}, r"held=0 is out of range: give a value between 0 and 1 \(exclusive\)"),
        ({"held": "1"}, "held=1 is out of range"),
        ({"epochs": "two"}, "epochs='two' is not an integer; pass --arg epochs=VALUE"),
        ({"batch_size": "1"}, "batch_size=1 is out of range: give a value between 2 and"),
        ({"tolerance": "x"}, "tolerance='x' is not a number"),
        ({"tolerance.cosine": "0.9"}, "unknown limit tolerance.cosine; .* min_cosine"),
    ],
)
def test_bad_arguments_are_refused_at_submit_with_what_to_give(
    tmp_path: Path, args: dict[str, str], message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        check(tmp_path, **args)


def test_a_missing_queries_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match=r"queries file .* not found"):
        check(tmp_path, queries=str(tmp_path / "nope.jsonl"))


def test_the_split_is_by_query_text_and_pairs_each_query_with_its_files_chunks() -> None:
    queries = [(f"question {i}", {f"{i % 3}.txt"}) for i in range(40)] + [("orphan", {"gone.txt"})]
    texts = [f"chunk {n} of {d}" for d in range(3) for n in range(10)]
    docs = [f"{d}.txt" for d in range(3) for _ in range(10)]
    data = split("docs@1", queries, texts, docs, 0.25)
    held = {q for q, _ in data.held}
    assert held == {q for q, _ in queries[:40] if is_held(q, 0.25)}
    assert 4 <= len(held) <= 16 and "orphan" not in held
    assert {q for q, _ in data.pairs}.isdisjoint(held)
    assert len(data.pairs) == PASSAGES_PER_QUERY * (40 - len(held))
    assert all(p.endswith(f"of {int(q.split()[1]) % 3}") for q, p in data.pairs)
    assert data.passages == tuple(texts) and data.passage_docs == tuple(docs)
    assert split("docs@1", queries, texts, docs, 0.25) == data  # the same on every run


def test_queries_naming_no_file_of_the_version_are_refused_with_the_names() -> None:
    with pytest.raises(InvalidRequestError, match=r"0 training pairs and 0 held .* holds 1 files.*x\.txt"):
        split("docs@1", [("q", {"x.txt"})], ["text"], ["a.txt"], 0.2)


@pytest.mark.parametrize("module", ["torch", "sentence_transformers"])
def test_training_without_the_extra_says_what_to_install(
    module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # how Python marks a module as not importable
    with pytest.raises(InvalidRequestError, match=rf"training needs {module}: pip install 'lamina\[train\]'"):
        require_training()
