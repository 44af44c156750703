"""The HTTP application: every REST protocol's routes, /metrics, and the one REST error handler."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

import gateway
from gateway.dataplane import DataPlane
from gateway.errors import GatewayError, retry_after, status_for
from gateway.metrics import Metrics
from gateway.protocols.status_page import status_router
from gateway.protocols.tfserving_rest import tfserving_router
from gateway.protocols.v2_rest import json_response, v2_router
from gateway.status import StatusReader

log = logging.getLogger("modelyard.http")


def create_app(dataplane: DataPlane, metrics: Metrics, status: StatusReader | None = None) -> FastAPI:
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
        status, _ = status_for(exc)
        response = json_response({"error": str(exc)}, status)
        wait = retry_after(exc)
        if wait is not None:
            response.headers["Retry-After"] = str(wait)
        if status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.url.path, status, exc)
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
