"""The admin API's deployments: deploy, list and undeploy models while the stack runs (``lamina deploy``).

``POST /admin/v1/deployments`` validates the request (the registry lookup, the engine's options, the
will-it-fit check, all before anything starts), stores the deployment so that a restart restores it,
starts its replicas and adds it to the catalog; clients may call it once a replica is ready.
``GET /admin/v1/deployments`` lists every deployment, the config's and the run-time ones, with desired
and ready replicas, a state, and the autoscaler's last decision and its reason. ``DELETE
/admin/v1/deployments/NAME`` stops routing to it, lets in-flight requests finish (up to a grace period),
stops its replicas and forgets it. ``POST /admin/v1/deployments/NAME/rollout`` rolls a new model version
out to it (rolling, or a canary with a traffic weight and an automatic rollback), and ``.../promote`` and
``.../rollback`` finish a canary.

The gateway does not know how deployments are made: it talks to a :class:`DeploymentManager`, which the
composition root implements over the registry, the controller, the catalog and the metadata store.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Protocol

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lamina.application._bounds import DEFAULT_LIMITS, read_body
from lamina.application._requests import parse_body
from lamina.config import engine_blocks

DEPLOYMENTS_PATH = "/admin/v1/deployments"

#: a deployment name: what clients send as ``model``, and a file name under the state directory
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_RANGE = re.compile(r"^\s*(\d+)\s*\.\.\s*(\d+)\s*$")


def parse_replicas(value: str | int) -> tuple[int, int]:
    """``"MIN..MAX"`` (autoscaled between the two) or ``N`` (fixed) as ``(min, max)``; ValueError says why."""
    if isinstance(value, int) or value.strip().isdigit():
        n = int(value)
        if n < 1:
            raise ValueError(f"a fixed replica count must be 1 or more, not {n}; `0..N` scales to zero")
        return n, n
    match = _RANGE.match(value)
    if match is None:
        raise ValueError(f"replicas must be N or MIN..MAX (e.g. 3 or 1..4), not {value!r}")
    low, high = int(match[1]), int(match[2])
    if high < 1 or low > high:
        raise ValueError(f"replicas {value!r}: MAX must be at least 1 and at least MIN")
    return low, high


class DeployRequest(BaseModel):
    """The body of ``POST /admin/v1/deployments``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=300, description="Registry reference NAME[@VERSION|@ALIAS].")
    name: str | None = Field(
        None, description="The name clients ask for (default: the model's name without its @version)."
    )
    replicas: str | int = Field(
        1, description="N (fixed) or MIN..MAX (autoscaled on in-flight requests; MIN 0 scales to zero)."
    )
    target_concurrency: float = Field(
        2.0, gt=0, le=10_000, description="Requests in flight per replica the autoscaler aims at."
    )
    engine: str | None = Field(None, description="Engine plugin (default: the one for the file's format).")
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Engine options by engine name, e.g. {fake: {n_ctx: 512}}."
    )
    window_s: float | None = Field(None, ge=0, le=3600, description="Seconds the load is averaged over.")
    upscale_delay_s: float | None = Field(None, ge=0, le=3600, description="Need held before scaling up.")
    downscale_delay_s: float | None = Field(None, ge=0, le=86400, description="Sustained slack before down.")
    idle_delay_s: float | None = Field(None, ge=0, le=86400, description="Idle time before zero.")
    cold_start_budget_s: float | None = Field(
        None, gt=0, le=3600, description="How long a request at zero replicas waits for one."
    )

    @field_validator("replicas")
    @classmethod
    def _replicas(cls, value: str | int) -> str | int:
        parse_replicas(value)
        return value

    _options = field_validator("options", mode="before")(engine_blocks)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not _NAME.match(value):
            raise ValueError(
                f"{value!r} is not a deployment name: use letters, digits, '.', '_' and '-' (at most 100), "
                "starting with a letter or digit"
            )
        return value

    @property
    def deployment_name(self) -> str:
        return self.name or self.model.partition("@")[0]

    @property
    def replica_range(self) -> tuple[int, int]:
        return parse_replicas(self.replicas)

    def timings(self) -> dict[str, float]:
        """The autoscaler settings given (the others keep their defaults)."""
        names = ("window_s", "upscale_delay_s", "downscale_delay_s", "idle_delay_s", "cold_start_budget_s")
        return {n: float(v) for n in names if (v := getattr(self, n)) is not None}


