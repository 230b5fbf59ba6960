"""Where replicas run: the backend interface, and replicas as local processes (one ``subprocess.Popen``
per replica, serving HTTP on a loopback port it binds itself and reports back; see ``_handshake``).

Each child runs in its own session (so a Ctrl-C in the gateway's terminal reaches the gateway only, and
the gateway stops its replicas in order) and is asked by the kernel to die with the gateway: Linux's
``PR_SET_PDEATHSIG`` (set by the child itself, see ``_trampoline``) sends it SIGTERM when the thread that
started it exits. That is why ``start`` must be
called from a long-lived thread (the event loop's), never from a short-lived worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lamina.logs import start_line
from lamina.orchestration._handshake import PORT_FD_ENV, SECRET_ENV, new_secret, parse_report
from lamina.orchestration._procs import signal_group, tail_lines
from lamina.orchestration._workload import WorkloadSpec

#: how stale the backend's knowledge that a replica process runs may be (``secret_for``), in seconds
LIVENESS_S = 0.1

log = logging.getLogger(__name__)

#: bytes read from the end of a log to find its last lines


class ReplicaHandle(Protocol):
    """What the controller reads of a started replica, whatever the backend. ``url`` is None until the
    replica has reported the port it bound."""

    @property
    def replica_id(self) -> str: ...
    @property
    def pid(self) -> int | None: ...
    @property
    def url(self) -> str | None: ...
    @property
    def log_path(self) -> Path | None: ...


class ReplicaBackend(Protocol):
    """Where replicas run (local processes today). ``handle`` is always what this backend's ``start``
    returned, hence typed loosely here. ``secret_for`` gives the secret of the live replica that reported
    a URL (see ``_handshake``), for the controller's health checks and the dispatcher."""

    def start(self, spec: WorkloadSpec, replica_id: str) -> ReplicaHandle: ...
    def poll(self, handle: Any) -> int | None: ...
    def stop(self, handle: Any, grace_s: float = 5.0) -> int | None: ...
    def tail_log(self, handle: Any, lines: int = 20) -> str: ...
    def secret_for(self, url: str) -> str | None: ...


@dataclass(eq=False)
class ProcessHandle:
    """One started replica process, and the read end of the pipe on which it reports its port."""

    replica_id: str
    process: subprocess.Popen[bytes]
    log_path: Path
    secret: str = field(repr=False)
    report_fd: int | None = field(default=None, repr=False)
    #: why the replica's report was refused (it then never gets a URL, and its ready timeout ends it)
    report_problem: str | None = None
    _port: int | None = field(default=None, repr=False)
    _url: str | None = field(default=None, repr=False)
    _received: bytes = field(default=b"", repr=False)
    #: when the backend last asked the OS whether the process still runs (``secret_for``)
    polled_at: float = field(default=0.0, repr=False)
    #: the report pipe is read on the event loop and closed by ``stop`` in a worker thread: without it, a
    #: read could meet a descriptor closed under it (EBADF), or reused meanwhile for another file
    _report_lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def port(self) -> int | None:
        """The port the replica reported it serves on; None until it has (reads its pipe, never blocks)."""
        if self._port is None and self.report_fd is not None:
            with self._report_lock:
                if self.report_fd is not None:  # not closed by a stop meanwhile
                    self._read_report()
        return self._port

    @property
    def url(self) -> str | None:
        if self._url is None:
            port = self.port
            self._url = None if port is None else f"http://127.0.0.1:{port}"
        return self._url

    def running(self, now: float) -> bool:
        """Whether the process still runs, as the OS said at most ``LIVENESS_S`` before ``now``."""
        process = self.process
        if process.returncode is None and now - self.polled_at >= LIVENESS_S:
            self.polled_at = now
            process.poll()
        return process.returncode is None

    def _read_report(self) -> None:
        assert self.report_fd is not None
        try:
            chunk = os.read(self.report_fd, 512)
        except BlockingIOError:
            return
        self._received += chunk
        if chunk and not chunk.endswith(b"\n") and len(self._received) < 512:
            return  # more to come
        self.close_report()
        try:
            self._port = parse_report(self._received)
        except ValueError as exc:
            # EOF without a report: the replica exited (its exit code tells the rest) or closed the pipe
            self.report_problem = f"its port report was unusable: {exc}" if self._received else None
            if self.report_problem:
                log.warning("replica %s: %s", self.replica_id, self.report_problem)

    def close_report(self) -> None:
        """Close this end of the report pipe (idempotent)."""
        with self._report_lock:
            if self.report_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self.report_fd)
                self.report_fd = None


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
        #: replicas started and not yet seen to exit, for ``secret_for``
        self._live: dict[str, ProcessHandle] = {}

    def log_path(self, replica_id: str) -> Path:
        return self._log_dir / f"{replica_id}.log"

    def start(self, spec: WorkloadSpec, replica_id: str) -> ProcessHandle:
        """Start one replica of ``spec`` with a fresh secret and a pipe to report its port on.

        Raises OSError when the process cannot be started (missing executable, unwritable log dir).
        """
        self._log_dir.mkdir(parents=True, exist_ok=True)
        argv = list(spec.argv)
        log_path = self.log_path(replica_id)
        secret = new_secret()
        read_fd, write_fd = os.pipe()
        try:
            os.set_blocking(read_fd, False)
            env = {**os.environ, **spec.env}
            with log_path.open("ab") as log_file:
                log_file.write(start_line(replica_id, argv, env))
                log_file.flush()
                process = subprocess.Popen(
                    _die_with_parent(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env={**env, SECRET_ENV: secret, PORT_FD_ENV: str(write_fd)},
                    start_new_session=True,
                    pass_fds=(write_fd,),
                )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)  # the child holds its own copy; EOF here once it closes or dies
        handle = ProcessHandle(replica_id, process, log_path, secret, read_fd)
        self._live[replica_id] = handle
        return handle

    def secret_for(self, url: str) -> str | None:
        """The secret of the running replica that reported ``url``; None when none did or it exited (seen
        within ``LIVENESS_S``: the dispatcher asks on every request, the OS is asked at most that often)."""
        now = time.monotonic()
        for handle in self._live.values():
            if handle.url == url and handle.running(now):
                return handle.secret
        return None

    def poll(self, handle: ProcessHandle) -> int | None:
        """The exit code once the process has exited (negative: killed by that signal), else None."""
        code = handle.process.poll()
        if code is not None:
            self._forget(handle)
        return code

    def _forget(self, handle: ProcessHandle) -> None:
        handle.close_report()
        if self._live.get(handle.replica_id) is handle:
            del self._live[handle.replica_id]

    def stop(self, handle: ProcessHandle, grace_s: float = 5.0) -> int | None:
        """SIGTERM the replica's process group, wait up to ``grace_s``, then SIGKILL it.

        Blocks up to ``grace_s`` (call it from a thread in async code). Never raises for a process that
        is already gone; returns its exit code.
        """
        process = handle.process
        try:
            if process.poll() is not None:
                return process.returncode
            self._signal(process, signal.SIGTERM)
            try:
                return process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._signal(process, signal.SIGKILL)
                return process.wait()
        finally:
            self._forget(handle)

    @staticmethod
    def _signal(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        """Signal the replica's whole process group (it leads its own session), or it alone."""
        signal_group(process, sig)

    def tail_log(self, handle: ProcessHandle, lines: int = 20) -> str:
        """The last ``lines`` lines of the replica's log, for error messages ('' if there is none)."""
        return tail_lines(handle.log_path, lines)
