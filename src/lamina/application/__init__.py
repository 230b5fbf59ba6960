"""Layer: application. The OpenAI-compatible gateway and the ports it needs from the layers below."""

from lamina.application._admin import IngestService, IngestSettings, ThreadedIngestService, admin_router
from lamina.application._auth import Authenticator, StaticKeys
from lamina.application._gateway import GatewayDeps, create_app
from lamina.application._policy import ANONYMOUS, Call, Policy, Principal, Ticket, Usage
from lamina.application._ports import Dispatcher, DispatchResult, ModelCatalog, Readiness, Route
from lamina.application._rag import RagOptions

__all__ = [
    "ANONYMOUS",
    "Authenticator",
    "Call",
    "DispatchResult",
    "Dispatcher",
    "GatewayDeps",
    "IngestService",
    "IngestSettings",
    "ModelCatalog",
    "Policy",
    "Principal",
    "RagOptions",
    "Readiness",
    "Route",
    "StaticKeys",
    "ThreadedIngestService",
    "Ticket",
    "Usage",
    "admin_router",
    "create_app",
]