class RolloutRequest(BaseModel):
    """The body of ``POST /admin/v1/deployments/NAME/rollout``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=300, description="The new version: NAME@VERSION or @ALIAS.")
    strategy: Literal["rolling", "canary"] = Field("rolling", description="Replace one by one, or a canary.")
    weight: int = Field(10, ge=1, le=99, description="A canary's share of the requests, in percent.")
    options: dict[str, dict[str, Any]] | None = Field(
        None, description="The new version's engine options (default: the deployment's)."
    )
    auto_rollback: bool = Field(True, description="Roll a canary back when it answers worse than stable.")
    _options = field_validator("options", mode="before")(engine_blocks)
    window_s: float = Field(60.0, gt=0, le=3600, description="Seconds of answers the groups are compared on.")
    min_requests: int = Field(20, ge=1, le=100_000, description="Answers per group before judging.")
    max_error_rate_increase: float = Field(
        0.05, ge=0, le=1, description="Error-rate margin (0.05: 5 points)."
    )
    max_latency_ratio: float = Field(2.0, gt=1, le=100, description="p95 latency margin (2: twice stable's).")
    promote_after_s: float | None = Field(
        None, gt=0, le=86400, description="Promote after this long healthy."
    )

    def policy(self) -> dict[str, float] | None:
        """The automatic rollback's settings (None: none; a rolling rollout has no canary to judge)."""
        if not self.auto_rollback or self.strategy != "canary":
            return None
        names = (
            "window_s",
            "min_requests",
            "max_error_rate_increase",
            "max_latency_ratio",
            "promote_after_s",
        )
        return {n: v for n in names if (v := getattr(self, n)) is not None}


class DeploymentManager(Protocol):
    """What the admin routes need to manage deployments; the composition root implements it.

    Failures are LaminaErrors: a bad request (unknown model or engine, options, a deployment that does not
    fit) is a 400 or 404 that says what to change, a name in use a 409, an unknown name a 404.
    """

    async def deploy(self, request: DeployRequest) -> dict[str, Any]:
        """Validate, store and start the deployment; its description (as in ``list``)."""
        ...

    def list(self) -> list[dict[str, Any]]:
        """Every deployment, by name: source, model, replicas desired and ready, state, autoscaler."""
        ...

    async def undeploy(self, name: str) -> dict[str, Any]:
        """Stop routing to it, drain, stop its replicas, forget it; what was done."""
        ...

    async def rollout(
        self,
        name: str,
        model: str,
        strategy: str,
        weight: int,
        policy: dict[str, float] | None,
        options: dict[str, dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Start rolling ``model`` out to deployment ``name`` (``policy``: the canary's automatic
        rollback, see ``RolloutRequest.policy``); its description."""
        ...

    async def finish_rollout(self, name: str, action: Literal["promote", "rollback"]) -> dict[str, Any]:
        """Promote a canary, or roll the rollout back; the deployment's description."""
        ...


def deployments_router(
    manager: DeploymentManager,
    authenticate: Callable[[Request], Awaitable[None]],
    max_body_bytes: int = DEFAULT_LIMITS.max_body_bytes,
) -> APIRouter:
    """``/admin/v1/deployments``: deploy, list, undeploy; behind the gateway's admin key check."""
    router = APIRouter(prefix=DEPLOYMENTS_PATH, dependencies=[Depends(authenticate)])

    @router.post("", status_code=201)
    async def deploy(request: Request) -> Response:
        _, body = parse_body(await read_body(request, max_body_bytes), DeployRequest)
        described = await manager.deploy(body)
        url = f"{DEPLOYMENTS_PATH}/{described['name']}"
        return JSONResponse(described, status_code=201, headers={"Location": url})

    @router.get("")
    async def list_deployments() -> Response:
        return JSONResponse({"object": "list", "data": manager.list()})

    @router.delete("/{name}")
    async def undeploy(name: str) -> Response:
        return JSONResponse(await manager.undeploy(name))

    @router.post("/{name}/rollout")
    async def rollout(name: str, request: Request) -> Response:
        _, body = parse_body(await read_body(request, max_body_bytes), RolloutRequest)
        described = await manager.rollout(
            name, body.model, body.strategy, body.weight, body.policy(), body.options
        )
        return JSONResponse(described, status_code=202)

    @router.post("/{name}/promote")
    async def promote(name: str) -> Response:
        return JSONResponse(await manager.finish_rollout(name, "promote"))

    @router.post("/{name}/rollback")
    async def rollback(name: str) -> Response:
        return JSONResponse(await manager.finish_rollout(name, "rollback"))

    return router
