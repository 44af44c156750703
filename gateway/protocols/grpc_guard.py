"""The gRPC side of the error table and gRPC's one access check, for every gRPC service the
gateway serves (v2 and TF Serving): each unary method's handler is wrapped once, as the services
register."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc

from gateway.auth import Authorizer, request_access
from gateway.context import REQUEST_ID_HEADER
from gateway.errors import GatewayError, public_message, retry_after, status_for

log = logging.getLogger("modelyard.grpc")


# The action each unary method needs (gateway.auth), by method name; any other is "metadata".
_METHOD_ACTIONS = {
    "ModelInfer": "infer",
    "Predict": "infer",
    "Classify": "infer",
    "Regress": "infer",
    "MultiInference": "infer",
    "RepositoryModelLoad": "repository",
    "RepositoryModelUnload": "repository",
    "HandleReloadConfigRequest": "repository",
    # Shared memory regions are what infer calls read and write.
    "SystemSharedMemoryRegister": "infer",
    "SystemSharedMemoryUnregister": "infer",
    "SystemSharedMemoryStatus": "infer",
    "CudaSharedMemoryRegister": "infer",
    "CudaSharedMemoryUnregister": "infer",
    "CudaSharedMemoryStatus": "infer",
    "ServerLive": "health",
    "ServerReady": "health",
    "Check": "health",
}


def method_action(method: str) -> str:
    """The action a gRPC method (`/package.Service/Method`) needs."""
    return _METHOD_ACTIONS.get(method.rpartition("/")[2], "metadata")


def model_of(request: Any) -> str | None:
    """The model a request names: `model_name`, `name` (v2) or `model_spec.name` (TF Serving)."""
    for field in ("model_name", "name"):
        if hasattr(request, field):
            return str(getattr(request, field)) or None
    if hasattr(request, "model_spec"):
        return str(request.model_spec.name) or None
    return None


def _credentials(context: grpc.aio.ServicerContext) -> str | bytes | None:
    for key, value in context.invocation_metadata() or ():
        if key in ("authorization", "x-api-key"):
            return value  # type: ignore[no-any-return]
    return None


class ErrorInterceptor:
    """The gRPC side of the error table: every unary method's GatewayError becomes its status code.

    With an enabled `Authorizer`, it is also gRPC's one access check: each unary call is checked
    from its metadata, its method's action and its model, before the servicer runs.

    It wraps each unary method's handler once, as the services register through `guarding(server)`,
    rather than as a grpc.aio ServerInterceptor: an interceptor runs on every call to find the
    handler and builds a new one each time, which costs each request more than the wrapper does.
    """

    def __init__(
        self,
        authorizer: Authorizer | None = None,
        deserializers: Mapping[str, Callable[[bytes], Any]] | None = None,
        admission: Callable[[str], None] | None = None,
    ) -> None:
        self._authorizer = authorizer if authorizer is not None and authorizer.enabled else None
        # Given the call's peer, raises where its connection is past a limit the server does not
        # keep itself (gateway.grpc_native.ConnectionWatch.admit).
        self._admission = admission
        # A method's own request parser, in place of its generated one (`/package.Service/Method`).
        self._deserializers = dict(deserializers or {})

    def guarding(self, server: grpc.aio.Server) -> GuardedServer:
        """`server`, to register services on: their unary handlers arrive wrapped."""
        return GuardedServer(server, self)

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The handler of `method` (`/package.Service/Method`), its unary-unary call guarded, and
        its requests read by the method's own deserializer where one was given."""
        if handler is None:
            return handler
        deserializer = self._deserializers.get(method, handler.request_deserializer)
        if handler.stream_stream is not None and method in self._deserializers:
            return grpc.stream_stream_rpc_method_handler(
                handler.stream_stream,
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        authorizer, admission = self._authorizer, self._admission
        action = method_action(method)

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                if admission is not None:
                    admission(context.peer())
                if authorizer is not None:
                    request_access.set(authorizer.check(_credentials(context), action, model_of(request)))
                return await inner(request, context)
            except grpc.aio.AbortError:
                raise
            except GatewayError as exc:
                _, code = status_for(exc)
                trailers = []
                wait = retry_after(exc)
                if wait is not None:
                    trailers.append(("retry-after", str(wait)))
                if exc.request_id is not None:
                    trailers.append((REQUEST_ID_HEADER, exc.request_id))
                if trailers:
                    context.set_trailing_metadata(tuple(trailers))
                await _abort(context, method, code, public_message(exc))
            except Exception as exc:
                log.exception("unexpected error in %s", method)
                await _abort(
                    context, method, grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"
                )

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )


async def _abort(context: grpc.aio.ServicerContext, method: str, code: grpc.StatusCode, message: str) -> None:
    """Ends the call with `code`; where the call has already ended (the client left, or its deadline
    passed as the answer was made), there is no one to tell: the handler ends as a cancelled one, which
    grpc logs at debug level, not as a crash with a stack trace."""
    try:
        await context.abort(code, message)
    except grpc.aio.AbortError:
        raise
    except Exception:
        log.info("%s: the call ended before its status could be sent: %s %s", method, code.name, message)
        raise asyncio.CancelledError from None


class GuardedServer:
    """What the generated `add_*Servicer_to_server` functions and gRPC's health and reflection
    modules register services on: the real server, each unary handler wrapped by the guard first.
    Anything else (ports, start, stop) is the server's own."""

    def __init__(self, server: grpc.aio.Server, guard: ErrorInterceptor) -> None:
        self._server = server
        self._guard = guard

    @property
    def server(self) -> grpc.aio.Server:
        """The real server, for a service that guards its own calls."""
        return self._server

    @property
    def guard(self) -> ErrorInterceptor:
        return self._guard

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        guard = self._guard
        wrapped = {name: guard.wrap(f"/{service}/{name}", handler) for name, handler in handlers.items()}
        self._server.add_registered_method_handlers(service, wrapped)

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_GuardedGeneric(h, self._guard) for h in handlers))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


class _GuardedGeneric(grpc.GenericRpcHandler):  # type: ignore[misc]
    """A generic handler whose answers are guarded, each method's wrapped once and kept.

    gRPC asks generic handlers only for methods no registered handler serves; each of them knows
    a fixed set of methods, so the cache is bounded by its service."""

    def __init__(self, inner: grpc.GenericRpcHandler, guard: ErrorInterceptor) -> None:
        self._inner = inner
        self._guard = guard
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        found = self._wrapped.get(method)
        if found is None:
            handler = self._inner.service(handler_call_details)
            if handler is None:
                return None
            found = self._wrapped[method] = self._guard.wrap(method, handler)
        return found
