"""The HTTP application: every REST protocol's routes, /metrics, the one REST error handler, the
request body limit and the one REST access check."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import gateway
from gateway.auth import Authorizer, request_access
from gateway.codec import DEFAULT_LIMITS, InputLimits, body_limit
from gateway.context import ContextBuilder
from gateway.dataplane import DataPlane
from gateway.errors import (
    GatewayError,
    MalformedRequest,
    MethodNotAllowed,
    NoSuchEndpoint,
    PayloadTooLarge,
    public_message,
    retry_after,
    status_for,
)
from gateway.limits import BodyBudget
from gateway.metrics import Metrics
from gateway.protocols import v2_rest
from gateway.protocols.openapi import V2_INFER_REQUEST, request_body
from gateway.protocols.shared_memory import NO_SHARED_MEMORY, SharedMemoryRegions
from gateway.protocols.status_page import status_router
from gateway.protocols.tfserving_rest import tfserving_router
from gateway.protocols.v2_rest import HEADER_LENGTH, RESPONSE_ID_HEADER, json_response, v2_router
from gateway.protocols.v2_shm_rest import TEMPLATES as SHARED_MEMORY_TEMPLATES
from gateway.protocols.v2_shm_rest import shared_memory_router
from gateway.status import StatusReader

log = logging.getLogger("modelyard.http")

_INFER_PATH = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")

# The action each route's path template needs (gateway.auth); any other route is "metadata".
_ROUTE_ACTIONS = {
    "/v2/health/live": "health",
    "/v2/health/ready": "health",
    "/metrics": "metrics",
    "/v2/repository/models/{model_name}/load": "repository",
    "/v2/repository/models/{model_name}/unload": "repository",
    **dict.fromkeys(SHARED_MEMORY_TEMPLATES, "infer"),
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


class BodyLimits:
    """Holds each request body to its limit while it arrives, never buffering more than that, and
    all bodies in flight to the gateway's budget.

    The limit follows how the body will be parsed: a binary body (Triton's binary extension, with
    Inference-Header-Content-Length) has its own; any other is JSON. A Content-Length over the
    limit is answered 413 before a byte is read, and one that would pass the budget 429; a chunked
    body is counted as it comes, and `receive` raises PayloadTooLarge (413) or Overloaded (429)
    once it passes either.
    """

    def __init__(self, app: ASGIApp, limits: InputLimits, budget: BodyBudget | None = None) -> None:
        self.app = app
        self.limits = limits
        self.budget = budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared, binary = 0, False
        for name, value in scope["headers"]:
            if name == b"content-length":
                declared = int(value) if value.isdigit() else 0
            elif name == HEADER_LENGTH_KEY:
                binary = True
        held = _Held(self.budget, *body_limit(self.limits, binary))
        try:
            held.admit(declared)
        except GatewayError as exc:
            await error_response(exc, scope["method"], scope["path"])(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                held.admit(received)
            return message

        try:
            await self.app(scope, limited_receive, send)
        finally:
            held.release()


class _Held:
    """One request body's account: its byte limit, and the bytes of it taken from the gateway's
    budget (none where there is no budget)."""

    __slots__ = ("budget", "limit", "setting", "size")

    def __init__(self, budget: BodyBudget | None, limit: int, setting: str) -> None:
        self.budget = budget
        self.limit = limit
        self.setting = setting
        self.size = 0

    def admit(self, size: int) -> None:
        """The body is (or says it will be) `size` bytes: PayloadTooLarge (413) over the limit,
        else the bytes not yet held are taken from the budget, Overloaded (429) where it has no
        room for them."""
        if size <= self.size:
            return
        if size > self.limit:
            raise _too_large(self.limit, self.setting)
        if self.budget is not None:
            self.budget.reserve(size - self.size)
            self.size = size

    def release(self) -> None:
        if self.budget is not None and self.size:
            self.budget.release(self.size)
            self.size = 0


HEADER_LENGTH_KEY = HEADER_LENGTH.encode()


def _too_large(limit: int, setting: str) -> PayloadTooLarge:
    return PayloadTooLarge(f"the request body is over the limit of {limit} bytes ({setting})")


def create_app(
    dataplane: DataPlane,
    metrics: Metrics,
    status: StatusReader,
    contexts: ContextBuilder,
    limits: InputLimits = DEFAULT_LIMITS,
    authorizer: Authorizer | None = None,
    budget: BodyBudget | None = None,
    regions: SharedMemoryRegions = NO_SHARED_MEMORY,
) -> ASGIApp:
    # With auth off there is no dependency at all, so requests pay nothing for it.
    dependencies = []
    if authorizer is not None and authorizer.enabled:
        check = authorizer.check

        async def authorize(request: Request) -> None:
            route = request.scope.get("route")
            action = route_action(getattr(route, "path", ""))
            request_access.set(
                check(credentials(request.headers), action, request.path_params.get("model_name"))
            )

        dependencies.append(Depends(authorize))

    app = FastAPI(
        title="modelyard",
        version=gateway.__version__,
        description="Open Inference Protocol v2 and TF Serving APIs in front of several backends.",
        docs_url=None,
        redoc_url=None,
        dependencies=dependencies,
    )
    app.include_router(v2_router(dataplane, limits))
    app.include_router(shared_memory_router(regions, limits))
    # TF Serving's REST API is plain JSON: it needs nothing from the tensorflow extra.
    app.include_router(tfserving_router(dataplane, contexts, limits))
    app.include_router(status_router(status))

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(request_access.get()), media_type=metrics.content_type)

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> Response:
        return error_response(exc, request.method, request.url.path)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return error_response(
            _from_starlette(exc, request.method, request.url.path), request.method, request.url.path
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        error = MalformedRequest(f"{request.method} {request.url.path}: invalid request: {problems}")
        return error_response(error, request.method, request.url.path)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> Response:
        return internal_error(exc, request.method, request.url.path)

    _document_infer(app)
    # The infer fast path holds its bodies to the same limits itself (one scan of the headers, no
    # wrapped receive); every other request goes through BodyLimits.
    return InferFastPath(
        BodyLimits(app, limits, budget), dataplane, contexts, limits, authorizer, regions, budget
    )


def _from_starlette(exc: HTTPException, method: str, path: str) -> GatewayError:
    """Starlette's own refusals (no route, wrong method) as gateway errors, so the one table maps them."""
    where = f"{method} {path[:200]}"
    if exc.status_code == 404:
        return NoSuchEndpoint(f"{where}: no such endpoint")
    if exc.status_code == 405:
        return MethodNotAllowed(f"{where}: the method is not allowed here")
    if exc.status_code == 413:
        return PayloadTooLarge(f"{where}: {exc.detail}")
    if 400 <= exc.status_code < 500:
        return MalformedRequest(f"{where}: {exc.detail}")
    return GatewayError(f"{where}: {exc.detail}")


