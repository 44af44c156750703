"""Open Inference Protocol v2 over gRPC: service `inference.GRPCInferenceService`.

Uses the generated code that tritonclient ships. Protobuf stops here: requests become the data
plane's types, and its answers become protobuf again. Errors are mapped by `ErrorInterceptor`
(gateway/protocols/grpc_guard.py), which wraps each method's handler as the services register.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from gateway.auth import Authorizer, request_access
from gateway.codec import (
    CONTENTS_FIELD,
    DEFAULT_LIMITS,
    InputLimits,
    parse_datatype_field,
    parse_shape,
    tensor_from_buffer,
    tensor_from_values,
    tensor_to_bytes,
)
from gateway.context import REQUEST_ID_HEADER, ContextBuilder, deadline_after, request_id
from gateway.dataplane import DataPlane
from gateway.errors import GatewayError, InvalidInput, MalformedRequest, Unsupported
from gateway.protocols.grpc_guard import ErrorInterceptor, GuardedServer, method_action, model_of
from gateway.protocols.shared_memory import NO_SHARED_MEMORY, RequestReads, SharedMemoryRegions
from gateway.protocols.triton import load_parameters
from gateway.protocols.triton import model_config as triton_model_config
from gateway.protocols.v2_grpc_wire import parse_infer_request
from gateway.protocols.v2_shm_grpc import SharedMemoryServicer
from gateway.protocols.v2_stream_grpc import DEFAULT_STREAM_CONCURRENCY, StreamInfer
from gateway.timing import SERVER_TIMING, timing_asked
from gateway.types import (
    Datatype,
    Duration,
    InferRequest,
    InferResponse,
    ModelStatistics,
    RequestedOutput,
    Tensor,
    TensorSpec,
    quoted,
)

__all__ = [
    "INFER_DESERIALIZERS",
    "SERVICE_NAME",
    "ErrorInterceptor",
    "GuardedServer",
    "InferenceServicer",
    "method_action",
    "model_of",
]

SERVICE_NAME: str = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# Infer requests are read by the gateway's own parser: a large one's raw contents stay views of
# the bytes received, not a copy per read (gateway/protocols/v2_grpc_wire.py).
INFER_DESERIALIZERS = {
    f"/{SERVICE_NAME}/ModelInfer": parse_infer_request,
    f"/{SERVICE_NAME}/ModelStreamInfer": parse_infer_request,
}
_UNSUPPORTED_PARAMETERS = ("classification",)


class InferenceServicer(SharedMemoryServicer, service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        dataplane: DataPlane,
        contexts: ContextBuilder,
        limits: InputLimits = DEFAULT_LIMITS,
        *,
        authorizer: Authorizer | None = None,
        stream_concurrency: int = DEFAULT_STREAM_CONCURRENCY,
        server_timing: bool = False,
        regions: SharedMemoryRegions = NO_SHARED_MEMORY,
    ) -> None:
        self.dataplane = dataplane
        self.contexts = contexts
        self.limits = limits
        self.regions = regions
        # Server-Timing in every ModelInfer's trailing metadata (and every streamed answer's
        # parameters); else only where a call or stream asks for it.
        self.server_timing = server_timing
        # The guard wraps unary methods only: the stream checks access itself, request by request.
        self._stream = StreamInfer(
            dataplane,
            contexts,
            lambda request: decode_infer_request(request, limits, regions),
            lambda response: encode_infer_response(response, regions),
            authorizer=authorizer,
            concurrency=stream_concurrency,
            server_timing=server_timing,
        )

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerLiveResponse(live=self.dataplane.live())

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerReadyResponse(ready=self.dataplane.ready())

    async def ModelReady(self, request: Any, context: Any) -> Any:
        ready = await self.dataplane.model_ready(request.name, request.version or None)
        return service_pb2.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        meta = self.dataplane.server_metadata()
        return service_pb2.ServerMetadataResponse(
            name=meta.name, version=meta.version, extensions=meta.extensions
        )

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        meta = await self.dataplane.model_metadata(request.name, request.version or None)
        return service_pb2.ModelMetadataResponse(
            name=meta.name,
            versions=meta.versions,
            platform=meta.platform,
            inputs=[_tensor_metadata(s) for s in meta.inputs],
            outputs=[_tensor_metadata(s) for s in meta.outputs],
        )

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        config = triton_model_config(
            await self.dataplane.model_description(request.name, request.version or None)
        )
        return service_pb2.ModelConfigResponse(
            config=json_format.ParseDict(config, model_config_pb2.ModelConfig())
        )

    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        rows = self.dataplane.statistics(
            request.name or None, request.version or None, visible=request_access.get().sees
        )
        return service_pb2.ModelStatisticsResponse(model_stats=[_statistics(row) for row in rows])

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter_ns()
        metadata = ContextBuilder.grpc_metadata(context.invocation_metadata())
        try:
            infer_request = decode_infer_request(request, self.limits, self.regions)
            request_context = self.contexts.build(
                "grpc",
                metadata,
                infer_request.parameters,
                transport_deadline=deadline_after(context.time_remaining()),
                body_id=infer_request.id,
            )
        except GatewayError as exc:
            exc.request_id = request_id(metadata.get(REQUEST_ID_HEADER), request.id)
            raise
        decoded = time.perf_counter_ns()
        response = await self.dataplane.infer(infer_request, request_context)
        encoding = time.perf_counter_ns()
        message = encode_infer_response(response, self.regions)
        # The response's `id` echoes the client's v2 id, as the protocol says; the request id
        # (the client's, or a generated one) travels in trailing metadata.
        trailers = [
            ("model-version", response.model_version),
            (REQUEST_ID_HEADER, request_context.request_id),
        ]
        timing = response.timing
        if timing is not None:
            timing.transport(started, decoded, encoding, time.perf_counter_ns())
            if timing_asked(metadata, self.server_timing):
                trailers.append((SERVER_TIMING, timing.header()))
        context.set_trailing_metadata(tuple(trailers))
        return message

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        # An async generator method, as grpc.aio needs to see one, over the stream handler.
        async for answer in self._stream(request_iterator, context):
            yield answer

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        entries = await self.dataplane.repository_index(request.ready, visible=request_access.get().sees)
        return service_pb2.RepositoryIndexResponse(
            models=[
                service_pb2.RepositoryIndexResponse.ModelIndex(
                    name=e.name, version=e.version, state=e.state, reason=e.reason
                )
                for e in entries
            ]
        )

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        parameters = {
            key: getattr(value, value.WhichOneof("parameter_choice") or "string_param")
            for key, value in request.parameters.items()
        }
        config = load_parameters(request.model_name, parameters)
        await self.dataplane.load_model(request.model_name, config)
        return service_pb2.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        await self.dataplane.unload_model(request.model_name)
        return service_pb2.RepositoryModelUnloadResponse()


def _tensor_metadata(spec: TensorSpec) -> Any:
    return service_pb2.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=spec.datatype.value, shape=spec.shape
    )


def _duration(d: Duration) -> Any:
    return service_pb2.StatisticDuration(count=d.count, ns=d.ns)


def _statistics(row: ModelStatistics) -> Any:
    s = row.stats
    return service_pb2.ModelStatistics(
        name=row.name,
        version=row.version,
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=service_pb2.InferStatistics(
            success=_duration(s.success),
            fail=_duration(s.fail),
            queue=_duration(s.queue),
            compute_input=_duration(s.compute_input),
            compute_infer=_duration(s.compute_infer),
            compute_output=_duration(s.compute_output),
            cache_hit=_duration(s.cache_hit),
            cache_miss=_duration(s.cache_miss),
        ),
    )


def _parameters(owner: str, params: Any) -> dict[str, Any]:
    result = {}
    for key, value in params.items():
        if key in _UNSUPPORTED_PARAMETERS:
            raise Unsupported(f"{owner}: parameter {quoted(key)} is not supported by modelyard")
        choice = value.WhichOneof("parameter_choice")
        result[key] = getattr(value, choice) if choice else None
    return result


def decode_infer_request(
    request: Any, limits: InputLimits = DEFAULT_LIMITS, regions: SharedMemoryRegions = NO_SHARED_MEMORY
) -> InferRequest:
    """The request's tensors from raw_input_contents (one entry per input not in shared memory, in
    order), or from the typed contents, or from their shared memory regions."""
    if not request.inputs:
        raise MalformedRequest("the request needs at least one input")
    # Most inputs have no parameters: their owner's name for errors is written only where needed.
    all_parameters = [
        _parameters(f"input {quoted(t.name)}", t.parameters) if t.parameters else {} for t in request.inputs
    ]
    places = [
        regions.place(f"input {quoted(t.name)}", p) if p else None
        for t, p in zip(request.inputs, all_parameters, strict=True)
    ]
    shared = len(places) - places.count(None)
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs) - shared:
        beside = " not in shared memory" if shared else ""
        raise MalformedRequest(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs) - shared} inputs{beside}; "
            "give one per input"
        )
    inputs = []
    next_raw = 0
    reads = RequestReads(limits) if shared else None
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        if not name:
            raise MalformedRequest(f"inputs[{index}] needs a name")
        datatype = parse_datatype_field(name, tensor.datatype)
        shape = parse_shape(name, list(tensor.shape), limits)
        parameters = all_parameters[index]
        place = places[index]
        if place is not None:
            if tensor.HasField("contents"):
                raise MalformedRequest(f"input {quoted(name)} is in shared memory: send no contents for it")
            decoded = regions.read(name, datatype, shape, place, limits, reads)
        elif raw:
            if tensor.HasField("contents"):
                # As Triton refuses it, in Triton's words: which of the two would the model get?
                raise InvalidInput(
                    f"contents field must not be specified when using raw_input_contents for {quoted(name)} "
                    f"for model {quoted(request.model_name)}"
                )
            decoded = tensor_from_buffer(name, datatype, shape, raw[next_raw], limits)
            next_raw += 1
        else:
            decoded = _from_contents(name, datatype, shape, tensor.contents, limits)
        decoded.parameters = parameters
        inputs.append(decoded)
    outputs = []
    for output in request.outputs:
        owner = f"output {quoted(output.name)}"
        parameters = _parameters(owner, output.parameters)
        # A place in shared memory is checked before the model runs, and again when it is written.
        regions.place(owner, parameters)
        outputs.append(RequestedOutput(output.name, parameters))
    return InferRequest(
        model_name=request.model_name,
        model_version=request.model_version or None,
        inputs=inputs,
        outputs=outputs or None,
        id=request.id or None,
        parameters=_parameters("request", request.parameters),
    )


def _from_contents(
    name: str, datatype: Datatype, shape: tuple[int, ...], contents: Any, limits: InputLimits
) -> Tensor:
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise MalformedRequest(
            f"input {quoted(name)}: {datatype} data can only be sent in raw_input_contents"
        )
    return tensor_from_values(name, datatype, shape, list(getattr(contents, field)), limits)


def encode_infer_response(response: InferResponse, regions: SharedMemoryRegions = NO_SHARED_MEMORY) -> Any:
    """The answer, each output in raw_output_contents or written to its shared memory place; an
    output in shared memory keeps its (empty) raw entry, so the entries stay one per output."""
    message = service_pb2.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id or ""
    )
    for key, value in response.parameters.items():
        _set_parameter(message.parameters[key], value)
    for tensor in response.outputs:
        message.outputs.add(name=tensor.name, datatype=tensor.datatype.value, shape=tensor.shape)
        place = (
            regions.place(f"output {quoted(tensor.name)}", tensor.parameters) if tensor.parameters else None
        )
        if place is None:
            message.raw_output_contents.append(tensor_to_bytes(tensor))
        else:
            regions.write(tensor, place)
            message.raw_output_contents.append(b"")
    return message


def _set_parameter(parameter: Any, value: Any) -> None:
    """An InferParameter's one field for the value's type (the response's own parameters: the
    deployment that answered, for a split or a fallback)."""
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int):
        parameter.int64_param = value
    elif isinstance(value, float):
        parameter.double_param = value
    else:
        parameter.string_param = str(value)
