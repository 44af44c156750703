"""Open Inference Protocol v2 over REST, with Triton's binary tensor data extension.

This module only translates between HTTP and the data plane's types.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response

from gateway.auth import request_access
from gateway.codec import (
    DEFAULT_LIMITS,
    InputLimits,
    JsonArray,
    body_limit,
    json_numbers,
    parse_datatype_field,
    parse_shape,
    tensor_from_buffer,
    tensor_from_json_array,
    tensor_from_values,
    tensor_to_bytes,
    tensor_to_values,
)
from gateway.context import REQUEST_ID_HEADER, ContextBuilder, request_id
from gateway.dataplane import DataPlane
from gateway.errors import GatewayError, MalformedRequest, PayloadTooLarge, Unsupported
from gateway.protocols.openapi import V2_REPOSITORY_INDEX_REQUEST, V2_REPOSITORY_LOAD_REQUEST, request_body
from gateway.protocols.triton import load_parameters
from gateway.protocols.triton import model_config as triton_model_config
from gateway.protocols.v2_json import decompress, is_placeholder, json_object, split_data_arrays
from gateway.timing import SERVER_TIMING
from gateway.types import (
    Duration,
    InferRequest,
    InferResponse,
    ModelStatistics,
    RequestedOutput,
    Tensor,
    quoted,
)

Endpoint = TypeVar("Endpoint", bound=Callable[..., Awaitable[Response]])
HEADER_LENGTH = "inference-header-content-length"
VERSION_HEADER = "X-Model-Version"
RESPONSE_ID_HEADER = "X-Request-ID"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
_NUMPY_JSON = orjson.OPT_SERIALIZE_NUMPY
# Parameters that ask for features this gateway does not implement: refuse them, never ignore.
_UNSUPPORTED_PARAMETERS = ("shared_memory_region", "classification")


def json_response(content: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(content, option=_NUMPY_JSON), status_code=status_code, media_type=JSON_TYPE)


def v2_router(dataplane: DataPlane, limits: InputLimits = DEFAULT_LIMITS) -> APIRouter:
    router = APIRouter()

    def route(
        method: str, path: str, versioned: bool = True, body: dict[str, Any] | None = None
    ) -> Callable[[Endpoint], Endpoint]:
        def register(endpoint: Endpoint) -> Endpoint:
            router.add_api_route(
                path.replace("{model}", "/v2/models/{model_name}"),
                endpoint,
                methods=[method],
                openapi_extra=body,
            )
            if versioned:
                versioned_path = path.replace("{model}", "/v2/models/{model_name}/versions/{model_version}")
                router.add_api_route(versioned_path, endpoint, methods=[method], openapi_extra=body)
            return endpoint

        return register

    @route("GET", "/v2/health/live", versioned=False)
    async def live() -> Response:
        live = dataplane.live()
        return json_response({"live": live}, 200 if live else 503)

    @route("GET", "/v2/health/ready", versioned=False)
    async def ready() -> Response:
        ready = dataplane.ready()
        return json_response({"ready": ready}, 200 if ready else 503)

    @route("GET", "/v2", versioned=False)
    async def server_metadata() -> Response:
        meta = dataplane.server_metadata()
        return json_response(
            {"name": meta.name, "version": meta.version, "extensions": list(meta.extensions)}
        )

    # Before the model routes, which would take 'stats' for a model name.
    @route("GET", "/v2/models/stats", versioned=False)
    async def all_stats() -> Response:
        return json_response(_statistics(dataplane.statistics(None, None, visible=request_access.get().sees)))

    @route("GET", "{model}/ready")
    async def model_ready(model_name: str, model_version: str | None = None) -> Response:
        ready = await dataplane.model_ready(model_name, model_version)
        return json_response({"name": model_name, "ready": ready}, 200 if ready else 503)

    @route("GET", "{model}")
    async def model_metadata(model_name: str, model_version: str | None = None) -> Response:
        meta = await dataplane.model_metadata(model_name, model_version)
        return json_response(
            {
                "name": meta.name,
                "versions": list(meta.versions),
                "platform": meta.platform,
                "inputs": [_tensor_metadata(s) for s in meta.inputs],
                "outputs": [_tensor_metadata(s) for s in meta.outputs],
            }
        )

    @route("GET", "{model}/config")
    async def model_config(model_name: str, model_version: str | None = None) -> Response:
        return json_response(
            triton_model_config(await dataplane.model_description(model_name, model_version))
        )

    @route("GET", "{model}/stats")
    async def model_stats(model_name: str, model_version: str | None = None) -> Response:
        return json_response(_statistics(dataplane.statistics(model_name, model_version)))

    # POST {model}/infer is served by `infer`, mounted by the HTTP app ahead of this router.

    @route(
        "POST", "/v2/repository/index", versioned=False, body=request_body(V2_REPOSITORY_INDEX_REQUEST, False)
    )
    async def repository_index(request: Request) -> Response:
        body = await request.body()
        options = json_object(body, limits) if body.strip() else {}
        ready = bool(options.get("ready", False))
        entries = await dataplane.repository_index(ready, visible=request_access.get().sees)
        return json_response(
            [
                {
                    "name": e.name,
                    "version": e.version,
                    "state": e.state,
                    **({"reason": e.reason} if e.reason else {}),
                }
                for e in entries
            ]
        )

    @route(
        "POST",
        "/v2/repository/models/{model_name}/load",
        versioned=False,
        body=request_body(V2_REPOSITORY_LOAD_REQUEST, False),
    )
    async def repository_load(model_name: str, request: Request) -> Response:
        body = await request.body()
        options = json_object(body, limits) if body.strip() else {}
        parameters = options.get("parameters", {})
        if not isinstance(parameters, dict):
            raise MalformedRequest(f"failed to load '{model_name}', 'parameters' must be a JSON object")
        await dataplane.load_model(model_name, load_parameters(model_name, parameters))
        return json_response({})

    @route("POST", "/v2/repository/models/{model_name}/unload", versioned=False)
    async def repository_unload(model_name: str) -> Response:
        await dataplane.unload_model(model_name)
        return json_response({})

    return router


async def infer(
    dataplane: DataPlane,
    contexts: ContextBuilder,
    body: bytes | bytearray,
    headers: Mapping[str, str],
    model_name: str,
    model_version: str | None,
    limits: InputLimits = DEFAULT_LIMITS,
) -> Response:
    """POST /v2/models/{name}[/versions/{version}]/infer: decode, run, encode; the answer says
    where its time went in a Server-Timing header."""
    started = time.perf_counter_ns()
    try:
        header_length = headers.get(HEADER_LENGTH)
        body = decompress(body, headers.get("content-encoding"), limits, binary=header_length is not None)
        infer_request = decode_infer_request(body, header_length, model_name, model_version, limits)
        context = contexts.build("rest", headers, infer_request.parameters, body_id=infer_request.id)
    except GatewayError as exc:
        exc.request_id = request_id(headers.get(REQUEST_ID_HEADER))
        raise
    decoded = time.perf_counter_ns()
    response = await dataplane.infer(infer_request, context)
    encoding = time.perf_counter_ns()
    answer = encode_infer_response(response, infer_request, context.request_id)
    timing = response.timing
    if timing is not None:
        timing.transport(started, decoded, encoding, time.perf_counter_ns())
        answer.headers[SERVER_TIMING] = timing.header()
    return answer


def _tensor_metadata(spec: Any) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype.value, "shape": list(spec.shape)}


def _duration(d: Duration) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


def _statistics(rows: list[ModelStatistics]) -> dict[str, Any]:
    return {
        "model_stats": [
            {
                "name": row.name,
                "version": row.version,
                "last_inference": row.stats.last_inference_ms,
                "inference_count": row.stats.inference_count,
                "execution_count": row.stats.execution_count,
                "inference_stats": {
                    "success": _duration(row.stats.success),
                    "fail": _duration(row.stats.fail),
                    "queue": _duration(row.stats.queue),
                    "compute_input": _duration(row.stats.compute_input),
                    "compute_infer": _duration(row.stats.compute_infer),
                    "compute_output": _duration(row.stats.compute_output),
                    "cache_hit": _duration(Duration()),
                    "cache_miss": _duration(Duration()),
                },
                "batch_stats": [],
            }
            for row in rows
        ]
    }


def _parameters(owner: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MalformedRequest(f"{owner}: 'parameters' must be an object")
    for name in _UNSUPPORTED_PARAMETERS:
        if name in value:
            raise Unsupported(f"{owner}: parameter {quoted(name)} is not supported by modelyard")
    return value


def decode_infer_request(
    body: bytes | bytearray,
    header_length: str | None,
    model_name: str,
    model_version: str | None,
    limits: InputLimits = DEFAULT_LIMITS,
) -> InferRequest:
    """A v2 infer request from JSON, or from a JSON header followed by binary tensor data."""
    limit, setting = body_limit(limits, binary=header_length is not None)
    if len(body) > limit:
        raise PayloadTooLarge(f"the body has {len(body)} bytes, over the limit of {limit} ({setting})")
    if header_length is None:
        text, arrays = split_data_arrays(body)
        if arrays:
            header = json_object(text, limits)
            request = _decode(header, memoryview(b""), arrays, model_name, model_version, limits)
            if request is not None:
                return request
            # A cut-out array was not where a `data` list belongs: read the body whole.
        return _decode_all(json_object(body, limits), memoryview(b""), model_name, model_version, limits)
    try:
        length = int(header_length)
    except ValueError:
        raise MalformedRequest("Inference-Header-Content-Length must be an integer") from None
    if not 0 <= length <= len(body):
        raise MalformedRequest(
            f"Inference-Header-Content-Length is {length} but the body has only {len(body)} bytes"
        )
    json_limit, json_setting = body_limit(limits, binary=False)
    if length > json_limit:
        raise PayloadTooLarge(
            f"the JSON header has {length} bytes, over the limit of {json_limit} ({json_setting})"
        )
    view = memoryview(body)
    return _decode_all(json_object(view[:length], limits), view[length:], model_name, model_version, limits)


def _decode_all(
    header: dict[str, Any],
    binary: memoryview,
    model_name: str,
    model_version: str | None,
    limits: InputLimits,
) -> InferRequest:
    request = _decode(header, binary, None, model_name, model_version, limits)
    assert request is not None  # only a cut-out array can be misplaced
    return request


def _decode(
    header: dict[str, Any],
    binary: memoryview,
    arrays: dict[str, JsonArray] | None,
    model_name: str,
    model_version: str | None,
    limits: InputLimits,
) -> InferRequest | None:
    """The request from its parsed header and the arrays cut out of it (None: none were); None when
    a cut-out array was not where a `data` list is."""
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise MalformedRequest("the request needs a non-empty 'inputs' list")
    pending = None if arrays is None else dict(arrays)
    inputs: list[Tensor] = []
    offset = 0
    for index, raw in enumerate(raw_inputs):
        decoded = _decode_input(index, raw, binary, offset, limits, pending)
        if decoded is None:
            return None
        tensor, offset = decoded
        inputs.append(tensor)
    if pending:
        return None
    if offset != len(binary):
        raise MalformedRequest(f"{len(binary) - offset} bytes of binary data follow the last input")

    outputs = None
    raw_outputs = header.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise MalformedRequest("'outputs' must be a list")
        outputs = [_decode_output(index, raw) for index, raw in enumerate(raw_outputs)]
    body_id = header.get("id")
    if body_id is not None and not isinstance(body_id, str):
        raise MalformedRequest("'id' must be a string")
    return InferRequest(
        model_name=model_name,
        model_version=model_version,
        inputs=inputs,
        outputs=outputs,
        id=body_id,
        parameters=_parameters("request", header.get("parameters")),
    )


def _decode_input(
    index: int,
    raw: Any,
    binary: memoryview,
    offset: int,
    limits: InputLimits,
    arrays: dict[str, JsonArray] | None,
) -> tuple[Tensor, int] | None:
    if not isinstance(raw, dict):
        raise MalformedRequest(f"inputs[{index}] must be an object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise MalformedRequest(f"inputs[{index}] needs a 'name' string")
    datatype = parse_datatype_field(name, raw.get("datatype"))
    shape = parse_shape(name, raw.get("shape"), limits)
    parameters = _parameters(f"input {quoted(name)}", raw.get("parameters"))
    size = parameters.get("binary_data_size")
    if size is None:
        if "data" not in raw:
            raise MalformedRequest(
                f"input {quoted(name)} has neither 'data' nor a binary_data_size parameter"
            )
        data = raw["data"]
        if arrays is not None and is_placeholder(data):
            array = arrays.pop(data, None)
            if array is None:
                return None
            tensor = tensor_from_json_array(name, datatype, shape, array, limits)
        else:
            tensor = tensor_from_values(name, datatype, shape, data, limits)
    else:
        if "data" in raw:
            raise MalformedRequest(
                f"input {quoted(name)} has both 'data' and a binary_data_size parameter: send its values one way"
            )
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise MalformedRequest(f"input {quoted(name)}: binary_data_size must be a non-negative integer")
        if offset + size > len(binary):
            raise MalformedRequest(
                f"input {quoted(name)}: binary_data_size is {size} but only {len(binary) - offset} bytes of "
                "binary data remain: the body is truncated"
            )
        tensor = tensor_from_buffer(name, datatype, shape, binary[offset : offset + size], limits)
        offset += size
    tensor.parameters = parameters
    return tensor, offset


def _decode_output(index: int, raw: Any) -> RequestedOutput:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise MalformedRequest(f"outputs[{index}] must be an object with a 'name'")
    return RequestedOutput(raw["name"], _parameters(f"output {quoted(raw['name'])}", raw.get("parameters")))


def encode_infer_response(response: InferResponse, request: InferRequest, request_id: str) -> Response:
    binary_default = bool(request.parameters.get("binary_data_output", False))
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for tensor in response.outputs:
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype.value,
            "shape": list(tensor.shape),
        }
        if bool(tensor.parameters.get("binary_data", binary_default)):
            chunk = tensor_to_bytes(tensor)
            chunks.append(chunk)
            entry["parameters"] = {"binary_data_size": len(chunk)}
        else:
            entry["data"] = tensor_to_values(tensor)
        outputs.append(entry)
    header: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id is not None:
        header["id"] = response.id
    if response.parameters:
        header["parameters"] = response.parameters
    header["outputs"] = outputs
    encoded = orjson.dumps(header, option=_NUMPY_JSON)
    if b"null" in encoded:
        # orjson writes NaN and infinities as null: write those tensors again, as Triton does.
        for entry in outputs:
            if isinstance(entry.get("data"), np.ndarray):
                entry["data"] = json_numbers(entry["data"])
        encoded = orjson.dumps(header, option=_NUMPY_JSON)
    # The version that answered, for clients that route by header or traffic split.
    headers = {VERSION_HEADER: response.model_version, RESPONSE_ID_HEADER: request_id}
    if not chunks:
        return Response(encoded, media_type=JSON_TYPE, headers=headers)
    headers["Inference-Header-Content-Length"] = str(len(encoded))
    return Response(b"".join([encoded, *chunks]), media_type=BINARY_TYPE, headers=headers)