def error_response(exc: GatewayError, method: str, path: str) -> Response:
    """A gateway error as the REST answer the error table gives it."""
    status, _ = status_for(exc)
    response = json_response({"error": public_message(exc)}, status)
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
    request reaches the same v2 functions with none of that. Its body is held to BodyLimits' limit
    and budget here, as it is read: the same refusals, without a second scan of the headers and a
    wrapped `receive` per request.
    """

    def __init__(
        self,
        app: ASGIApp,
        dataplane: DataPlane,
        contexts: ContextBuilder,
        limits: InputLimits,
        authorizer: Authorizer | None,
        regions: SharedMemoryRegions = NO_SHARED_MEMORY,
        budget: BodyBudget | None = None,
    ) -> None:
        self.app = app
        self.regions = regions
        self.dataplane = dataplane
        self.contexts = contexts
        self.limits = limits
        self.budget = budget
        self.authorize = authorizer.check if authorizer is not None and authorizer.enabled else None

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
        headers = header_dict(scope)
        held = _Held(self.budget, *body_limit(self.limits, HEADER_LENGTH in headers))
        try:
            try:
                declared_text = headers.get("content-length", "")
                declared = int(declared_text) if declared_text.isdigit() else 0
                held.admit(declared)
                if self.authorize is not None:
                    self.authorize(credentials(headers), "infer", name)
                body = await _read_body(receive, declared, held)
                if body is None:
                    return  # the client went away
                response: ASGIApp = await v2_rest.infer(
                    self.dataplane, self.contexts, body, headers, name, version, self.limits, self.regions
                )
            except GatewayError as exc:
                response = error_response(exc, "POST", scope["path"])
            except Exception as exc:
                response = internal_error(exc, "POST", scope["path"])
            await response(scope, receive, send)
        finally:
            held.release()


def header_dict(scope: Scope) -> dict[str, str]:
    """A request's headers as a dict, read once: the server gives their names in lower case, and
    where a name comes twice the first value counts, as `starlette.datastructures.Headers.get` has
    it. Every later lookup is then one dict access, not a scan of the raw list."""
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in reversed(scope["headers"])}


async def _read_body(receive: Receive, length: int, held: _Held) -> bytes | bytearray | None:
    """The whole request body, or None if the client disconnected first; `held` refuses it (413,
    429) as soon as it has too much of it. With its length known
    (Content-Length, already held to its limit) the chunks go straight into one buffer of that
    size, so the body is never held twice."""
    message: Message = await receive()
    if message["type"] == "http.disconnect":
        return None
    first: bytes = message.get("body", b"")
    held.admit(len(first))
    if not message.get("more_body", False):
        return first
    buffer = bytearray(length) if length > len(first) else None
    if buffer is None:
        chunks = [first]
    else:
        buffer[: len(first)] = first
    filled = len(first)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        held.admit(filled + len(chunk))
        if buffer is not None and filled + len(chunk) <= length:
            buffer[filled : filled + len(chunk)] = chunk
        else:
            if buffer is not None:  # longer than it said: fall back to collecting
                chunks, buffer = [bytes(buffer[:filled])], None
            chunks.append(chunk)
        filled += len(chunk)
        if not message.get("more_body", False):
            if buffer is not None:
                return buffer if filled == length else buffer[:filled]
            return b"".join(chunks)


def _document_infer(app: FastAPI) -> None:
    """Adds the infer endpoint, which FastAPI's router never sees, to the OpenAPI document."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            operation = {
                "summary": "Infer",
                **request_body(V2_INFER_REQUEST, binary=True),
                "responses": {"200": {"description": "The outputs"}},
            }
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
