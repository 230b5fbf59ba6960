"""Engines are plugins that describe themselves: one installed as a package serves with no core change.

The test writes a real distribution onto ``sys.path`` (a module and a ``.dist-info`` whose
``entry_points.txt`` registers it under ``lamina.engines``), exactly what ``pip install`` leaves behind,
then lists it, checks a config against it and serves through it from real replica processes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from lamina.cli import app
from lamina.config import DeploymentConfig, LaminaConfig, OrchestrationConfig
from lamina.errors import ConfigError
from lamina.models import engine_descriptor, engine_names
from lamina.stack import checked_config
from lamina.stack.gateway import build_stack, create_gateway

pytestmark = pytest.mark.anyio

PLUGIN = '''
from collections.abc import Iterator, Sequence
from pydantic import BaseModel, ConfigDict, Field
from lamina.errors import UnsupportedCapabilityError
from lamina.models import (
    Capability, ChatMessage, Delta, EmbeddingBatch, EngineDescriptor, EngineInfo, LoadSpec, SamplingParams,
    Usage,
)
from lamina.orchestration import Resources


class UpperOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prefix: str = Field("", description="Put before every answer.")


class UpperEngine:
    """Answers with the last user message in capitals."""

    def __init__(self, spec: LoadSpec) -> None:
        self.options = UpperOptions.model_validate(spec.options)

    def info(self) -> EngineInfo:
        caps = frozenset({Capability.CHAT, Capability.COMPLETION, Capability.STREAMING})
        return EngineInfo(engine="upper", capabilities=caps, context_length=512)

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def count_chat_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return sum(self.count_tokens(m.content) for m in messages)

    def chat(self, messages: Sequence[ChatMessage], params: SamplingParams) -> Iterator[Delta]:
        text = self.options.prefix + messages[-1].content.upper()
        yield Delta(text, finish_reason="stop", usage=Usage(self.count_chat_tokens(messages), 1))

    def complete(self, prompt: str, params: SamplingParams) -> Iterator[Delta]:
        yield Delta(self.options.prefix + prompt.upper(), finish_reason="stop", usage=Usage(1, 1))

    def embed(self, texts: Sequence[str]) -> EmbeddingBatch:
        raise UnsupportedCapabilityError("the upper engine does not embed")

    def close(self) -> None:
        pass


DESCRIPTOR = EngineDescriptor(
    name="upper",
    description="answers in capitals (a test plugin)",
    capabilities=frozenset({Capability.CHAT, Capability.COMPLETION, Capability.STREAMING}),
    options=UpperOptions,
    factory=UpperEngine,
    resources=lambda files, options: Resources(cpus=0.1, memory_mb=64, gpus=0),
)
'''


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The plugin installed as a distribution would be: a module and its dist-info, on the path."""
    site = tmp_path / "site"
    (site / "lamina_upper_engine").mkdir(parents=True)
    (site / "lamina_upper_engine" / "__init__.py").write_text(PLUGIN)
    info = site / "lamina_upper_engine-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lamina-upper-engine\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[lamina.engines]\nupper = lamina_upper_engine:DESCRIPTOR\n")
    monkeypatch.syspath_prepend(str(site))
    # replica worker processes find it too
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    yield site


def upper_config(**options: Any) -> LaminaConfig:
    return LaminaConfig(
        register_bundled=False,
        deployments=[DeploymentConfig.model_validate({"name": "shout", "engine": "upper", "upper": options})],
        orchestration=OrchestrationConfig(ready_timeout_s=60, health_interval_s=0.2),
    )


def test_an_installed_plugin_is_listed_with_its_options(plugin: Path) -> None:
    assert engine_names() == ["fake", "gguf", "onnx", "openai", "upper"]
    listed = CliRunner().invoke(app, ["engines", "--json"])
    assert listed.exit_code == 0, listed.output
    engines = {e["name"]: e for e in json.loads(listed.output)}
    assert engines["upper"]["capabilities"] == ["chat", "completion", "streaming"]
    assert engines["upper"]["formats"] == []
    assert engines["upper"]["options"]["prefix"]["default"] == ""
    assert engines["gguf"]["formats"] == ["gguf"] and "n_ctx" in engines["gguf"]["options"]
    table = CliRunner().invoke(app, ["engines"])
    assert table.exit_code == 0 and "│ upper" in table.output


def test_its_options_are_checked_when_the_config_is_loaded(plugin: Path) -> None:
    checked = checked_config(upper_config(prefix=">> "))
    assert checked.deployments[0].options_for("upper") == {"prefix": ">> "}
    with pytest.raises(ConfigError, match=r"deployment 'shout': upper options: `prefx`"):
        checked_config(upper_config(prefx=">> "))


def test_unknown_engines_and_option_blocks_are_refused_with_the_installed_ones() -> None:
    unknown = LaminaConfig(deployments=[DeploymentConfig(name="x", engine="vllm")])
    with pytest.raises(ConfigError, match=r"no engine plugin named 'vllm'; installed: fake, gguf, onnx"):
        checked_config(unknown)
    typo = LaminaConfig(deployments=[DeploymentConfig.model_validate({"name": "x", "gguff": {"n_ctx": 64}})])
    with pytest.raises(ConfigError, match=r"options for gguff, but no engine of that name is installed"):
        checked_config(typo)
    with pytest.raises(ConfigError, match="`n_ctx`"):
        checked_config(LaminaConfig.model_validate({"deployments": [{"name": "x", "gguf": {"n_ctx": 1}}]}))


def test_the_builtin_engines_describe_themselves() -> None:
    gguf, onnx, fake = (engine_descriptor(n) for n in ("gguf", "onnx", "fake"))
    assert gguf.formats == {"gguf"} and onnx.formats == {"onnx"} and not fake.needs_model
    assert gguf.resources([], gguf.parse_options({"n_threads": 3, "n_gpu_layers": -1}, "t")).gpus == 1
    assert onnx.resources([], onnx.parse_options({}, "t")).cpus == 1.0


async def test_the_plugin_serves_through_real_replicas_with_no_core_change(
    plugin: Path, tmp_path: Path
) -> None:
    stack = build_stack(upper_config(prefix=">> "), tmp_path / "state")
    assert [m.capabilities for m in stack.catalog.models()] == [["chat", "completion", "streaming"]]
    app_ = create_gateway(stack)
    async with app_.router.lifespan_context(app_):
        assert await stack.controller.wait_ready(60)
        transport = httpx.ASGITransport(app=app_)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            body = {"model": "shout", "messages": [{"role": "user", "content": "quiet please"}]}
            reply = await client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == ">> QUIET PLEASE"
