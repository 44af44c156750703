"""The HTTP application: every REST protocol's routes, /metrics, and the one REST error handler."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import gateway
from gateway.dataplane import DataPlane
from gateway.errors import GatewayError, retry_after, status_for
from gateway.metrics import Metrics
from gateway.protocols import v2_rest
from gateway.protocols.status_page import status_router
from gateway.protocols.tfserving_rest import tfserving_router
from gateway.protocols.v2_rest import RESPONSE_ID_HEADER, json_response, v2_router
from gateway.status import StatusReader

log = logging.getLogger("modelyard.http")

_INFER_PATH = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")


def create_app(dataplane: DataPlane, metrics: Metrics, status: StatusReader | None = None) -> ASGIApp:
    app = FastAPI(
        title="modelyard",
        version=gateway.__version__,
        description="Open Inference Protocol v2 and TF Serving APIs in front of several backends.",
        docs_url=None,
        redoc_url=None,
    )
    app.include_router(v2_router(dataplane))
    # TF Serving's REST API is plain JSON: it needs nothing from the tensorflow extra.
    app.include_router(tfserving_router(dataplane))
    app.include_router(status_router(status or StatusReader(dataplane, metrics)))

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> Response:
        return error_response(exc, request.method, request.url.path)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = "no such endpoint" if exc.status_code == 404 else str(exc.detail)
        return json_response({"error": f"{request.method} {request.url.path}: {message}"}, exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return json_response({"error": f"invalid request: {exc.errors()}"}, 400)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> Response:
        return internal_error(exc, request.method, request.url.path)

    _document_infer(app)
    return InferFastPath(app, dataplane)


def error_response(exc: GatewayError, method: str, path: str) -> Response:
    """A gateway error as the REST answer the error table gives it."""
    status, _ = status_for(exc)
    response = json_response({"error": str(exc)}, status)
    wait = retry_after(exc)
    if wait is not None:
        response.headers["Retry-After"] = str(wait)
    if exc.request_id is not None:
        response.headers[RESPONSE_ID_HEADER] = exc.request_id
    # The data plane has logged its 503s and 504s, with the request id.
    if status == 500 or (status > 500 and exc.request_id is None):
        log.warning("%s %s -> %d request_id=%s: %s", method, path, status, exc.request_id, exc)
    return response


def internal_error(exc: Exception, method: str, path: str) -> Response:
    """Called from an exception handler: logs the exception being handled, answers 500."""
    log.exception("unexpected error on %s %s", method, path)
    return json_response({"error": f"internal error: {type(exc).__name__}"}, 500)


class InferFastPath:
    """v2 infer as a bare ASGI handler in front of the FastAPI app; every other request goes on to it.

    Infer is the one hot route. Profiling a small model over REST JSON put FastAPI's routing,
    dependency solving and middleware stack at about a quarter of the event loop's time; here the
    request reaches the same v2 functions with none of that.
    """

    def __init__(self, app: FastAPI, dataplane: DataPlane) -> None:
        self.app = app
        self.dataplane = dataplane

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = _INFER_PATH.fullmatch(scope["path"])
            if match is not None:
                await self._infer(scope, receive, send, match["name"], match["version"])
                return
        await self.app(scope, receive, send)

    async def _infer(
        self, scope: Scope, receive: Receive, send: Send, name: str, version: str | None
    ) -> None:
        body = await _read_body(receive)
        if body is None:
            return  # the client went away
        try:
            response = await v2_rest.infer(self.dataplane, body, Headers(scope=scope), name, version)
        except GatewayError as exc:
            response = error_response(exc, "POST", scope["path"])
        except Exception as exc:
            response = internal_error(exc, "POST", scope["path"])
        await response(scope, receive, send)


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client disconnected first."""
    chunks: list[bytes] = []
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _document_infer(app: FastAPI) -> None:
    """Adds the infer endpoint, which FastAPI's router never sees, to the OpenAPI document."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            operation = v2_rest.infer_openapi()
            for path, parameters in (
                ("/v2/models/{model_name}/infer", ["model_name"]),
                ("/v2/models/{model_name}/versions/{model_version}/infer", ["model_name", "model_version"]),
            ):
                schema.setdefault("paths", {})[path] = {
                    "post": {
                        **operation,
                        "parameters": [
                            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                            for p in parameters
                        ],
                    }
                }
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
