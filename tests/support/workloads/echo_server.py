"""A tiny replica workload for orchestration tests: a real HTTP server on 127.0.0.1 (stdlib only).

    python echo_server.py [--port PORT]

It follows orchestration's handshake (``lamina.orchestration._handshake``) on its own, from the contract
alone: it binds port 0 (unless told a port), reports it as ``{"port": N}`` on the file descriptor named by
LAMINA_REPLICA_PORT_FD, and when LAMINA_REPLICA_SECRET is set answers 401 to every request without it in
the X-Lamina-Replica-Secret header.

GET /health     200 {"pid": ...} once ready; 503 while "loading"
POST /echo      200 {"body": <the JSON body>, "pid": ...}
POST /stream    200, chunked: one line per item of the body's "chunks" list
POST /status/N  answers HTTP N (an error the replica itself sends)

Environment:
ECHO_CRASH_EXIT=N         print a message and exit with code N at start
ECHO_UNHEALTHY_CHECKS=N   answer 503 to the first N health checks
ECHO_READY_DELAY_S=S      answer 503 to health checks for S seconds after start
ECHO_STUCK_FILE=PATH      answer 503 {"status": "stuck"} to health checks while PATH exists
ECHO_DELAY_S=S            spend S seconds on each /echo and /stream request
ECHO_CHUNK_DELAY_S=S      pause S seconds between the chunks of /stream
ECHO_CRASH_MARKER=TEXT    die at once (os._exit(13), no answer) on a POST whose body contains TEXT
ECHO_DROP_MARKER=TEXT     close the connection without an answer (and live on) on a POST containing TEXT
ECHO_REPORT=TEXT          report TEXT instead of the port (a replica that reports nonsense)
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STARTED = time.monotonic()
UNHEALTHY_CHECKS = int(os.environ.get("ECHO_UNHEALTHY_CHECKS", "0"))
READY_DELAY_S = float(os.environ.get("ECHO_READY_DELAY_S", "0"))
DELAY_S = float(os.environ.get("ECHO_DELAY_S", "0"))
CHUNK_DELAY_S = float(os.environ.get("ECHO_CHUNK_DELAY_S", "0"))
STUCK_FILE = os.environ.get("ECHO_STUCK_FILE")
CRASH_MARKER = os.environ.get("ECHO_CRASH_MARKER")
DROP_MARKER = os.environ.get("ECHO_DROP_MARKER")
SECRET = os.environ.pop("LAMINA_REPLICA_SECRET", None)
_checks = 0
_checks_lock = threading.Lock()


def _ready() -> bool:
    global _checks
    with _checks_lock:
        _checks += 1
        seen = _checks
    return seen > UNHEALTHY_CHECKS and time.monotonic() - STARTED >= READY_DELAY_S


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real replica behind a pooled client

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the replica log holds start-up and crash output only."""

    def _send_json(self, status: int, payload: object) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> object:
        length = int(self.headers.get("Content-Length", "0"))
        return json.loads(self.rfile.read(length) or b"null")

    def _refused(self) -> bool:
        """Answer 401 unless the request carries the replica's secret (when it has one)."""
        sent = self.headers.get("X-Lamina-Replica-Secret") or ""
        if SECRET is None or hmac.compare_digest(sent.encode(), SECRET.encode()):
            return False
        self._send_json(401, {"error": {"code": "invalid_api_key", "message": "no replica secret"}})
        return True

    def do_GET(self) -> None:
        if self._refused():
            return
        if self.path != "/health":
            self._send_json(404, {"error": "not found"})
        elif STUCK_FILE is not None and os.path.exists(STUCK_FILE):
            self._send_json(503, {"status": "stuck", "pid": os.getpid()})
        elif _ready():
            self._send_json(200, {"pid": os.getpid()})
        else:
            self._send_json(503, {"loading": True})

    def do_POST(self) -> None:
        if self._refused():
            return
        body = self._body()
        if CRASH_MARKER is not None and CRASH_MARKER in json.dumps(body):
            print(f"echo_server: crashing on the marker in {body}", flush=True)
            os._exit(13)
        if DROP_MARKER is not None and DROP_MARKER in json.dumps(body):
            self.close_connection = True  # no answer at all: the client sees the connection close
            return
        if self.path.startswith("/status/"):
            self._send_json(int(self.path.rsplit("/", 1)[1]), {"error": "asked for", "pid": os.getpid()})
            return
        time.sleep(DELAY_S)
        if self.path == "/echo":
            self._send_json(200, {"body": body, "pid": os.getpid()})
        elif self.path == "/stream":
            self._stream(body)
        else:
            self._send_json(404, {"error": "not found"})

    def _stream(self, body: object) -> None:
        chunks = body.get("chunks", []) if isinstance(body, dict) else []
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for item in [*chunks, f"pid {os.getpid()}"]:
            line = f"{item}\n".encode()
            self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
            self.wfile.flush()
            time.sleep(CHUNK_DELAY_S)
        self.wfile.write(b"0\r\n\r\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    crash = os.environ.get("ECHO_CRASH_EXIT")
    if crash is not None:
        print(f"echo_server: crashing on purpose with exit code {crash}", file=sys.stderr, flush=True)
        sys.exit(int(crash))
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    port = server.server_address[1]
    print(f"echo_server: pid {os.getpid()} serving on 127.0.0.1:{port}", flush=True)
    report_fd = os.environ.pop("LAMINA_REPLICA_PORT_FD", None)
    if report_fd is not None:
        report = os.environ.get("ECHO_REPORT", json.dumps({"port": port}))
        os.write(int(report_fd), (report + "\n").encode())
        os.close(int(report_fd))
    server.serve_forever()


if __name__ == "__main__":
    main()
