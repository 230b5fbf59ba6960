"""Layer: application. The OpenAI-compatible gateway and the ports it needs from the layers below."""

from lamina.application._gateway import GatewayDeps, create_app
from lamina.application._ports import Dispatcher, DispatchResult, ModelCatalog, Readiness, Route

__all__ = ["DispatchResult", "Dispatcher", "GatewayDeps", "ModelCatalog", "Readiness", "Route", "create_app"]
