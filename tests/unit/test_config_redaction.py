"""`lamina config show` hides secrets: API keys whole, the passwords of URLs (user and host stay visible)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lamina.cli import app
from lamina.config import LaminaConfig, redact_url

runner = CliRunner()

#: every secret in the config below contains this, so one check finds any that leaks
MARK = "SeCrEt"

CONFIG = f"""
server:
  api_keys: ["sk-live-{MARK}-1", "sk-{MARK}-2"]
store:
  url: "postgresql+psycopg://alice:pw-{MARK}-store@db.internal:5432/lamina"
data:
  vector_backend: pgvector
  pgvector_url: "postgresql://bob:p@ss/{MARK}@vec.internal/vectors?sslmode=require&password={MARK}-q"
  openlineage_url: "http://carol:{MARK}-ol@marquez.internal:5000"
observability:
  otlp_endpoint: "https://dave:{MARK}-otlp@otel.internal:4318/v1/traces?api_key={MARK}-key"
"""


def test_config_show_prints_no_secret(tmp_path: Path) -> None:
    path = tmp_path / "lamina.yaml"
    path.write_text(CONFIG)
    result = runner.invoke(app, ["config", "show", "--config", str(path), "--state-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert MARK.lower() not in result.output.lower()
    shown = yaml.safe_load(result.output)
    assert shown["server"]["api_keys"] == ["***", "***"]
    assert shown["store"]["url"] == "postgresql+psycopg://alice:***@db.internal:5432/lamina"
    assert shown["data"]["pgvector_url"] == (
        "postgresql://bob:***@vec.internal/vectors?sslmode=require&password=***"
    )
    assert shown["data"]["openlineage_url"] == "http://carol:***@marquez.internal:5000"
    assert shown["observability"]["otlp_endpoint"] == (
        "https://dave:***@otel.internal:4318/v1/traces?api_key=***"
    )
    assert shown["data"]["vector_backend"] == "pgvector"  # the rest is shown as it is


def test_config_show_keeps_what_is_not_secret(tmp_path: Path) -> None:
    result = runner.invoke(app, ["config", "show", "--state-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output) == LaminaConfig().model_dump(mode="json") | {
        "state_dir": str(tmp_path.resolve())
    }


def test_the_secret_fields_are_marked_in_the_schema() -> None:
    schema = LaminaConfig.model_json_schema()
    marked = sorted(
        f"{model}.{field}"
        for model, spec in schema["$defs"].items()
        for field, prop in spec.get("properties", {}).items()
        if prop.get("secret") is True
    )
    assert marked == ["ServerConfig.api_keys"]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql+psycopg://u:s3cr%40t@h/db", "postgresql+psycopg://u:***@h/db"),
        ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),  # an unencoded @ shows no part
        ("postgresql://u:pa/ss@h/db", "postgresql://u:***@h/db"),
        (
            "postgresql://u@h/db?sslmode=require&password=pw",
            "postgresql://u@h/db?sslmode=require&password=***",
        ),
        ("http://h:4318/v1/traces?token=t&x=1", "http://h:4318/v1/traces?token=***&x=1"),
        ("http://127.0.0.1:4318/v1/traces", "http://127.0.0.1:4318/v1/traces"),
        ("https://user@host/path", "https://user@host/path"),
        ("sqlite:////var/lib/lamina/lamina.db", "sqlite:////var/lib/lamina/lamina.db"),
        ("a http://x:y@h1 and https://z:w@h2/p", "a http://x:***@h1 and https://z:***@h2/p"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
