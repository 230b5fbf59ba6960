"""The config: defaults need no file; a bad file is one clear error naming the file, the field and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from lamina.cli import app
from lamina.config import LaminaConfig, load_config, resolve_state_dir
from lamina.errors import ConfigError

runner = CliRunner()


def test_defaults_serve_the_bundled_models() -> None:
    cfg = load_config(None)
    assert [d.name for d in cfg.deployments] == ["smollm2-135m-instruct", "minilm-l6-v2"]
    assert cfg.deployments[0].engine == "gguf" and cfg.deployments[0].options_for("gguf") == {}
    assert cfg.server.host == "127.0.0.1"


def test_every_field_has_a_description() -> None:
    schema = LaminaConfig.model_json_schema()
    missing = []
    for name, model in [("LaminaConfig", schema), *schema["$defs"].items()]:
        for field, spec in model.get("properties", {}).items():
            if "description" not in spec:
                missing.append(f"{name}.{field}")
    assert missing == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("server:\n  prot: 8000\n", "unknown field `server.prot`"),
        ("server:\n  port: eighty\n", "field `server.port`"),
        ("deployments:\n  - name: a\n    replicas: -1\n", "field `deployments.0.replicas`"),
        ("server: [1, 2\n", "not valid YAML"),
        (
            "deployments:\n  - name: a\n    options: {n_ctx: 4096}\n",
            'field `deployments.0.options`: Value error, options are grouped by engine: {"gguf": {"n_ctx": '
            "4096}}",
        ),
        ("- just\n- a list\n", "top level must be a mapping"),
        (
            "deployments:\n  - {name: a, engine: fake}\n  - {name: a, engine: fake}\n",
            "deployment names must be unique; repeated: a",
        ),
    ],
)
def test_bad_files_name_the_file_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "lamina.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in info.value.message
    assert expected in info.value.message


def test_cli_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "lamina.yaml"
    path.write_text("server:\n  prot: 1\n")
    result = runner.invoke(app, ["config", "show", "--config", str(path)])
    assert result.exit_code == 2
    assert "unknown field `server.prot`" in result.output
    assert "Traceback" not in result.output


def test_cli_missing_config_file(tmp_path: Path) -> None:
    result = runner.invoke(app, ["config", "show", "--config", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "no such config file" in result.output


def test_config_show_prints_the_effective_config(tmp_path: Path) -> None:
    path = tmp_path / "lamina.yaml"
    path.write_text("server:\n  port: 9123\n")
    result = runner.invoke(app, ["config", "show", "--config", str(path), "--state-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["server"]["port"] == 9123
    assert shown["state_dir"] == str(tmp_path.resolve())
    assert shown["deployments"][0]["name"] == "smollm2-135m-instruct"


def test_config_schema_is_json_schema() -> None:
    result = runner.invoke(app, ["config", "schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert schema["additionalProperties"] is False
    assert "deployments" in schema["properties"]


def test_state_dir_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAMINA_STATE_DIR", str(tmp_path / "env"))
    assert resolve_state_dir(tmp_path / "flag") == (tmp_path / "flag").resolve()
    assert resolve_state_dir(None) == (tmp_path / "env").resolve()
    monkeypatch.delenv("LAMINA_STATE_DIR")
    monkeypatch.chdir(tmp_path)
    assert resolve_state_dir(None) == (tmp_path / ".lamina").resolve()


def test_the_gateway_event_loop_is_uvloop_or_asyncio() -> None:
    assert LaminaConfig.model_validate({}).server.event_loop == "uvloop"
    assert LaminaConfig.model_validate({"server": {"event_loop": "asyncio"}}).server.event_loop == "asyncio"
    with pytest.raises(ValidationError, match="uvloop"):
        LaminaConfig.model_validate({"server": {"event_loop": "tokio"}})
