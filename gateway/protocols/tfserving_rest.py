"""TF Serving's REST API, for every model in the gateway whatever its backend.

`/v1/models/{m}[/versions/{v}|/labels/{l}]` answers the model's status, `.../metadata` its
signature, and `...:predict` runs it, in row ("instances" -> "predictions") or columnar
("inputs" -> "outputs") form, with `{"b64": ...}` for binary strings. Each gateway model is one
signature, `serving_default`. This module only translates between HTTP and the data plane's types.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response

from gateway.codec import DEFAULT_LIMITS, InputLimits, json_numbers, tensor_from_values
from gateway.context import REQUEST_ID_HEADER, ContextBuilder, request_id
from gateway.dataplane import DataPlane
from gateway.errors import GatewayError, InvalidInput, MalformedRequest, ModelNotFound, Unsupported
from gateway.protocols.openapi import TF_PREDICT_REQUEST, request_body
from gateway.protocols.v2_json import json_object
from gateway.protocols.v2_rest import RESPONSE_ID_HEADER, json_response
from gateway.timing import SERVER_TIMING
from gateway.types import (
    Datatype,
    IndexEntry,
    InferRequest,
    InferResponse,
    ModelSignature,
    Tensor,
    TensorSpec,
    quoted,
)

Endpoint = TypeVar("Endpoint", bound=Callable[..., Awaitable[Response]])
SIGNATURE_NAME = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"
# TF Serving's DataType names for the v2 datatypes (tensorflow/core/framework/types.proto).
TF_DTYPE_NAME: dict[Datatype, str] = {
    Datatype.BOOL: "DT_BOOL",
    Datatype.UINT8: "DT_UINT8",
    Datatype.UINT16: "DT_UINT16",
    Datatype.UINT32: "DT_UINT32",
    Datatype.UINT64: "DT_UINT64",
    Datatype.INT8: "DT_INT8",
    Datatype.INT16: "DT_INT16",
    Datatype.INT32: "DT_INT32",
    Datatype.INT64: "DT_INT64",
    Datatype.FP16: "DT_HALF",
    Datatype.FP32: "DT_FLOAT",
    Datatype.FP64: "DT_DOUBLE",
    Datatype.BYTES: "DT_STRING",
}
# The registry's states in TF Serving's ModelVersionStatus.State names.
TF_STATE: dict[str, str] = {
    "READY": "AVAILABLE",
    "LOADING": "LOADING",
    "UNLOADING": "UNLOADING",
    "UNAVAILABLE": "END",
}
_NUMPY_JSON = orjson.OPT_SERIALIZE_NUMPY


def tfserving_router(
    dataplane: DataPlane, contexts: ContextBuilder, limits: InputLimits = DEFAULT_LIMITS
) -> APIRouter:
    router = APIRouter()

    def route(method: str, suffix: str, body: dict[str, Any] | None = None) -> Callable[[Endpoint], Endpoint]:
        def register(endpoint: Endpoint) -> Endpoint:
            for prefix in (
                "/v1/models/{model_name}",
                "/v1/models/{model_name}/versions/{model_version}",
                "/v1/models/{model_name}/labels/{model_label}",
            ):
                router.add_api_route(prefix + suffix, endpoint, methods=[method], openapi_extra=body)
            return endpoint

        return register

    @route("GET", "")
    async def status(
        model_name: str, model_version: str | None = None, model_label: str | None = None
    ) -> Response:
        entries = await dataplane.model_status(model_name, requested(model_name, model_version, model_label))
        return json_response({"model_version_status": [version_status(e) for e in entries]})

    @route("GET", "/metadata")
    async def metadata(
        model_name: str, model_version: str | None = None, model_label: str | None = None
    ) -> Response:
        meta = await dataplane.model_metadata(model_name, requested(model_name, model_version, model_label))
        signature = {
            "inputs": {s.name: tensor_info(s) for s in meta.inputs},
            "outputs": {s.name: tensor_info(s) for s in meta.outputs},
            "method_name": PREDICT_METHOD,
        }
        return json_response(
            {
                "model_spec": {"name": model_name, "signature_name": "", "version": meta.version},
                "metadata": {"signature_def": {"signature_def": {SIGNATURE_NAME: signature}}},
            }
        )

    @route("POST", ":predict", body=request_body(TF_PREDICT_REQUEST))
    async def predict(
        request: Request, model_name: str, model_version: str | None = None, model_label: str | None = None
    ) -> Response:
        try:
            raw = await request.body()
            started = time.perf_counter_ns()
            version = requested(model_name, model_version, model_label)
            infer_request, columnar = decode_predict(json_object(raw, limits), model_name, version, limits)
            context = contexts.build("tfserving_rest", request.headers)
        except GatewayError as exc:
            exc.request_id = request_id(request.headers.get(REQUEST_ID_HEADER))
            raise
        decoded = time.perf_counter_ns()
        response = await dataplane.infer(infer_request, context)
        encoding = time.perf_counter_ns()
        headers = {RESPONSE_ID_HEADER: context.request_id}
        body = encode_predict(response, columnar)
        if response.timing is not None:
            response.timing.transport(started, decoded, encoding, time.perf_counter_ns())
            headers[SERVER_TIMING] = response.timing.header()
        return Response(body, media_type="application/json", headers=headers)

    async def unsupported(
        model_name: str, model_version: str | None = None, model_label: str | None = None
    ) -> Response:
        # An unknown model is 404 before anything else is said of it.
        await dataplane.model_metadata(model_name, requested(model_name, model_version, model_label))
        raise Unsupported(
            f"model '{model_name}' version {model_version or model_label or 'default'}: "
            "classify and regress are not supported by modelyard; use :predict"
        )

    route("POST", ":classify")(unsupported)
    route("POST", ":regress")(unsupported)
    return router


def requested(model_name: str, version: str | None, label: str | None) -> str | None:
    """The version or label a URL names; /versions/ takes numbers only, as in TF Serving."""
    if version is not None and not version.isdigit():
        raise ModelNotFound(
            f"model '{model_name}' has no version '{version}': versions are numbers; "
            f"a label goes in /labels/{version}"
        )
    return version or label


def version_status(entry: IndexEntry) -> dict[str, Any]:
    ok = entry.state == "READY"
    return {
        "version": entry.version,
        "state": TF_STATE.get(entry.state, "UNKNOWN"),
        "status": {"error_code": "OK" if ok else "UNAVAILABLE", "error_message": "" if ok else entry.reason},
    }


def tensor_info(spec: TensorSpec) -> dict[str, Any]:
    return {
        "dtype": TF_DTYPE_NAME[spec.datatype],
        "tensor_shape": {"dim": [{"size": str(d), "name": ""} for d in spec.shape], "unknown_rank": False},
        "name": spec.name,
    }


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and "b64" in value


def decode_predict(
    body: dict[str, Any], model_name: str, version: str | None, limits: InputLimits = DEFAULT_LIMITS
) -> tuple[InferRequest, bool]:
    """An InferRequest from a predict body, and whether it was columnar ("inputs").

    JSON numbers carry no datatype and rows may leave the input unnamed, so the tensors are built
    against the signature of the version routing picks (`InferRequest.decode`), once it has.
    """
    label = f"model '{model_name}' version {version or 'default'}"
    signature_name = body.get("signature_name") or SIGNATURE_NAME
    if signature_name != SIGNATURE_NAME:
        raise InvalidInput(f"{label} has no signature {quoted(signature_name)}; it serves '{SIGNATURE_NAME}'")
    if ("instances" in body) == ("inputs" in body):
        raise MalformedRequest(
            "a predict request needs exactly one of 'instances' (rows) or 'inputs' (columns)"
        )
    columnar = "inputs" in body
    data = body["inputs"] if columnar else body["instances"]
    if not columnar and (not isinstance(data, list) or not data):
        raise MalformedRequest("'instances' must be a non-empty list")

    def decode(signature: ModelSignature) -> list[Tensor]:
        specs = signature.inputs
        by_name = {spec.name: spec for spec in specs}
        inputs = []
        for name, values in _columns(data, columnar, specs, label).items():
            spec = by_name.get(name)
            if spec is None:
                raise InvalidInput(
                    f"{label} has no input {quoted(name)}; its inputs are {', '.join(by_name)}"
                )
            inputs.append(_tensor(name, spec.datatype, values, limits))
        return inputs

    return InferRequest(model_name=model_name, model_version=version, inputs=[], decode=decode), columnar


def _columns(data: Any, columnar: bool, specs: tuple[TensorSpec, ...], label: str) -> dict[str, Any]:
    if columnar:
        if isinstance(data, dict) and not _is_b64(data):
            return data
        return {_only_input(specs, label): data}
    if not isinstance(data, list) or not data:
        raise MalformedRequest("'instances' must be a non-empty list")
    named = [isinstance(row, dict) and not _is_b64(row) for row in data]
    if not any(named):
        return {_only_input(specs, label): data}
    if not all(named):
        raise MalformedRequest("'instances' mixes objects of named inputs with bare values")
    keys = list(data[0])
    if any(list(row) != keys and set(row) != set(keys) for row in data):
        raise MalformedRequest("every instance must name the same inputs")
    return {key: [row[key] for row in data] for key in keys}


def _only_input(specs: tuple[TensorSpec, ...], label: str) -> str:
    if len(specs) != 1:
        raise InvalidInput(
            f"{label} has inputs {', '.join(s.name for s in specs)}: name them in each instance or in 'inputs'"
        )
    return specs[0].name


def _tensor(name: str, datatype: Datatype, values: Any, limits: InputLimits) -> Tensor:
    if datatype is Datatype.BYTES:
        values = _decode_strings(name, values, limits.max_json_depth)
    try:
        array = np.array(values, dtype=object if datatype is Datatype.BYTES else None)
    except ValueError as exc:
        raise InvalidInput(f"input {quoted(name)}: the data is not a regular nested list ({exc})") from None
    return tensor_from_values(name, datatype, tuple(array.shape), array, limits)


def _decode_strings(name: str, values: Any, depth_left: int) -> Any:
    """Nested lists with `{"b64": ...}` objects decoded to bytes and text encoded as UTF-8."""
    if isinstance(values, list):
        if depth_left <= 0:
            raise MalformedRequest(f"input {quoted(name)}: the data is nested too deeply")
        return [_decode_strings(name, v, depth_left - 1) for v in values]
    if _is_b64(values):
        try:
            return base64.b64decode(values["b64"], validate=True)
        except (binascii.Error, TypeError) as exc:
            raise InvalidInput(f"input {quoted(name)}: a b64 value is not valid base64 ({exc})") from None
    if isinstance(values, str):
        return values.encode("utf-8")
    raise InvalidInput(f'input {quoted(name)}: string data must be text or {{"b64": ...}} objects')


def _json_values(tensor: Tensor) -> Any:
    """The tensor as values orjson can write: a numpy array, or nested lists of strings."""
    if tensor.datatype is not Datatype.BYTES:
        return np.ascontiguousarray(tensor.data)
    # TF Serving's rule: outputs named *_bytes are base64; so is any value that is not UTF-8 text.
    always_b64 = tensor.name.endswith("_bytes")
    flat = []
    for value in tensor.data.ravel():
        raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
        text = None if always_b64 else _utf8(raw)
        flat.append({"b64": base64.b64encode(raw).decode("ascii")} if text is None else text)
    return np.array(flat, dtype=object).reshape(tensor.data.shape).tolist()


def _utf8(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def encode_predict(response: InferResponse, columnar: bool) -> bytes:
    values = {tensor.name: _json_values(tensor) for tensor in response.outputs}
    if columnar:
        outputs = _numbers(next(iter(values.values()))) if len(values) == 1 else _all_numbers(values)
        return orjson.dumps({"outputs": outputs}, option=_NUMPY_JSON)
    if len(values) == 1:
        return orjson.dumps({"predictions": _numbers(next(iter(values.values())))}, option=_NUMPY_JSON)
    rows = {np.shape(v)[0] if np.ndim(v) else None for v in values.values()}
    if len(rows) != 1 or None in rows:
        raise InvalidInput(
            f"model '{response.model_name}' version {response.model_version}: outputs have different "
            "batch sizes, so they cannot be returned as rows; send 'inputs' (columnar) instead"
        )
    count: int = rows.pop()  # type: ignore[assignment]
    predictions = [
        _all_numbers({name: value[index] for name, value in values.items()}) for index in range(count)
    ]
    return orjson.dumps({"predictions": predictions}, option=_NUMPY_JSON)


def _numbers(value: Any) -> Any:
    """NaN and infinities as TF Serving writes them (`NaN`, `Infinity`), not as orjson's null."""
    if isinstance(value, np.floating):  # one row's value of a 1-D output
        return value if np.isfinite(value) else orjson.Fragment(json.dumps(float(value)))
    return json_numbers(value) if isinstance(value, np.ndarray) else value


def _all_numbers(values: dict[str, Any]) -> dict[str, Any]:
    return {name: _numbers(value) for name, value in values.items()}
