"""A small OpenAI-compatible HTTP server for the ``openai`` engine's tests, run as a real process.

    python tests/support/openai_upstream.py --port PORT --key KEY

It checks ``Authorization: Bearer KEY`` (401 in OpenAI's shape otherwise) and answers chat, completions
(plain and streamed, with a usage chunk when ``stream_options.include_usage`` asks) and embeddings. The last
message's content (a completion's prompt) may steer it with directives:

    !sleep S      spend S seconds before answering (watching for the client leaving)
    !status N     answer HTTP N with an OpenAI error body (429 with ``Retry-After: 7``)
    !nousage      stream no usage chunk even when asked
    !trickle      stream 100 tokens 50 ms apart
    !midfail      stream two tokens, then an error event

``GET /stats`` says what it saw: every request body, the most requests in flight at once, how many were
abandoned by their client; ``POST /reset`` forgets it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

SCRIPT = Path(__file__).resolve()
RETRY_AFTER_S = "7"
_DIRECTIVE = re.compile(r"!(sleep|status|nousage|trickle|midfail)(?:\s+(\S+))?")


def _error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _text_of(body: dict[str, Any]) -> str:
    if isinstance(body.get("messages"), list) and body["messages"]:
        content = body["messages"][-1].get("content")
        return content if isinstance(content, str) else json.dumps(content)
    prompt = body.get("prompt", body.get("input", ""))
    return prompt if isinstance(prompt, str) else " ".join(map(str, prompt))


@dataclass
class Upstream:
    key: str
    seen: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    abandoned: int = 0

    def app(self) -> Starlette:
        routes = [
            Route("/v1/chat/completions", self.generate, methods=["POST"]),
            Route("/v1/completions", self.generate, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            Route("/stats", self.stats, methods=["GET"]),
            Route("/reset", self.reset, methods=["POST"]),
        ]
        return Starlette(routes=routes)

    async def stats(self, request: Request) -> Response:
        return JSONResponse(
            {
                "seen": self.seen,
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "abandoned": self.abandoned,
            }
        )

    async def reset(self, request: Request) -> Response:
        self.seen, self.max_in_flight, self.abandoned = [], self.in_flight, 0
        return JSONResponse({})

    def _enter(self) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    async def _admit(self, request: Request) -> tuple[dict[str, Any], dict[str, str]] | Response:
        if request.headers.get("authorization") != f"Bearer {self.key}":
            return _error(401, "Incorrect API key provided: sk-wr***ng.", "invalid_api_key")
        body = await request.json()
        self.seen.append({"path": request.url.path, "body": body, "headers": dict(request.headers)})
        directives = {m.group(1): m.group(2) or "" for m in _DIRECTIVE.finditer(_text_of(body))}
        if "status" in directives:
            status = int(directives["status"])
            headers = {"Retry-After": RETRY_AFTER_S} if status == 429 else None
            return _error(status, f"upstream says {status}", f"http_{status}", headers)
        return body, directives

    async def _sleep(self, request: Request, seconds: float) -> bool:
        """False when the client left meanwhile."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if await request.is_disconnected():
                self.abandoned += 1
                return False
            await asyncio.sleep(0.01)
        return True

    async def generate(self, request: Request) -> Response:
        admitted = await self._admit(request)
        if isinstance(admitted, Response):
            return admitted
        body, directives = admitted
        chat = request.url.path.endswith("/chat/completions")
        self._enter()
        try:
            if not await self._sleep(request, float(directives.get("sleep") or 0)):
                return Response(status_code=499)
        finally:
            self.in_flight -= 1
        if body.get("stream"):
            return StreamingResponse(self._events(body, directives, chat), media_type="text/event-stream")
        return JSONResponse(self._answer(body, chat))

    def _answer(self, body: dict[str, Any], chat: bool) -> dict[str, Any]:
        text = "echo: " + _text_of(body)
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        base = {"id": "up-1", "created": 1700000000, "model": body["model"], "usage": usage}
        if not chat:
            choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
            return {**base, "object": "text_completion", "choices": [choice]}
        message: dict[str, Any] = {"role": "assistant", "content": text}
        reason = "stop"
        if body.get("tools"):
            name = body["tools"][0]["function"]["name"]
            call = {"id": "call_1", "type": "function", "function": {"name": name, "arguments": "{}"}}
            message, reason = {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
        choice = {"index": 0, "message": message, "finish_reason": reason, "logprobs": None}
        return {**base, "object": "chat.completion", "choices": [choice]}

    async def _events(
        self, body: dict[str, Any], directives: dict[str, str], chat: bool
    ) -> AsyncIterator[bytes]:
        tokens = [f" t{i}" for i in range(100)] if "trickle" in directives else ["echo", ":", " hi"]
        base = {"id": "up-2", "created": 1700000000, "model": body["model"]}
        obj = "chat.completion.chunk" if chat else "text_completion"
        done = False
        self._enter()
        try:
            for i, token in enumerate(tokens):
                part = {"delta": {"content": token}} if chat else {"text": token}
                reason = "stop" if i == len(tokens) - 1 else None
                choice = {"index": 0, **part, "finish_reason": reason}
                yield _sse({**base, "object": obj, "choices": [choice]})
                if "midfail" in directives and i == 1:
                    yield _sse({"error": {"message": "the model fell over", "type": "server_error"}})
                    done = True
                    return
                if "trickle" in directives:
                    await asyncio.sleep(0.05)
            asked = (body.get("stream_options") or {}).get("include_usage")
            if asked and "nousage" not in directives:
                usage = {
                    "prompt_tokens": 4,
                    "completion_tokens": len(tokens),
                    "total_tokens": 4 + len(tokens),
                }
                yield _sse({**base, "object": obj, "choices": [], "usage": usage})
            yield b"data: [DONE]\n\n"
            done = True
        finally:
            self.in_flight -= 1
            if not done:
                self.abandoned += 1

    async def embeddings(self, request: Request) -> Response:
        admitted = await self._admit(request)
        if isinstance(admitted, Response):
            return admitted
        body, _ = admitted
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [
            {"object": "embedding", "index": i, "embedding": [float(len(t)), 1.0, 0.0, 0.5]}
            for i, t in enumerate(texts)
        ]
        tokens = sum(len(t.split()) for t in texts)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse({"object": "list", "data": data, "model": body["model"], "usage": usage})


def _sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


@dataclass
class RunningUpstream:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def stats(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/stats", timeout=5).json())

    def reset(self) -> None:
        httpx.post(f"{self.url}/reset", timeout=5).raise_for_status()


def start_upstream(port: int, key: str, log_path: Path, timeout_s: float = 30.0) -> RunningUpstream:
    """The server as a process on ``port``, returned once it answers."""
    with log_path.open("wb") as log:
        cmd = [sys.executable, str(SCRIPT), "--port", str(port), "--key", key]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    upstream = RunningUpstream(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the upstream exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            upstream.stats()
            return upstream
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"the upstream did not answer within {timeout_s} s:\n{log_path.read_text()}")


@dataclass
class RunningWorker:
    """A replica worker process (``python -m lamina.models._worker``) on a WorkerSpec."""

    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_worker(
    spec: dict[str, Any], port: int, log_path: Path, env: dict[str, str], wait_s: float | None = 60.0
) -> RunningWorker:
    """A worker on ``spec`` with environment ``env``; once /health answers 200 unless ``wait_s`` is None."""
    spec_path = log_path.with_suffix(".json")
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "lamina.models._worker", "--port", str(port), "--spec", str(spec_path)]
    cmd.append("--no-secret")  # the tests talk to the worker directly
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    worker = RunningWorker(proc, f"http://127.0.0.1:{port}", log_path)
    if wait_s is None:
        return worker
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited with {proc.returncode}:\n{worker.log()}")
        try:
            if httpx.get(f"{worker.url}/health", timeout=5).status_code == 200:
                return worker
        except httpx.TransportError:
            pass
        time.sleep(0.02)
    proc.kill()
    raise RuntimeError(f"the worker was not ready within {wait_s} s:\n{worker.log()}")


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    uvicorn.run(Upstream(args.key).app(), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
