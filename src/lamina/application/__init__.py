"""Layer: application. The OpenAI-compatible gateway and the ports it needs from the layers below."""

from lamina.application._access import gateway_hosts
from lamina.application._admin import IngestService, IngestSettings, ThreadedIngestService, admin_router
from lamina.application._admin_deployments import (
    DeploymentManager,
    DeployRequest,
    deployments_router,
    parse_replicas,
)
from lamina.application._admin_observe import Doctor, observe_router
from lamina.application._auth import Authenticator, StaticKeys
from lamina.application._budgets import Budget, CostLedger, CostLine, LedgerEntry
from lamina.application._cache import ResponseCache, response_cache
from lamina.application._cache_semantic import SemanticIndex
from lamina.application._costs import CostPolicy, Prices, gpu_hour_usd, replica_hourly_usd
from lamina.application._gateway import GatewayDeps, create_app
from lamina.application._keys import KeyAuthenticator, KeyRecord, KeySpec, KeyStore
from lamina.application._policy import ANONYMOUS, Call, Policy, Principal, Ticket, Usage, close_policies
from lamina.application._ports import Dispatcher, DispatchResult, ModelCatalog, Readiness, Route
from lamina.application._prompts import PromptStore
from lamina.application._rag import AliasCatalog, RagOptions
from lamina.application._ratelimit import RateLimitPolicy
from lamina.application._replay import ReplayRecord, ReplayRecorder, answer_summary, read_replay
from lamina.application._routing import ModelRouter
from lamina.application._templates import PromptSpec, PromptVersion

__all__ = [
    "ANONYMOUS",
    "AliasCatalog",
    "Authenticator",
    "Budget",
    "Call",
    "CostLedger",
    "CostLine",
    "CostPolicy",
    "DeployRequest",
    "DeploymentManager",
    "DispatchResult",
    "Dispatcher",
    "Doctor",
    "GatewayDeps",
    "IngestService",
    "IngestSettings",
    "KeyAuthenticator",
    "KeyRecord",
    "KeySpec",
    "KeyStore",
    "LedgerEntry",
    "ModelCatalog",
    "ModelRouter",
    "Policy",
    "Prices",
    "Principal",
    "PromptSpec",
    "PromptStore",
    "PromptVersion",
    "RagOptions",
    "RateLimitPolicy",
    "Readiness",
    "ReplayRecord",
    "ReplayRecorder",
    "ResponseCache",
    "Route",
    "SemanticIndex",
    "StaticKeys",
    "ThreadedIngestService",
    "Ticket",
    "Usage",
    "admin_router",
    "answer_summary",
    "close_policies",
    "create_app",
    "deployments_router",
    "gateway_hosts",
    "gpu_hour_usd",
    "observe_router",
    "parse_replicas",
    "read_replay",
    "replica_hourly_usd",
    "response_cache",
]
