"""A throwaway redis-server for tests: its own free port and directory, no persistence, stopped at the end.

Skips the test when the binary is missing, except in CI (``CI=true``), where that is a failure: .ci/run
installs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.support.processes import free_port


@dataclass(frozen=True)
class RedisServer:
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=0, decode_responses=True)


def redis_binary() -> str:
    """The redis-server binary; skips the test (fails it in CI) when there is none."""
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not installed; `apt-get install redis-server` runs the Redis tests"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message} (.ci/run installs it in CI)")
        pytest.skip(message)
    return binary


@contextmanager
def running_redis(directory: Path, timeout_s: float = 20.0) -> Iterator[RedisServer]:
    """A redis-server on 127.0.0.1 and a free port, answering PING, until the block ends."""
    binary = redis_binary()
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)]
    cmd += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
    with (directory / "redis.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    server = RedisServer(port, proc)
    try:
        _wait_ready(server, directory, timeout_s)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(server: RedisServer, directory: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with server.client() as client:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                log = (directory / "redis.log").read_text(errors="replace")
                raise RuntimeError(f"redis-server exited with {server.proc.returncode}:\n{log}")
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
    raise RuntimeError(f"redis-server on port {server.port} not answering after {timeout_s} s")
