"""What the service shows callers and operators: auth, error bodies (both formats), /metrics, request IDs.

Plain pieces that runtime.serve.app's app factory wires together; each error body carries the request's ID,
and `?format=original` on the analysis routes answers in the original service's shapes
(runtime.serve.original_contract).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime.serve import original_contract as original
from runtime.serve.body import ServiceError, error_response, error_responses
from runtime.serve.metrics import Metrics
from runtime.serve.request_log import note, request_id

_HTTP_TYPES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               408: "request_timeout", 413: "too_large", 415: "unsupported_media_type"}
FORMAT_QUERY = Query(description="`original`: the original service's response shapes (docs/spec.md §5), with the "
                                 "corrected names and label-unit scores; `default`: this service's")
Format = Annotated[Literal["default", "original"], FORMAT_QUERY]
BEARER = HTTPBearer(auto_error=False, description="PERCEPIANO_API_TOKEN (declared only when the service has one)")


class TokenCheck:
    """A dependency that requires `Authorization: Bearer <token>` when a token is set (constant-time compare)."""

    def __init__(self, token: str | None):
        self.expected = hashlib.sha256(token.encode()).digest() if token else None

    async def __call__(self, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        if self.expected is None:
            return
        given = credentials.credentials if credentials and credentials.scheme.lower() == "bearer" else ""
        if not hmac.compare_digest(hashlib.sha256(given.encode()).digest(), self.expected):
            raise ServiceError(401, "unauthorized", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})


def model_version(request: Request) -> str | None:
    """The served model's version, once one is loaded."""
    service = getattr(request.app.state, "service", None)
    analyzer = getattr(service, "analyzer", None)
    return analyzer.model.info.version if analyzer is not None else None


def answer_error(request: Request, status: int, error_type: str, message: str,
                 headers: dict[str, str] | None = None) -> JSONResponse:
    """The error body in the format the request asked for, with its request ID; noted for the request log."""
    rid = request_id(request.scope)
    note(request.scope, error_type=error_type)
    if request.query_params.get("format") == "original" and request.url.path.startswith("/v1/analyze"):
        body = original.error(message, error_type, model_version=model_version(request), request_id=rid)
        return JSONResponse(body, status_code=status, headers=headers)
    return error_response(status, error_type, message, headers, request_id=rid)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError):
        return answer_error(request, exc.status, exc.error_type, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return answer_error(request, exc.status_code, _HTTP_TYPES.get(exc.status_code, "http_error"),
                            str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return answer_error(request, 422, "invalid_request", f"{where}: {first.get('msg', 'invalid request')}")


def add_metrics_route(app: FastAPI, metrics: Metrics, dependencies: list) -> None:
    """GET /metrics in the Prometheus text format (behind `dependencies`: the API's auth unless opened)."""

    responses = {200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}}
    if dependencies:  # behind the token: a missing or wrong one is 401
        responses |= error_responses(401)

    @app.get("/metrics", dependencies=dependencies, tags=["health"], response_class=Response, responses=responses)
    async def metrics_route():
        """Request counts and latencies, the timing split, load, in-flight and waiting analyses, the model."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)
