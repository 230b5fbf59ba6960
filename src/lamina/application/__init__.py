"""Layer: application. The OpenAI-compatible gateway and the ports it needs from the layers below."""

from lamina.application._admin import IngestService, IngestSettings, ThreadedIngestService, admin_router
from lamina.application._gateway import GatewayDeps, create_app
from lamina.application._ports import Dispatcher, DispatchResult, ModelCatalog, Readiness, Route
from lamina.application._rag import RagOptions

__all__ = [
    "DispatchResult",
    "Dispatcher",
    "GatewayDeps",
    "IngestService",
    "IngestSettings",
    "ModelCatalog",
    "RagOptions",
    "Readiness",
    "Route",
    "ThreadedIngestService",
    "admin_router",
    "create_app",
]
