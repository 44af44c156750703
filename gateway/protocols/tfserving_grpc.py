"""TF Serving's gRPC API, `tensorflow.serving.PredictionService` and `ModelService`, on the gateway's
gRPC port, for every model whatever its backend.

The services are registered here by their names alone. Their messages come from the
`tensorflow-serving-api` protos, which import TensorFlow (about 570 MiB in each process), so they
and the servicers (gateway.protocols.tfserving_services_grpc) are imported when the first TF
Serving gRPC call arrives: in a thread, so the event loop serves on meanwhile, and inside the
start-up filter for TensorFlow's native lines. A gateway that serves no TensorFlow-family model
and gets no TF Serving gRPC call never imports TensorFlow.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from gateway.codec import DEFAULT_LIMITS, InputLimits
from gateway.context import ContextBuilder
from gateway.dataplane import DataPlane
from gateway.errors import GatewayError, MalformedRequest, Unsupported
from gateway.native_logs import quiet_import
from gateway.protocols.grpc_guard import GuardedServer

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"
# The services' methods, as tensorflow_serving/apis/prediction_service.proto and
# model_service.proto name them.
METHODS: dict[str, tuple[str, ...]] = {
    PREDICTION_SERVICE: ("Classify", "Regress", "Predict", "MultiInference", "GetModelMetadata"),
    MODEL_SERVICE: ("GetModelStatus", "HandleReloadConfigRequest"),
}
SERVICES_MODULE = "gateway.protocols.tfserving_services_grpc"

Behaviour = Callable[[Any, Any], Awaitable[Any]]


def missing() -> str | None:
    """The package the services need that is not installed (looked for, not imported); else None."""
    for name in ("tensorflow", "tensorflow_serving"):
        try:
            found = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            found = None
        if found is None:
            return name
    return None


class _Unparsed:
    """A request's bytes, from before the messages were imported: parsed once they are."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class _Services:
    """Each method's request class and guarded behaviour, made on the first call."""

    def __init__(
        self, build: Callable[[Any], dict[str, tuple[Any, Behaviour]]], server: GuardedServer
    ) -> None:
        self._build = build
        self._guard = server.guard
        self._lock = asyncio.Lock()
        self.methods: dict[str, tuple[Any, Behaviour]] | None = None

    def guarded(self, method: str, run: Behaviour) -> Behaviour:
        return self._guard.wrap(method, grpc.unary_unary_rpc_method_handler(run)).unary_unary  # type: ignore[no-any-return]

    async def load(self) -> dict[str, tuple[Any, Behaviour]]:
        async with self._lock:
            if self.methods is None:
                try:
                    module = await asyncio.to_thread(quiet_import, SERVICES_MODULE)
                except ImportError as exc:
                    raise Unsupported(f"the TF Serving gRPC API cannot be served here: {exc}") from None
                built = self._build(module).items()
                self.methods = {method: (kind, self.guarded(method, run)) for method, (kind, run) in built}
            return self.methods


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()  # type: ignore[no-any-return]


def _handler(services: _Services, method: str) -> grpc.RpcMethodHandler:
    def deserialize(data: bytes) -> Any:
        methods = services.methods
        return _Unparsed(data) if methods is None else methods[method][0].FromString(data)

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Unparsed):
            try:
                methods = await services.load()
            except GatewayError as exc:
                return await services.guarded(method, _raising(exc))(None, context)
            try:
                request = methods[method][0].FromString(request.data)
            except DecodeError as exc:
                refused = MalformedRequest(f"{method}: the request is not a valid message: {exc}")
                return await services.guarded(method, _raising(refused))(None, context)
            return await methods[method][1](request, context)
        # A parsed request: the messages, and so the methods, are there.
        return await services.methods[method][1](request, context)  # type: ignore[index]

    return grpc.unary_unary_rpc_method_handler(
        call, request_deserializer=deserialize, response_serializer=_serialize
    )


def _raising(exc: GatewayError) -> Behaviour:
    async def run(request: Any, context: Any) -> Any:
        raise exc

    return run


def add_to_server(
    dataplane: DataPlane,
    contexts: ContextBuilder,
    server: GuardedServer,
    limits: InputLimits = DEFAULT_LIMITS,
    server_timing: bool = False,
) -> list[str]:
    """Register both TF Serving services by name, TensorFlow not imported; their full names, for
    reflection and health."""
    services = _Services(lambda module: module.methods(dataplane, contexts, limits, server_timing), server)
    for service, names in METHODS.items():
        handlers = {name: _handler(services, f"/{service}/{name}") for name in names}
        # Registered on the server itself: each call's guard (the access check reads the model the
        # request names) runs inside, once the request is parsed.
        server.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        server.server.add_registered_method_handlers(service, handlers)
    return list(METHODS)
