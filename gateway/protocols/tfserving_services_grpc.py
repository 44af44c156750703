"""TF Serving's gRPC services, `tensorflow.serving.PredictionService` and `ModelService`: the
servicers and their messages.

Uses the official `tensorflow-serving-api` protos (the `tensorflow` extra), which import TensorFlow;
tensors cross with `tf.make_ndarray` and `tf.make_tensor_proto`, one call each. This module is
imported only when the first TF Serving gRPC call arrives (gateway.protocols.tfserving_grpc, which
registers the services by name), so a gateway that serves no TensorFlow model and gets no such
call never imports TensorFlow. Errors are mapped by the guard (gateway.protocols.grpc_guard),
which reads the one error table.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import tensorflow as tf
from google.protobuf import message_factory
from tensorflow.core.framework import tensor_shape_pb2, types_pb2
from tensorflow.core.protobuf import error_codes_pb2, meta_graph_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2,
    prediction_service_pb2_grpc,
    status_pb2,
)

from gateway.codec import DEFAULT_LIMITS, InputLimits, check_shape
from gateway.context import REQUEST_ID_HEADER, ContextBuilder, deadline_after, request_id
from gateway.dataplane import DataPlane
from gateway.errors import GatewayError, InvalidInput, MalformedRequest, PayloadTooLarge, Unsupported
from gateway.protocols.tfserving_rest import PREDICT_METHOD, SIGNATURE_NAME, TF_DTYPE_NAME, TF_STATE
from gateway.timing import SERVER_TIMING, timing_asked
from gateway.types import (
    IndexEntry,
    InferRequest,
    InferResponse,
    RequestedOutput,
    Tensor,
    TensorSpec,
    datatype_of,
    quoted,
)

_STATE = get_model_status_pb2.ModelVersionStatus.State


def _version_of(model_spec: Any) -> str | None:
    choice = model_spec.WhichOneof("version_choice")
    if choice == "version":
        return str(model_spec.version.value)
    if choice == "version_label":
        return str(model_spec.version_label) or None
    return None


def _label(model_spec: Any) -> str:
    return f"model '{model_spec.name}' version {_version_of(model_spec) or 'default'}"


def _check_signature(model_spec: Any) -> None:
    name = model_spec.signature_name or SIGNATURE_NAME
    if name != SIGNATURE_NAME:
        raise InvalidInput(
            f"{_label(model_spec)} has no signature {quoted(name)}; it serves '{SIGNATURE_NAME}'"
        )


def _model_spec(name: str, version: str) -> Any:
    spec = model_pb2.ModelSpec(name=name, signature_name=SIGNATURE_NAME)
    if version.isdigit():
        spec.version.value = int(version)
    return spec


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        dataplane: DataPlane,
        contexts: ContextBuilder,
        limits: InputLimits = DEFAULT_LIMITS,
        server_timing: bool = False,
    ) -> None:
        self.dataplane = dataplane
        self.contexts = contexts
        self.limits = limits
        # Server-Timing in every Predict's trailing metadata; else only where a call asks for it.
        self.server_timing = server_timing

    async def Predict(self, request: Any, context: Any) -> Any:
        started = time.perf_counter_ns()
        metadata = ContextBuilder.grpc_metadata(context.invocation_metadata())
        try:
            infer_request = decode_predict(request, self.limits)
            request_context = self.contexts.build(
                "tfserving_grpc", metadata, transport_deadline=deadline_after(context.time_remaining())
            )
        except GatewayError as exc:
            exc.request_id = request_id(metadata.get(REQUEST_ID_HEADER))
            raise
        decoded = time.perf_counter_ns()
        response = await self.dataplane.infer(infer_request, request_context)
        encoding = time.perf_counter_ns()
        message = encode_predict(response)
        trailers = [(REQUEST_ID_HEADER, request_context.request_id)]
        if response.timing is not None:
            response.timing.transport(started, decoded, encoding, time.perf_counter_ns())
            if timing_asked(metadata, self.server_timing):
                trailers.append((SERVER_TIMING, response.timing.header()))
        context.set_trailing_metadata(tuple(trailers))
        return message

    async def GetModelMetadata(self, request: Any, context: Any) -> Any:
        spec = request.model_spec
        fields = list(request.metadata_field)
        if fields != ["signature_def"]:
            raise InvalidInput(
                f"{_label(spec)}: metadata_field must be ['signature_def'], the only metadata served; got {fields}"
            )
        meta = await self.dataplane.model_metadata(spec.name, _version_of(spec))
        signature = meta_graph_pb2.SignatureDef(method_name=PREDICT_METHOD)
        for source, target in ((meta.inputs, signature.inputs), (meta.outputs, signature.outputs)):
            for tensor in source:
                target[tensor.name].CopyFrom(tensor_info(tensor))
        signatures = get_model_metadata_pb2.SignatureDefMap()
        signatures.signature_def[SIGNATURE_NAME].CopyFrom(signature)
        response = get_model_metadata_pb2.GetModelMetadataResponse(
            model_spec=_model_spec(spec.name, meta.version)
        )
        response.metadata["signature_def"].Pack(signatures)
        return response

    async def Classify(self, request: Any, context: Any) -> Any:
        await self._unsupported(request.model_spec, "Classify")

    async def Regress(self, request: Any, context: Any) -> Any:
        await self._unsupported(request.model_spec, "Regress")

    async def _unsupported(self, spec: Any, method: str) -> None:
        # An unknown model is NOT_FOUND before anything else is said of it.
        await self.dataplane.model_metadata(spec.name, _version_of(spec))
        raise Unsupported(f"{_label(spec)}: {method} is not supported by modelyard; use Predict")

    async def MultiInference(self, request: Any, context: Any) -> Any:
        raise Unsupported("MultiInference is not supported by modelyard; use Predict")


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):  # type: ignore[misc]
    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    async def GetModelStatus(self, request: Any, context: Any) -> Any:
        spec = request.model_spec
        entries = await self.dataplane.model_status(spec.name, _version_of(spec))
        return get_model_status_pb2.GetModelStatusResponse(
            model_version_status=[version_status(e) for e in entries]
        )

    async def HandleReloadConfigRequest(self, request: Any, context: Any) -> Any:
        raise Unsupported(
            "HandleReloadConfigRequest is not supported by modelyard; use the v2 repository load/unload API"
        )


def methods(
    dataplane: DataPlane,
    contexts: ContextBuilder,
    limits: InputLimits = DEFAULT_LIMITS,
    server_timing: bool = False,
) -> dict[str, tuple[Any, Callable[[Any, Any], Awaitable[Any]]]]:
    """Each method (`/package.Service/Method`): its request message's class and its servicer's method."""
    prediction = PredictionServicer(dataplane, contexts, limits, server_timing)
    model = ModelServicer(dataplane)
    found: dict[str, tuple[Any, Callable[[Any, Any], Awaitable[Any]]]] = {}
    for module, servicer in ((prediction_service_pb2, prediction), (model_service_pb2, model)):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                request_type = message_factory.GetMessageClass(method.input_type)
                found[f"/{service.full_name}/{method.name}"] = (request_type, getattr(servicer, method.name))
    return found


def version_status(entry: IndexEntry) -> Any:
    ok = entry.state == "READY"
    return get_model_status_pb2.ModelVersionStatus(
        version=int(entry.version),
        state=_STATE.Value(TF_STATE.get(entry.state, "UNKNOWN")),
        status=status_pb2.StatusProto(
            error_code=error_codes_pb2.OK if ok else error_codes_pb2.UNAVAILABLE,
            error_message="" if ok else entry.reason,
        ),
    )


def tensor_info(spec: TensorSpec) -> Any:
    return meta_graph_pb2.TensorInfo(
        name=spec.name,
        dtype=types_pb2.DataType.Value(TF_DTYPE_NAME[spec.datatype]),
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in spec.shape]
        ),
    )


def decode_predict(request: Any, limits: InputLimits = DEFAULT_LIMITS) -> InferRequest:
    spec = request.model_spec
    _check_signature(spec)
    if not spec.name:
        raise MalformedRequest("model_spec.name is required")
    if not request.inputs:
        raise MalformedRequest(f"{_label(spec)}: the request needs at least one input")
    inputs = []
    for name, proto in request.inputs.items():
        check_tensor_proto(f"{_label(spec)}: input {quoted(name)}", proto, limits)
        try:
            array = tf.make_ndarray(proto)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(
                f"{_label(spec)}: input {quoted(name)} is not a valid TensorProto: {exc}"
            ) from None
        try:
            datatype = datatype_of(array.dtype)
        except ValueError as exc:
            raise InvalidInput(f"{_label(spec)}: input {quoted(name)}: {exc}") from None
        inputs.append(Tensor(name, datatype, tuple(array.shape), array))
    return InferRequest(
        model_name=spec.name,
        model_version=_version_of(spec),
        inputs=inputs,
        outputs=[RequestedOutput(name) for name in request.output_filter] or None,
    )


def check_tensor_proto(label: str, proto: Any, limits: InputLimits) -> None:
    """Shape, dtype and data length agree, within the limits, before tf.make_ndarray allocates:
    it would fill a huge shape from a single value, or from none."""
    if proto.tensor_shape.unknown_rank:
        raise InvalidInput(f"{label}: the shape has unknown rank")
    shape = check_shape(label, tuple(d.size for d in proto.tensor_shape.dim), limits)
    count = math.prod(shape)
    try:
        dtype = tf.dtypes.as_dtype(proto.dtype)
    except TypeError:
        raise InvalidInput(f"{label}: dtype {proto.dtype} is not a TensorFlow DataType") from None
    if dtype == tf.string:
        values = proto.string_val
        too_long = next((len(v) for v in values if len(v) > limits.max_bytes_element), None)
        if too_long is not None:
            raise PayloadTooLarge(
                f"{label}: a string of {too_long} bytes is over the limit of {limits.max_bytes_element} "
                "(MODELYARD_MAX_BYTES_ELEMENT_MB)"
            )
        found = len(values)
    elif not dtype.is_numpy_compatible or dtype.is_quantized or dtype.is_complex:
        raise InvalidInput(f"{label}: dtype {dtype.name} is not served by modelyard")
    elif proto.tensor_content:
        expected = count * dtype.size
        if len(proto.tensor_content) != expected:
            raise InvalidInput(
                f"{label}: shape {list(shape)} of {dtype.name} needs {expected} bytes of tensor_content, "
                f"got {len(proto.tensor_content)}"
            )
        return
    else:
        found = sum(len(value) for field, value in proto.ListFields() if field.name.endswith("_val"))
    if found != count:
        raise InvalidInput(f"{label}: shape {list(shape)} needs {count} values, got {found}")


def encode_predict(response: InferResponse) -> Any:
    message = predict_pb2.PredictResponse(model_spec=_model_spec(response.model_name, response.model_version))
    for tensor in response.outputs:
        message.outputs[tensor.name].CopyFrom(tf.make_tensor_proto(tensor.data))
    return message
