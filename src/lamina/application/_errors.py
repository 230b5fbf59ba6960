"""The one place errors become HTTP: every LaminaError is rendered as its OpenAI-style body and status.

FastAPI's own failures (an undeclared path, a wrong method, a body it validated) are mapped to the same
tree first, by type, so a client only ever sees ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lamina.application._requests import invalid_fields
from lamina.application._tracing import Exchange, log
from lamina.errors import InvalidRequestError, LaminaError, NotFoundError


def render(
    exc: LaminaError, status: int | None = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The response of ``exc``: its body, with its own status unless ``status`` overrides it."""
    return JSONResponse(exc.to_body(), status_code=status or exc.status, headers=headers or exc.headers)


async def _lamina_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LaminaError)
    Exchange.of(request).fail(exc)
    if exc.status >= 500:
        log.warning("%s %s -> %d %s: %s", request.method, request.url.path, exc.status, exc.code, exc.message)
    return render(exc)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = [{**e, "loc": tuple(e.get("loc", ()))[1:]} for e in exc.errors()]  # drop the "body" prefix
    return await _lamina_error(request, invalid_fields(errors))


#: where the routes are (a 404 says it): the OpenAI API, the admin API, the dashboard, the probes
_ROUTES = (
    "the API serves /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings and /v1/retrieve; "
    "the admin API is under /admin/v1/ (datasets, deployments, traces, doctor), the dashboard at /, "
    "and /healthz, /readyz, /metrics"
)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        error: LaminaError = NotFoundError(f"no route {request.method} {request.url.path}; {_ROUTES}")
    else:
        error = InvalidRequestError(f"{request.method} {request.url.path}: {exc.detail}")
    Exchange.of(request).fail(error)
    return render(error, exc.status_code, exc.headers)  # keeps e.g. the Allow header of a 405


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(LaminaError, _lamina_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
