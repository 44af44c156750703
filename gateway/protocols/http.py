"""The HTTP application: every REST protocol's routes, /metrics, the one REST error handler, the
request body limit and the one REST access check."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import gateway
from gateway.auth import Authorizer
from gateway.dataplane import DataPlane
from gateway.errors import GatewayError, PayloadTooLarge, retry_after, status_for
from gateway.metrics import Metrics
from gateway.protocols.tensors import DEFAULT_LIMITS, InputLimits
from gateway.protocols.tfserving_rest import tfserving_router
from gateway.protocols.v2_rest import json_response, v2_router

log = logging.getLogger("modelyard.http")

# The action each route's path template needs (gateway.auth); any other route is "metadata".
_ROUTE_ACTIONS = {
    "/v2/health/live": "health",
    "/v2/health/ready": "health",
    "/metrics": "metrics",
    "/v2/repository/models/{model_name}/load": "repository",
    "/v2/repository/models/{model_name}/unload": "repository",
}
_INFER_SUFFIXES = ("/infer", ":predict", ":classify", ":regress")


def route_action(template: str) -> str:
    """The action a route needs, from its path template (so a model's name never decides it)."""
    action = _ROUTE_ACTIONS.get(template)
    if action is not None:
        return action
    return "infer" if template.endswith(_INFER_SUFFIXES) else "metadata"


def credentials(headers: Any) -> str | None:
    """The raw credentials of a request: its Authorization header, else its X-API-Key header."""
    value: str | None = headers.get("authorization") or headers.get("x-api-key")
    return value


def error_response(exc: GatewayError) -> Response:
    """A GatewayError as REST answers it: the table's status, `{"error": ...}`, Retry-After."""
    status, _ = status_for(exc)
    response = json_response({"error": str(exc)}, status)
    wait = retry_after(exc)
    if wait is not None:
        response.headers["Retry-After"] = str(wait)
    return response


class BodySizeLimit:
    """Refuses a request body over `max_bytes` while it arrives, never buffering more than that.

    A Content-Length over the limit is answered 413 before a byte is read; a chunked body is
    counted as it comes, and `receive` raises PayloadTooLarge (413 through the error table) once
    it passes the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        for name, value in scope["headers"]:
            if name == b"content-length":
                declared = int(value) if value.isdigit() else 0
                if declared > limit:
                    await error_response(_too_large(limit))(scope, receive, send)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _too_large(limit)
            return message

        await self.app(scope, limited_receive, send)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the request body is over the limit of {limit} bytes (MODELYARD_MAX_REQUEST_BODY_MB)"
    )


def create_app(
    dataplane: DataPlane,
    metrics: Metrics,
    limits: InputLimits = DEFAULT_LIMITS,
    authorizer: Authorizer | None = None,
) -> FastAPI:
    # With auth off there is no dependency at all, so requests pay nothing for it.
    dependencies = []
    if authorizer is not None and authorizer.enabled:
        check = authorizer.check

        async def authorize(request: Request) -> None:
            route = request.scope.get("route")
            action = route_action(getattr(route, "path", ""))
            check(credentials(request.headers), action, request.path_params.get("model_name"))

        dependencies.append(Depends(authorize))

    app = FastAPI(
        title="modelyard",
        version=gateway.__version__,
        description="Open Inference Protocol v2 and TF Serving APIs in front of several backends.",
        docs_url=None,
        redoc_url=None,
        dependencies=dependencies,
    )
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    app.include_router(v2_router(dataplane, limits))
    # TF Serving's REST API is plain JSON: it needs nothing from the tensorflow extra.
    app.include_router(tfserving_router(dataplane, limits))

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> Response:
        response = error_response(exc)
        if response.status_code >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.url.path, response.status_code, exc)
        return response

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = "no such endpoint" if exc.status_code == 404 else str(exc.detail)
        return json_response({"error": f"{request.method} {request.url.path}: {message}"}, exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return json_response({"error": f"invalid request: {exc.errors()}"}, 400)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return json_response({"error": f"internal error: {type(exc).__name__}"}, 500)

    return app
