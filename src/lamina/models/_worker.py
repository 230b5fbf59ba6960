"""The replica worker process: one engine served over HTTP on loopback.

    LAMINA_REPLICA_SECRET=... python -m lamina.models._worker [--host 127.0.0.1] [--port 0] --spec SPEC.json

Orchestration starts it from a generic workload spec (see ``lamina.models._deploy``) and only knows that
``GET /health`` answers 200 once it is ready. It follows orchestration's handshake: it binds a port of its
own choosing (``--port 0``, the default), reports the number on the pipe named by
``LAMINA_REPLICA_PORT_FD`` (or only logs it, when started by hand), and refuses any request without the
secret from ``LAMINA_REPLICA_SECRET`` or addressed to a Host other than loopback (``_worker_guard``). The
process checks its model file and its companion files
(tokenizer, external data) against the registry's sha256 (exit 3 on a mismatch), starts the HTTP server,
then loads the engine on the engine thread, so that health answers 503 "loading" meanwhile. A failed load
exits non-zero and the controller restarts it; SIGTERM stops it cleanly with exit 0. The spec also carries
the deployment's replica settings: the micro-batching policy of embedding requests and the engine watchdog
(seconds without step progress before health answers 503, so that the controller replaces the replica).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import cast

import uvicorn

from lamina.errors import ConfigError
from lamina.logs import UVICORN_LOGGING, configure_logging
from lamina.models._checksums import file_problem, remedy_for
from lamina.models._deploy import WorkerSpec
from lamina.models._engine import BatchingEngine, Capability, load_engine
from lamina.models._microbatch import BatchPolicy
from lamina.models._worker_app import Replica, WorkerApp
from lamina.models._worker_guard import gated
from lamina.models._worker_stream import EngineRunner
from lamina.orchestration import PORT_FD_ENV, SECRET_ENV, report_port

log = logging.getLogger("lamina.models.worker")

#: exit status for a model or companion file whose bytes no longer match the registry's checksum
EXIT_CHECKSUM_MISMATCH = 3
EXIT_LOAD_FAILED = 1
EXIT_BAD_SPEC = 2
#: how long a stopping worker waits for the engine thread to let go of the current request
STOP_GRACE_S = 5.0


def checksum_problem(spec: WorkerSpec) -> str | None:
    """Why the files must not be loaded, or None: a model or companion file whose sha256 no longer matches
    the registry's record (or that went missing) is refused."""
    owner = repr(spec.model_version or spec.served_name)
    remedy = remedy_for(spec.model_version) if spec.model_version else "register the model again"
    for file in spec.recorded_files():
        problem = file_problem(file, owner, remedy)
        if problem is not None:
            return problem
    return None


def batch_policy(spec: WorkerSpec) -> BatchPolicy:
    """The deployment's micro-batching settings as the replica's policy (the config counts milliseconds)."""
    return BatchPolicy(window_s=spec.batching.window_ms / 1000.0, max_texts=spec.batching.max_texts)


class _Server(uvicorn.Server):
    """uvicorn, telling the engine thread to abandon its work as soon as a stop signal arrives.

    Without this, a long stream would hold the graceful shutdown until its timeout and then be cancelled
    mid-write; with it, the current request ends at its next token (streams get an error event, waiting
    requests a 503 the gateway retries elsewhere) and the process exits promptly.
    """

    def __init__(self, config: uvicorn.Config, runner: EngineRunner) -> None:
        super().__init__(config)
        self._runner = runner

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._runner.closing = True
        super().handle_exit(sig, frame)


