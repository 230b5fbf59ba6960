"""A uvicorn app for the replica HTTP client's tests (tests/integration/test_http1.py).

POST /json     200, the JSON body back under "got" with the request's X-Test header and the server's pid;
               with "die": true, os._exit before answering (a request that crashes its replica)
POST /stream   200, chunked: the body's "chunks" as lines, "delay_s" apart; "die_after" chunks then os._exit
POST /status   the body's "status" with an error body
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


async def echo(request: Request) -> Response:
    body = await request.json()
    if isinstance(body, dict) and body.get("die"):
        os._exit(3)
    return JSONResponse({"got": body, "x_test": request.headers.get("x-test"), "pid": os.getpid()})


async def stream(request: Request) -> Response:
    body = await request.json()

    async def lines() -> AsyncIterator[bytes]:
        for i, chunk in enumerate(body["chunks"]):
            if i == body.get("die_after", -1):
                os._exit(3)
            yield (json.dumps(chunk) + "\n").encode()
            await asyncio.sleep(body.get("delay_s", 0))

    return StreamingResponse(lines(), media_type="text/plain")


async def status(request: Request) -> Response:
    body = await request.json()
    return JSONResponse({"error": {"message": "asked for"}}, status_code=int(body["status"]))


app = Starlette(
    routes=[
        Route("/json", echo, methods=["POST"]),
        Route("/stream", stream, methods=["POST"]),
        Route("/status", status, methods=["POST"]),
    ]
)
