"""Real processes for end-to-end tests: a free port, a `lamina up` started and stopped."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from lamina.orchestration import WorkloadSpec

#: A tiny HTTP workload for orchestration tests (a stand-in replica: health, echo, crash on demand).
ECHO_SERVER = Path(__file__).resolve().parent / "workloads" / "echo_server.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningStack:
    """A real `lamina up` process started by a test."""

    proc: subprocess.Popen[bytes]
    base_url: str
    state_dir: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def workers(self) -> list[psutil.Process]:
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [c for c in children if "lamina.models._worker" in " ".join(c.cmdline())]

    def workers_of(self, deployment: str) -> list[psutil.Process]:
        return [w for w in self.workers() if f"{deployment}.json" in " ".join(w.cmdline())]


def run_python(script: str, timeout_s: float = 120.0) -> str:
    """Run ``script`` in a fresh interpreter (``python -c``); return its output once it has succeeded."""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, done.stderr
    return done.stdout


def start_stack(tmp: Path, config_text: str | None = None, timeout_s: float = 240.0) -> RunningStack:
    """`lamina up` on a free port, returned once /readyz answers 200."""
    state = tmp / "state"
    port = free_port()
    cmd = [sys.executable, "-m", "lamina.cli", "up", "--state-dir", str(state), "--port", str(port)]
    if config_text is not None:
        cfg = tmp / "lamina.yaml"
        cfg.write_text(config_text)
        cmd += ["--config", str(cfg)]
    log_path = tmp / "lamina-up.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    stack = RunningStack(proc, f"http://127.0.0.1:{port}", state, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lamina up exited with {proc.returncode}:\n{stack.log()}")
        try:
            if httpx.get(f"{stack.base_url}/readyz", timeout=2).status_code == 200:
                return stack
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    stop_stack(stack)
    raise RuntimeError(f"lamina up not ready after {timeout_s} s:\n{stack.log()}")


def stop_stack(stack: RunningStack, timeout_s: float = 30.0) -> list[psutil.Process]:
    """SIGTERM the stack; return the processes it started that are still alive afterwards."""
    try:
        started = psutil.Process(stack.proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        started = []
    stack.proc.send_signal(signal.SIGTERM)
    try:
        stack.proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        stack.proc.kill()
        stack.proc.wait()
    _gone, alive = psutil.wait_procs(started, timeout=10)
    for p in alive:
        p.kill()
    return alive


def echo_spec(
    name: str = "echo", replicas: int = 1, env: dict[str, str] | None = None, **kw: Any
) -> WorkloadSpec:
    """A workload of ``replicas`` echo servers (``env`` steers them: ECHO_DELAY_S, ECHO_CRASH_EXIT, ...)."""
    argv = (sys.executable, str(ECHO_SERVER))
    return WorkloadSpec(name=name, argv=argv, replicas=replicas, env=env or {}, **kw)
