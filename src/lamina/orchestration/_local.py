"""Where replicas run: the backend interface, and replicas as local processes (one ``subprocess.Popen``
per replica, serving HTTP on a free loopback port).

Each child runs in its own session (so a Ctrl-C in the gateway's terminal reaches the gateway only, and
the gateway stops its replicas in order) and is asked by the kernel to die with the gateway: Linux's
``PR_SET_PDEATHSIG`` (set by the child itself, see ``_trampoline``) sends it SIGTERM when the thread that
started it exits. That is why ``start`` must be
called from a long-lived thread (the event loop's), never from a short-lived worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lamina.orchestration._workload import WorkloadSpec

#: bytes read from the end of a log to find its last lines
_TAIL_BYTES = 64 * 1024


class ReplicaHandle(Protocol):
    """What the controller reads of a started replica, whatever the backend."""

    @property
    def replica_id(self) -> str: ...
    @property
    def pid(self) -> int | None: ...
    @property
    def url(self) -> str: ...
    @property
    def log_path(self) -> Path | None: ...


class ReplicaBackend(Protocol):
    """Where replicas run (local processes today). ``handle`` is always what this backend's ``start``
    returned, hence typed loosely here."""

    def start(self, spec: WorkloadSpec, replica_id: str) -> ReplicaHandle: ...
    def poll(self, handle: Any) -> int | None: ...
    def stop(self, handle: Any, grace_s: float = 5.0) -> int | None: ...
    def tail_log(self, handle: Any, lines: int = 20) -> str: ...


@dataclass(frozen=True)
class ProcessHandle:
    """One started replica process."""

    replica_id: str
    process: subprocess.Popen[bytes]
    port: int
    url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now.

    Another process may take it before the replica binds it; the replica then fails at start and the
    controller restarts it on a fresh port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent(argv: list[str]) -> list[str]:
    """``argv`` behind the trampoline that makes it die with this process (Linux; elsewhere unchanged)."""
    if shutil.which(argv[0]) is None:  # fail here, as Popen would, not later inside the trampoline
        raise FileNotFoundError(errno.ENOENT, "no such executable", argv[0])
    if not sys.platform.startswith("linux"):
        return argv
    return [sys.executable, "-m", "lamina.orchestration._trampoline", str(os.getpid()), "--", *argv]


class LocalProcessBackend:
    """Starts, polls and stops replica processes on this machine; logs go to ``log_dir/<replica>.log``."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir

    def log_path(self, replica_id: str) -> Path:
        return self._log_dir / f"{replica_id}.log"

    def start(self, spec: WorkloadSpec, replica_id: str) -> ProcessHandle:
        """Start one replica of ``spec``; ``{port}`` in its argv becomes the port chosen for it.

        Raises OSError when the process cannot be started (missing executable, unwritable log dir).
        """
        self._log_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        argv = [arg.replace("{port}", str(port)) for arg in spec.argv]
        log_path = self.log_path(replica_id)
        with log_path.open("ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"--- lamina {stamp}: starting {replica_id}: {' '.join(argv)}\n".encode())
            log.flush()
            process = subprocess.Popen(
                _die_with_parent(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **spec.env},
                start_new_session=True,
            )
        return ProcessHandle(replica_id, process, port, f"http://127.0.0.1:{port}", log_path)

    def poll(self, handle: ProcessHandle) -> int | None:
        """The exit code once the process has exited (negative: killed by that signal), else None."""
        return handle.process.poll()

    def stop(self, handle: ProcessHandle, grace_s: float = 5.0) -> int | None:
        """SIGTERM the replica's process group, wait up to ``grace_s``, then SIGKILL it.

        Blocks up to ``grace_s`` (call it from a thread in async code). Never raises for a process that
        is already gone; returns its exit code.
        """
        process = handle.process
        if process.poll() is not None:
            return process.returncode
        self._signal(process, signal.SIGTERM)
        try:
            return process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self._signal(process, signal.SIGKILL)
            return process.wait()

    @staticmethod
    def _signal(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        """Signal the replica's whole process group (it leads its own session), or it alone."""
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)

    def tail_log(self, handle: ProcessHandle, lines: int = 20) -> str:
        """The last ``lines`` lines of the replica's log, for error messages ('' if there is none)."""
        try:
            with handle.log_path.open("rb") as log:
                size = log.seek(0, os.SEEK_END)
                log.seek(max(size - _TAIL_BYTES, 0))
                data = log.read()
        except OSError:
            return ""
        text = data.decode("utf-8", errors="replace").rstrip("\n")
        return "\n".join(text.splitlines()[-lines:])
