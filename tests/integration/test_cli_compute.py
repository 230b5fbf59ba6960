"""``lamina compute`` and ``lamina compute fit`` through the real CLI app, and ``lamina up`` refusing a
deployment that cannot fit, as a real process, before any replica starts."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pynvml
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from lamina.cli._app import app
from lamina.cli._compute import print_node
from lamina.compute import CPUInfo, GPUInfo, GPULink, GPUProcess, NodeInventory
from tests.support.processes import start_stack, stop_stack

CHAT = "smollm2-135m-instruct"
#: far more than any machine these tests run on: 64 replicas x 64 slots of the model's 8192 tokens
IMPOSSIBLE = ("--ctx", "131072", "--parallel", "64", "--replicas", "64")


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One state directory for the module: the bundled model is registered once, by the first fit."""
    yield tmp_path_factory.mktemp("compute") / "state"


def lamina(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def _no_nvidia_driver() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return True
    pynvml.nvmlShutdown()
    return False


def test_compute_lists_this_machine_as_json() -> None:
    result = lamina("compute", "--json")
    assert result.exit_code == 0, result.output
    (node,) = json.loads(result.stdout)["nodes"]
    assert node["hostname"] == socket.gethostname()
    assert node["cpu"]["affinity"] == sorted(os.sched_getaffinity(0))
    assert node["cpu"]["logical"] == psutil.cpu_count(logical=True)
    assert node["memory_total_bytes"] == psutil.virtual_memory().total
    if _no_nvidia_driver():
        assert node["gpus"] == [] and node["gpu_note"].startswith("no NVIDIA driver")
    else:
        assert all(g["uuid"] and g["memory_total_bytes"] > 0 for g in node["gpus"])


def test_compute_says_no_nvidia_driver_and_exits_0() -> None:
    result = lamina("compute")
    assert result.exit_code == 0, result.output
    assert "RAM" in result.stdout and "physical" in result.stdout
    if _no_nvidia_driver():
        assert "GPU  none: no NVIDIA driver" in result.stdout


def test_the_bundled_chat_model_fits_in_this_machines_ram(state: Path) -> None:
    result = lamina(
        "compute", "fit", CHAT, "--ctx", "4096", "--parallel", "4", "--json", "--state-dir", str(state)
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["fits"] and report["engine"] == "gguf" and report["model"] == f"{CHAT}@1"
    (ram,) = report["devices"]
    assert ram["device"] == "ram" and ram["node"] == socket.gethostname()
    assert ram["total_bytes"] == psutil.virtual_memory().total
    estimate = report["estimate"]
    # the Q4_1 file (94 MiB), and 4 slots x 4096 tokens of f16 KV cache (30 layers x 3 KV heads x 64 x 2)
    assert estimate["weights_bytes"] == 98_362_432
    assert estimate["runtime_bytes"] >= 4 * 4096 * 30 * 3 * 128 * 2
    assert ram["replicas"] == ram["available_bytes"] // estimate["total_bytes"] >= 1
    text = lamina("compute", "fit", CHAT, "--ctx", "4096", "--parallel", "4", "--state-dir", str(state))
    assert text.exit_code == 0 and f"{socket.gethostname()} RAM" in text.stdout and "fits:" in text.stdout


def test_an_impossible_fit_says_no_with_the_numbers(state: Path) -> None:
    result = lamina("compute", "fit", CHAT, *IMPOSSIBLE, "--json", "--state-dir", str(state))
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert not report["fits"] and report["replicas"] == 64 and report["replicas_possible"] < 64
    assert "n_ctx 131072 is capped at the model's own context of 8192 tokens" in report["notes"][0]
    assert "64 replica(s) x 11.50 GiB" in report["message"]
    assert "smaller context (n_ctx), fewer parallel slots" in report["message"]
    text = lamina("compute", "fit", CHAT, *IMPOSSIBLE, "--state-dir", str(state))
    assert text.exit_code == 1 and "does not fit" in text.stdout


def test_fit_options_the_engine_does_not_take_are_a_config_error(state: Path) -> None:
    result = lamina("compute", "fit", "minilm-l6-v2", "--ctx", "512", "--state-dir", str(state))
    assert result.exit_code == 2
    assert "onnx options: `n_ctx`" in result.output


def test_up_refuses_a_deployment_that_cannot_fit_before_starting_anything(tmp_path: Path) -> None:
    config = tmp_path / "lamina.yaml"
    config.write_text(
        f"deployments:\n  - name: chat\n    model: {CHAT}\n    replicas: 64\n"
        "    gguf: {n_ctx: 131072, parallel: 64}\n",
        encoding="utf-8",
    )
    state = tmp_path / "state"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lamina.cli",
            "up",
            "--config",
            str(config),
            "--state-dir",
            str(state),
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "deployment 'chat' does not fit on this machine, so nothing was started" in done.stderr
    assert "64 replica(s) x 11.50 GiB" in done.stderr
    assert "is starting" not in done.stdout
    assert not (state / "logs").exists(), "no replica process was started"


def test_up_on_a_port_in_use_says_so_before_starting_anything(tmp_path: Path) -> None:
    """Before this, the banner and "ready" came first (the models loaded, the replicas started), then
    uvicorn's bare `[Errno 98] ... address already in use`."""
    state = tmp_path / "state"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "lamina.cli", "up", "--state-dir", str(state), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
    assert done.returncode == 1, done.stderr
    assert f"127.0.0.1:{port} is already in use" in done.stderr and "--port" in done.stderr
    assert "is starting" not in done.stdout
    assert not (state / "logs").exists(), "no replica process was started"


def test_the_running_stack_exports_device_gauges_and_promtool_accepts_its_metrics(tmp_path: Path) -> None:
    """Device gauges in /metrics, and the whole page (gateway, engine, device, guard... series, after a
    plain, a streamed and a refused request) passes Prometheus' own linter, `promtool check metrics`.
    The stack logs JSON with an access log: every line of the gateway's and the replica's is one object."""
    config = (
        "register_bundled: false\ndeployments:\n  - name: echo\n    engine: fake\n"
        "observability: {log_format: json, access_log: true}\n"
    )
    stack = start_stack(tmp_path, config)
    try:
        chat = {"model": "echo", "messages": [{"role": "user", "content": "hello"}]}
        plain = httpx.post(f"{stack.base_url}/v1/chat/completions", json=chat, timeout=30)
        assert plain.status_code == 200
        streamed = httpx.post(
            f"{stack.base_url}/v1/chat/completions", json={**chat, "stream": True}, timeout=30
        )
        assert streamed.status_code == 200
        refused = httpx.post(
            f"{stack.base_url}/v1/chat/completions", json={**chat, "model": "nope"}, timeout=30
        )
        assert refused.status_code == 404
        deadline = time.monotonic() + 20  # the CPU's busy share needs a first sample's quarter second
        while "lamina_device_cpu_utilization_percent{" not in (
            metrics := httpx.get(f"{stack.base_url}/metrics", timeout=10).text
        ):
            assert time.monotonic() < deadline, "no CPU utilisation gauge after 20 s"
            time.sleep(0.2)
    finally:
        stop_stack(stack)
    checked = subprocess.run([_promtool(), "check", "metrics"], input=metrics, capture_output=True, text=True)
    assert checked.returncode == 0 and not checked.stdout.strip(), checked.stdout + checked.stderr
    samples = {
        (s.name, s.labels.get("node")): s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
    }
    node = socket.gethostname()
    assert samples[("lamina_device_memory_total_bytes", node)] == psutil.virtual_memory().total
    assert samples[("lamina_device_cpu_usable_cores", node)] >= 1
    assert 0 <= samples[("lamina_device_cpu_utilization_percent", node)] <= 100
    logged = [json.loads(line) for line in stack.log().splitlines() if line.strip()]  # each line is JSON
    access = [line for line in logged if line["logger"] == "lamina.access"]
    assert [a["status"] for a in access] == [200, 200, 404]
    assert access[0]["trace_id"] == plain.headers["x-lamina-trace-id"] and access[0]["model"] == "echo"
    assert any(line["message"].startswith("Lamina is starting at") for line in logged)  # the banner too
    replica = [line for f in (stack.state_dir / "logs").glob("*.log") for line in f.read_text().splitlines()]
    assert replica and all(json.loads(line)["level"] for line in replica if line.strip())


def test_the_listing_shows_each_gpu_reading(capsys: pytest.CaptureFixture[str]) -> None:
    """The table a GPU machine prints, from a hand-built inventory (this machine may have no GPU)."""
    gpu = GPUInfo(
        0,
        "NVIDIA H100 80GB HBM3",
        "GPU-aaaa",
        80 * 1024**3,
        2 * 1024**3,
        37.0,
        41.0,
        250.0,
        700.0,
        processes=(GPUProcess(4242, 1024**3),),
        links=(GPULink("pcie", generation=5, width=16), GPULink("nvlink", link=0)),
    )
    cpu = CPUInfo("AMD EPYC 9654", 96, 192, tuple(range(8)), 4)
    print_node(NodeInventory("gpu-host", cpu, 512 * 1024**3, 500 * 1024**3, (gpu,), "570.124.06"))
    out = capsys.readouterr().out
    assert "may use CPUs 0-7 (4 physical cores)" in out
    for text in ("NVIDIA H100", "GPU-aaaa", "2.00 GiB / 80.00 GiB", "37%", "41 C", "250 W / 700 W", "4242"):
        assert text in out
    assert "PCIe gen5 x16, NVLink x1" in out and "driver 570.124.06" in out


def _promtool() -> str:
    """Debian's `promtool` (package prometheus; .ci/run installs it); skipped where it is missing, except
    in CI, where its absence is a failure."""
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: apt-get install prometheus (.ci/run does)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return found
