"""The OpenAI-compatible gateway: routes a client's request to a replica of the right deployment.

Per request: authenticate, parse and validate the body (every problem is a 400 naming the field), resolve
the model (span ``route``, layer models), check that it can do what is asked, then forward the client's
own JSON, with ``model`` set to the served name, through the dispatcher (span ``dispatch``, layer
orchestration). Plain answers come back without the replica's ``lamina`` extension; streams are relayed
by :class:`~lamina.application._relay.StreamRelay`. What the replica says about its engine work becomes
the ``engine`` span.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from opentelemetry.util.types import AttributeValue
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Lifespan

from lamina.application._access import (
    LOCAL_HOSTS,
    SiteGuard,
    check_dataset,
    check_listed,
    check_model,
    visible_models,
)
from lamina.application._admin import IngestService, admin_router
from lamina.application._admin_deployments import DeploymentManager, deployments_router
from lamina.application._admin_observe import Doctor, observe_router
from lamina.application._auth import Authenticator, StaticKeys, authenticated, principal_of
from lamina.application._bounds import parse_bounded, read_body
from lamina.application._cache import ResponseCache, cache_lookup
from lamina.application._errors import install_error_handlers
from lamina.application._fallback_stream import FallbackStream, RelayFactory
from lamina.application._plain import forward_plain, unless_client_leaves
from lamina.application._policy import (
    DEFAULT_COMPLETION_RESERVE,
    Admission,
    Call,
    Policy,
    Principal,
    estimate_prompt_tokens,
)
from lamina.application._ports import Dispatcher, ModelCatalog, Readiness, Route
from lamina.application._prompts import PromptStore, parse_templated
from lamina.application._rag import (
    QuerySink,
    RagOptions,
    Retriever,
    RetrieveRequest,
    citations_event,
    citations_json,
    grounded_messages,
    last_user_text,
    retrieve_traced,
)
from lamina.application._relay import Forward, StreamRelay
from lamina.application._requests import invalid_fields
from lamina.application._routing import ModelRouter
from lamina.application._tracing import Exchange
from lamina.application._tracing_middleware import AccessLog, TelemetryMiddleware
from lamina.application.dashboard import DashboardSources, dashboard_router
from lamina.application.guards import OutputGuards
from lamina.config import RequestLimitsConfig
from lamina.data import Retrieval
from lamina.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    UnsupportedCapabilityError,
)
from lamina.models import Capability, ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ModelList
from lamina.observability import Telemetry
from lamina.store import Store

Parsed = ChatCompletionRequest | CompletionRequest | EmbeddingRequest


@dataclass(frozen=True)
class GatewayDeps:
    """What the gateway is built from; the composition root passes the real ones, a test its own."""

    catalog: ModelCatalog
    dispatcher: Dispatcher
    readiness: Readiness
    telemetry: Telemetry
    #: bearer keys accepted; empty accepts any request (local use); used when no authenticator is given
    api_keys: Sequence[str] = ()
    #: who a request comes from (keys with scopes and limits); None: StaticKeys(api_keys)
    authenticator: Authenticator | None = None
    #: checks and accounts around every model call, in order (rate limits, budgets and cost, guards)
    policies: Sequence[Policy] = ()
    #: retrieval over dataset versions (``/v1/retrieve`` and RAG); None: not configured
    retriever: Retriever | None = None
    #: model names that answer with RAG: alias -> (model it uses, retrieval options)
    rag_aliases: Mapping[str, tuple[str, RagOptions]] = field(default_factory=dict)
    #: told about every retrieval (the drift window samples the queries)
    query_sink: QuerySink | None = None
    #: ingestion through the admin API (/admin/v1); None: no admin routes
    ingest: IngestService | None = None
    #: what one request may hold (body bytes, messages, inputs, tokens...); refused before any work
    limits: RequestLimitsConfig = field(default_factory=RequestLimitsConfig)
    #: Host names the gateway answers to (``gateway_hosts`` builds them from the config); ``*``: any
    allowed_hosts: Sequence[str] = LOCAL_HOSTS
    #: web origins whose pages may call it, besides pages of its own hosts; ``*``: any
    allowed_origins: Sequence[str] = ()
    #: guards on the model's answers, plain and streamed (input guards are a policy); None: none
    output_guards: OutputGuards | None = None
    #: model groups (strategies, retries, fallbacks); None: no groups, every name is a deployment's
    router: ModelRouter | None = None
    #: the response cache (exact, and semantic if configured); None: no caching
    cache: ResponseCache | None = None
    #: prompt templates a request may name (``lamina_template``); None: requests cannot name one
    prompts: PromptStore | None = None
    #: the store whose traces /admin/v1/traces reads, and the doctor /admin/v1/doctor asks; None: no routes
    traces_store: Store | None = None
    doctor: Doctor | None = None
    #: the web dashboard at ``/`` (its pages read these ports); None: no dashboard
    dashboard: DashboardSources | None = None
    #: deployments made at run time (/admin/v1/deployments); None: no such routes
    deployments: DeploymentManager | None = None
    #: a log line (``lamina.access``) for each API request
    access_log: bool = False

    @property
    def auth(self) -> Authenticator:
        return self.authenticator if self.authenticator is not None else StaticKeys(self.api_keys)


@dataclass(frozen=True)
class _Operation:
    path: str
    #: the GenAI semantic conventions' ``gen_ai.operation.name``
    name: str
    capability: Capability
    request_type: type[Parsed]


_OPERATIONS = (
    _Operation("/v1/chat/completions", "chat", Capability.CHAT, ChatCompletionRequest),
    _Operation("/v1/completions", "text_completion", Capability.COMPLETION, CompletionRequest),
    _Operation("/v1/embeddings", "embeddings", Capability.EMBEDDING, EmbeddingRequest),
)


def create_app(deps: GatewayDeps, *, lifespan: Lifespan[FastAPI] | None = None) -> FastAPI:
    """The gateway as an ASGI app: ``/v1`` (OpenAI API), ``/healthz``, ``/readyz`` and ``/metrics``."""
    app = FastAPI(title="Lamina gateway", lifespan=lifespan)
    app.add_middleware(TelemetryMiddleware, telemetry=deps.telemetry)
    app.add_middleware(SiteGuard, hosts=deps.allowed_hosts, origins=deps.allowed_origins)
    if deps.access_log:  # the outermost: the site guard's refusals are logged too
        app.add_middleware(AccessLog)
    install_error_handlers(app)
    for op in _OPERATIONS:  # plain Starlette routes: FastAPI's request handling costs ~0.1 ms a call
        app.add_route(op.path, _endpoint(deps, op), methods=["POST"], name=op.name, include_in_schema=False)
    app.include_router(_api_router(deps))
    app.include_router(_probe_router(deps))
    if deps.ingest is not None:
        admin = authenticated(deps.auth, admin=True)
        app.include_router(admin_router(deps.ingest, admin, deps.limits.max_body_bytes))
    if deps.traces_store is not None:
        admin_only = authenticated(deps.auth, admin=True)
        app.include_router(observe_router(deps.traces_store, deps.doctor, admin_only))
    if deps.deployments is not None:  # run-time deployments: /admin/v1/deployments
        admin_deploy = authenticated(deps.auth, admin=True)
        app.include_router(deployments_router(deps.deployments, admin_deploy, deps.limits.max_body_bytes))
    if deps.dashboard is not None:
        app.include_router(dashboard_router(deps.dashboard, deps.auth, deps.limits.max_body_bytes))
    return app


def _api_router(deps: GatewayDeps) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(authenticated(deps.auth))])

    @router.get("/models")
    async def list_models(request: Request) -> Response:
        cards = visible_models(principal_of(request), deps.catalog)
        return JSONResponse(ModelList(data=cards).model_dump(mode="json"))

    @router.get("/models/{model:path}")
    async def get_model(model: str, request: Request) -> Response:
        cards = {card.id: card for card in deps.catalog.models()}
        card = cards.get(model) or cards.get(deps.catalog.resolve(model).deployment)
        if card is None:
            raise ModelNotFoundError(f"the model {model!r} does not exist; GET /v1/models lists the models")
        check_listed(principal_of(request), deps.catalog, model, card)
        return JSONResponse(card.model_dump(mode="json"))

    @router.post("/retrieve")
    async def retrieve(request: Request) -> Response:
        raw = await read_body(request, deps.limits.max_body_bytes)
        _, parsed = parse_bounded(raw, RetrieveRequest, deps.limits)
        check_dataset(principal_of(request), parsed.dataset)
        options = RagOptions(dataset=parsed.dataset, k=parsed.k, mode=parsed.mode, filters=parsed.filters)
        result = await _retrieve(deps, options, parsed.query)
        return JSONResponse(result.to_json())

    return router


async def _retrieve(deps: GatewayDeps, options: RagOptions, query: str) -> Retrieval:
    if deps.retriever is None:
        raise InvalidRequestError(
            "retrieval is not configured on this gateway; ingest a dataset with `lamina data ingest` and "
            "restart `lamina up`",
            param="dataset",
        )
    result = await retrieve_traced(deps.telemetry, deps.retriever, options, query)
    if deps.query_sink is not None:
        deps.query_sink.record(result)
    return result


async def _ground(
    deps: GatewayDeps, body: dict[str, object], parsed: Parsed, principal: Principal
) -> Retrieval | None:
    """For a chat request that asks for context: retrieve (from a dataset the key may read), and rewrite
    ``body`` in place; else None."""
    raw = body.pop("rag", None)
    alias = deps.rag_aliases.get(parsed.model)
    if raw is None and alias is None:
        return None
    if not isinstance(parsed, ChatCompletionRequest):
        raise InvalidRequestError("`rag` is supported on /v1/chat/completions only", param="rag")
    if raw is not None:
        try:
            options = RagOptions.model_validate(raw)
        except ValidationError as exc:
            raise invalid_fields([{**e, "loc": ("rag", *e["loc"])} for e in exc.errors()]) from exc
    else:
        assert alias is not None
        options = alias[1]
    check_dataset(principal, options.dataset, alias=parsed.model if raw is None else None)
    if alias is not None:
        parsed.model = body["model"] = alias[0]
    messages = body.get("messages")
    assert isinstance(messages, list)
    result = await _retrieve(deps, options, last_user_text(messages))
    body["messages"] = grounded_messages(messages, result)
    return result


def _probe_router(deps: GatewayDeps) -> APIRouter:
    router = APIRouter()

    @router.get("/healthz")
    async def healthz() -> Response:
        """200 while the process serves (liveness)."""
        return JSONResponse({"status": "ok"})

    @router.get("/readyz")
    async def readyz() -> Response:
        """200 only when every deployment has a ready replica (readiness); the body says which have."""
        deployments = dict(deps.readiness())
        ready = all(deployments.values())
        return JSONResponse({"ready": ready, "deployments": deployments}, status_code=200 if ready else 503)

    @router.get("/metrics")
    async def metrics() -> Response:
        payload, content_type = deps.telemetry.render_metrics()
        return Response(payload, media_type=content_type)

    return router


def _endpoint(deps: GatewayDeps, op: _Operation) -> Callable[[Request], Awaitable[Response]]:
    authenticate = authenticated(deps.auth)  # what the /v1 router's dependency does for its routes

    async def endpoint(request: Request) -> Response:
        began = time.time_ns()
        await authenticate(request)
        Exchange.of(request).timed("auth", began)
        return await _serve(deps, op, request)

    endpoint.__name__ = op.name
    return endpoint


async def _serve(deps: GatewayDeps, op: _Operation, request: Request) -> Response:
    exchange = Exchange.of(request)
    began = time.time_ns()
    raw = await read_body(request, deps.limits.max_body_bytes)
    body, parsed, template = await parse_templated(
        raw, op.request_type, deps.limits, deps.prompts, exchange.span
    )
    exchange.timed("parse", began)
    asked = parsed.model
    grounding = await _ground(deps, body, parsed, principal_of(request))
    exchange.describe(lambda: _request_attributes(op, parsed))  # made only if the trace is kept
    tries = None if deps.router is None else deps.router.tries(parsed.model, body, request.headers)
    route = exchange.resolve(deps.catalog, parsed.model) if tries is None else tries.route
    check_model(principal_of(request), asked, route if tries is None else tries.asked)
    _require(route, op.capability, parsed.model, "model")
    stream = not isinstance(parsed, EmbeddingRequest) and parsed.stream
    if stream:
        _require(route, Capability.STREAMING, parsed.model, "stream")
    exchange.bind(route)
    call = _call(principal_of(request), op, asked, route, {**body, "model": route.served_name}, parsed)
    call.span = exchange.span
    call.template = template
    call.timings = exchange.steps  # the policies' admissions join the trace's application steps
    extra = {} if grounding is None else {"citations": citations_json(grounding)}
    began = time.time_ns()
    cached = await cache_lookup(deps.cache, call, request.headers, grounding)
    if deps.cache is not None:
        exchange.timed("cache", began)
    if cached.entry is not None:  # a hit: no dispatch, admitted by the rate limits only (_cache.py)
        usage = not isinstance(parsed, EmbeddingRequest) and parsed.include_usage
        return await cached.replay(deps.policies, usage, extra, grounding)
    admission = await Admission.of(call, deps.policies)
    forward = Forward(route.deployment, op.path, call.body)
    if not stream:
        return await unless_client_leaves(
            request,
            exchange,
            forward_plain(
                deps.dispatcher, forward, exchange, extra, admission, deps.output_guards, tries, cached
            ),
        )
    assert not isinstance(parsed, EmbeddingRequest)
    trailer = None if grounding is None else citations_event(grounding)
    relay = StreamRelay(
        deps.dispatcher,
        forward,
        exchange,
        parsed.include_usage,
        admission,
        trailer=trailer,
        guards=deps.output_guards,
        cache=cached,
    )
    if tries is None:
        return relay
    call.headers["x-lamina-model"] = route.deployment
    return FallbackStream(tries, forward, exchange, relay, _later_relays(deps, call, exchange, relay))


def _later_relays(deps: GatewayDeps, call: Call, exchange: Exchange, first: StreamRelay) -> RelayFactory:
    """The relay of a later try of a group's stream (like ``first``), admitted anew: the failed try was
    settled with nothing."""

    async def relay_to(member: str, fwd: Forward) -> StreamRelay:
        again = replace(call, deployment=member, body=fwd.body, headers={"x-lamina-model": member})
        admitted = await Admission.of(replace(again, usage_extra={}), deps.policies)
        return first.again(fwd, admitted)

    return relay_to


def _call(
    principal: Principal, op: _Operation, asked: str, route: Route, body: dict[str, Any], parsed: Parsed
) -> Call:
    embedding = isinstance(parsed, EmbeddingRequest)
    limit = None if isinstance(parsed, EmbeddingRequest) else parsed.token_limit
    return Call(
        principal=principal,
        operation=op.name,
        model=asked,
        deployment=route.deployment,
        model_version=route.model_version,
        body=body,
        stream=not isinstance(parsed, EmbeddingRequest) and parsed.stream,
        prompt_tokens=estimate_prompt_tokens(body),
        completion_tokens=0 if embedding else (limit or DEFAULT_COMPLETION_RESERVE),
    )


def _request_attributes(op: _Operation, parsed: Parsed) -> dict[str, AttributeValue]:
    attrs: dict[str, AttributeValue] = {
        "gen_ai.operation.name": op.name,
        "gen_ai.request.model": parsed.model,
    }
    if not isinstance(parsed, EmbeddingRequest):
        attrs["gen_ai.request.temperature"] = parsed.temperature
        attrs["gen_ai.request.top_p"] = parsed.top_p
        attrs["lamina.stream"] = parsed.stream
        if parsed.token_limit is not None:
            attrs["gen_ai.request.max_tokens"] = parsed.token_limit
    return attrs


def _require(route: Route, capability: Capability, requested: str, param: str) -> None:
    if capability.value in route.capabilities:
        return
    offered = ", ".join(sorted(route.capabilities)) or "nothing"
    raise UnsupportedCapabilityError(
        f"the model {requested!r} does not support {capability.value} (it supports: {offered}); use a model "
        f"whose capabilities in GET /v1/models include {capability.value!r}",
        param=param,
    )