class Worker:
    """The process: HTTP server on the main thread, engine load and requests on the engine thread."""

    def __init__(
        self, spec: WorkerSpec, sock: socket.socket, secret: str | None, allow_hosts: Sequence[str] = ()
    ) -> None:
        self.spec = spec
        self.sock = sock
        runner = EngineRunner(gather_s=spec.batching.gather_ms / 1000.0)
        self.replica = Replica(spec.served_name, spec.model_version, runner)
        self.failed = False
        self.app = WorkerApp(self.replica, batching=batch_policy(spec), watchdog_s=spec.watchdog_s)
        app = gated(self.app.starlette(on_startup=self._start_loading), secret or None, allow_hosts)
        host, port = sock.getsockname()[:2]
        config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=5, **UVICORN_LOGGING)
        self.server = _Server(config, self.replica.runner)

    def _start_loading(self) -> None:
        self.replica.runner.post(self._load)

    def _load(self) -> None:
        """On the engine thread, so that the engine is built on the thread that will run it."""
        try:
            engine = load_engine(self.spec.engine, self.spec.load_spec())
            info = engine.info()
        except Exception as exc:
            log.error("replica of %r failed to load its engine: %s", self.spec.served_name, exc)
            self.failed = True
            self.server.should_exit = True
            return
        if Capability.BATCHING in info.capabilities:
            self.replica.runner.attach(cast(BatchingEngine, engine))
        self.replica.engine, self.replica.info = engine, info
        log.info("replica of %r ready: %s on %s", self.spec.served_name, info.engine, info.device)

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT or a failed load; 0 after a clean stop."""
        self._quiet_signals()
        self.server.run(sockets=[self.sock])
        stopped = self.replica.runner.close(STOP_GRACE_S)
        if not stopped:
            # the engine is still inside native code; leaving now beats hanging or crashing in teardown
            log.warning("engine did not stop within %.0fs; exiting without closing it", STOP_GRACE_S)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_LOAD_FAILED if self.failed else 0)
        if self.replica.engine is not None:
            self.replica.engine.close()
        return EXIT_LOAD_FAILED if self.failed else 0

    @staticmethod
    def _quiet_signals() -> None:
        """uvicorn re-raises the stopping signal once it has shut down; this makes that a no-op, so a
        SIGTERM ends in the clean exit 0 of :meth:`run` instead of death by signal."""

        def ignore(signum: int, frame: FrameType | None) -> None:
            return None

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, ignore)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``; port 0 lets the kernel pick a free one (no race for it)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lamina.models._worker", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind (loopback by default).")
    parser.add_argument(
        "--port", type=int, default=0, help="TCP port to serve on; 0 (default): any free one."
    )
    parser.add_argument("--spec", type=Path, required=True, help="WorkerSpec JSON file.")
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="A Host name to answer besides 127.0.0.1 and localhost (a pod's, behind a Service).",
    )
    parser.add_argument(
        "--no-secret",
        action="store_true",
        help=f"Serve without a secret ({SECRET_ENV} unset): anyone on this machine may call it. For a "
        "worker run by hand or by a test, never for one behind the gateway.",
    )
    args = parser.parse_args(argv)
    # this process's own configuration (its entry point), read once; not inherited by what it starts
    secret, report_fd = os.environ.pop(SECRET_ENV, ""), os.environ.pop(PORT_FD_ENV, None)
    try:
        spec = WorkerSpec.read(args.spec)
    except ConfigError as exc:
        print(f"error [{exc.code}]: {exc.message}", file=sys.stderr)
        return EXIT_BAD_SPEC
    problem = checksum_problem(spec)
    if problem is not None:
        print(f"error [checksum_mismatch]: {problem}", file=sys.stderr)
        return EXIT_CHECKSUM_MISMATCH
    if not secret and not args.no_secret:
        print(f"error [config_invalid]: set {SECRET_ENV} to the secret requests must carry", file=sys.stderr)
        return EXIT_BAD_SPEC
    # text, or what LAMINA_LOG_FORMAT says (``lamina up`` passes its own on); the refusals above are plain
    # lines, which the controller quotes when it reports why a replica did not start
    configure_logging()
    sock = listen(args.host, args.port)
    port = int(sock.getsockname()[1])
    log.info("replica of %r serving on %s:%d", spec.served_name, args.host, port)
    if report_fd is not None:
        report_port(int(report_fd), port)
    return Worker(spec, sock, secret or None, args.allow_host).run()


if __name__ == "__main__":
    sys.exit(main())
