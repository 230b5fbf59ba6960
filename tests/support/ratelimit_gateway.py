"""A gateway on the fakes with a RateLimitPolicy: built in a test, or run as a real process.

``python -m tests.support.ratelimit_gateway --port P --limits JSON --keys JSON [--delay S]`` serves it
with uvicorn on 127.0.0.1 (``--limits``: a ``rate_limits`` config section; ``--keys``: bearer token ->
{"rpm", "tpm"}; ``--delay``: seconds the fake replica takes to answer, so calls overlap), so several
gateway processes can share one Redis without starting model replicas.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import uvicorn
from fastapi import FastAPI
from starlette.requests import Request

from lamina.application import GatewayDeps, Principal, RateLimitPolicy, create_app
from lamina.config import RateLimitsConfig
from lamina.errors import AuthenticationError
from lamina.observability import Telemetry
from tests.support.gateway import CHAT, EMBED, Dispatched, ReplayDispatcher, StaticCatalog


def principal(name: str, rpm: int | None = None, tpm: int | None = None) -> Principal:
    """A user key named ``name`` (id ``key_<name>``) with its own limits."""
    return Principal(key_id=f"key_{name}", name=name, scope="user", rpm=rpm, tpm=tpm)


class BearerPrincipals:
    """An authenticator: each bearer token is one principal; any other token is a 401."""

    def __init__(self, principals: Mapping[str, Principal]) -> None:
        self._principals = dict(principals)

    async def __call__(self, request: Request) -> Principal:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        found = self._principals.get(token.strip()) if scheme.lower() == "bearer" else None
        if found is None:
            raise AuthenticationError("unknown key; send `Authorization: Bearer <token>` with a test token")
        return found


class SlowDispatcher(ReplayDispatcher):
    """The fake replica, taking ``delay_s`` to answer a plain request."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    async def request(
        self,
        deployment: str,
        path: str,
        json_body: Mapping[str, Any],
        headers: Mapping[str, str] | None = None,
    ) -> Dispatched:
        await asyncio.sleep(self.delay_s)
        return await super().request(deployment, path, json_body, headers)


def rate_limited_app(
    policy: RateLimitPolicy,
    principals: Mapping[str, Principal],
    dispatcher: ReplayDispatcher | None = None,
    *,
    close_policy: bool = False,
) -> tuple[FastAPI, ReplayDispatcher, Telemetry]:
    """The gateway over StaticCatalog and ``dispatcher`` with ``policy`` as its only policy."""
    dispatcher = dispatcher if dispatcher is not None else ReplayDispatcher()
    telemetry = Telemetry(service_name="ratelimit-test", store=None, otlp_endpoint=None)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await policy.aclose()
        telemetry.shutdown()

    deps = GatewayDeps(
        StaticCatalog(),
        dispatcher,
        lambda: {CHAT: True, EMBED: True},
        telemetry,
        authenticator=BearerPrincipals(principals),
        policies=[policy],
    )
    return create_app(deps, lifespan=lifespan if close_policy else None), dispatcher, telemetry


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--limits", required=True, help="the rate_limits config section, as JSON")
    parser.add_argument("--keys", default="{}", help='bearer token -> {"rpm": N, "tpm": N}, as JSON')
    parser.add_argument("--delay", type=float, default=0.0, help="seconds the fake replica takes")
    args = parser.parse_args(argv)
    config = RateLimitsConfig.model_validate_json(args.limits)
    keys: dict[str, dict[str, Any]] = json.loads(args.keys)
    principals = {token: principal(token, **limits) for token, limits in keys.items()}
    policy = RateLimitPolicy(config)
    app, _, _ = rate_limited_app(policy, principals, SlowDispatcher(args.delay), close_policy=True)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
