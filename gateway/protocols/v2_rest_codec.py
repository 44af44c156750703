"""The v2 REST infer body and the data plane's types, both ways: a JSON request (or a JSON
header followed by Triton's binary tensor data) decoded into an InferRequest, and an
InferResponse encoded as JSON or binary. Inputs and outputs in shared memory are read from and
written to their registered regions here, so the data plane sees plain tensors."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from fastapi import Response

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
from gateway.errors import MalformedRequest, PayloadTooLarge, Unsupported
from gateway.protocols.shared_memory import (
    BYTE_SIZE,
    NO_SHARED_MEMORY,
    OFFSET,
    REGION,
    RequestReads,
    SharedMemoryRegions,
)
from gateway.protocols.v2_json import is_placeholder, json_object, split_data_arrays
from gateway.types import InferRequest, InferResponse, RequestedOutput, Tensor, quoted

HEADER_LENGTH = "inference-header-content-length"
VERSION_HEADER = "X-Model-Version"
RESPONSE_ID_HEADER = "X-Request-ID"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
_JSON, _BINARY = JSON_TYPE.encode(), BINARY_TYPE.encode()
_VERSION, _RESPONSE_ID = VERSION_HEADER.lower().encode(), RESPONSE_ID_HEADER.lower().encode()
_NUMPY_JSON = orjson.OPT_SERIALIZE_NUMPY
# Parameters that ask for features this gateway does not implement: refuse them, never ignore.
_UNSUPPORTED_PARAMETERS = ("classification",)


def json_response(content: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(content, option=_NUMPY_JSON), status_code=status_code, media_type=JSON_TYPE)


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
    regions: SharedMemoryRegions = NO_SHARED_MEMORY,
) -> InferRequest:
    """A v2 infer request from JSON, or from a JSON header followed by binary tensor data; inputs
    in shared memory are read from their registered regions."""
    limit, setting = body_limit(limits, binary=header_length is not None)
    if len(body) > limit:
        raise PayloadTooLarge(f"the body has {len(body)} bytes, over the limit of {limit} ({setting})")
    if header_length is None:
        text, arrays = split_data_arrays(body)
        if arrays:
            header = json_object(text, limits)
            request = _decode(header, memoryview(b""), arrays, model_name, model_version, limits, regions)
            if request is not None:
                return request
            # A cut-out array was not where a `data` list belongs: read the body whole.
        return _decode_all(
            json_object(body, limits), memoryview(b""), model_name, model_version, limits, regions
        )
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
    return _decode_all(
        json_object(view[:length], limits), view[length:], model_name, model_version, limits, regions
    )


def _decode_all(
    header: dict[str, Any],
    binary: memoryview,
    model_name: str,
    model_version: str | None,
    limits: InputLimits,
    regions: SharedMemoryRegions,
) -> InferRequest:
    request = _decode(header, binary, None, model_name, model_version, limits, regions)
    assert request is not None  # only a cut-out array can be misplaced
    return request


def _decode(
    header: dict[str, Any],
    binary: memoryview,
    arrays: dict[str, JsonArray] | None,
    model_name: str,
    model_version: str | None,
    limits: InputLimits,
    regions: SharedMemoryRegions,
) -> InferRequest | None:
    """The request from its parsed header and the arrays cut out of it (None: none were); None when
    a cut-out array was not where a `data` list is."""
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise MalformedRequest("the request needs a non-empty 'inputs' list")
    pending = None if arrays is None else dict(arrays)
    inputs: list[Tensor] = []
    offset = 0
    # The request's account of shared-memory reads, only where a region can be registered at all.
    reads = RequestReads(limits) if regions.enabled else None
    for index, raw in enumerate(raw_inputs):
        decoded = _decode_input(index, raw, binary, offset, limits, pending, regions, reads)
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
        outputs = [_decode_output(index, raw, regions) for index, raw in enumerate(raw_outputs)]
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
    regions: SharedMemoryRegions,
    reads: RequestReads | None,
) -> tuple[Tensor, int] | None:
    if not isinstance(raw, dict):
        raise MalformedRequest(f"inputs[{index}] must be an object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise MalformedRequest(f"inputs[{index}] needs a 'name' string")
    datatype = parse_datatype_field(name, raw.get("datatype"))
    shape = parse_shape(name, raw.get("shape"), limits)
    raw_parameters = raw.get("parameters")
    if raw_parameters is None:
        # Most inputs: no parameters to check, and no error message to name the input in.
        parameters: dict[str, Any] = {}
        place = None
    else:
        owner = f"input {quoted(name)}"
        parameters = _parameters(owner, raw_parameters)
        place = regions.place(owner, parameters)
    size = parameters.get("binary_data_size")
    if place is not None:
        if size is not None or "data" in raw:
            raise MalformedRequest(
                f"input {quoted(name)} is in shared memory: send no data or binary data for it"
            )
        tensor = regions.read(name, datatype, shape, place, limits, reads)
    elif size is None:
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


def _decode_output(index: int, raw: Any, regions: SharedMemoryRegions) -> RequestedOutput:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise MalformedRequest(f"outputs[{index}] must be an object with a 'name'")
    owner = f"output {quoted(raw['name'])}"
    parameters = _parameters(owner, raw.get("parameters"))
    # A place in shared memory is checked before the model runs, and again when it is written.
    regions.place(owner, parameters)
    return RequestedOutput(raw["name"], parameters)


def encode_infer_response(
    response: InferResponse,
    request: InferRequest,
    request_id: str,
    regions: SharedMemoryRegions = NO_SHARED_MEMORY,
) -> Answer:
    binary_default = bool(request.parameters.get("binary_data_output", False))
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for tensor in response.outputs:
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype.value,
            "shape": list(tensor.shape),
        }
        place = (
            regions.place(f"output {quoted(tensor.name)}", tensor.parameters) if tensor.parameters else None
        )
        if place is not None:
            written = regions.write(tensor, place)
            entry["parameters"] = {REGION: place.region, BYTE_SIZE: written}
            if place.offset:
                entry["parameters"][OFFSET] = place.offset
        elif bool(tensor.parameters.get("binary_data", binary_default)):
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
    version = response.model_version.encode("latin-1")
    rid = request_id.encode("latin-1")
    if not chunks:
        return Answer(encoded, [(b"content-type", _JSON), (_VERSION, version), (_RESPONSE_ID, rid)])
    headers = [(b"content-type", _BINARY), (_VERSION, version), (_RESPONSE_ID, rid)]
    headers.append((b"inference-header-content-length", b"%d" % len(encoded)))
    return Answer(b"".join([encoded, *chunks]), headers)


class Answer:
    """An encoded infer answer, sent as one ASGI response: status 200, its headers (lower-case
    names, as starlette's Response writes them) and Content-Length. Lighter than a starlette
    Response on the one hot route: no header mapping is built, and a header added after encoding
    (Server-Timing) is appended, not searched for."""

    __slots__ = ("body", "raw_headers")

    def __init__(self, body: bytes, raw_headers: list[tuple[bytes, bytes]]) -> None:
        self.body = body
        self.raw_headers = raw_headers

    def add_header(self, name: str, value: str) -> None:
        self.raw_headers.append((name.lower().encode("latin-1"), value.encode("latin-1")))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"content-length", b"%d" % len(self.body)), *self.raw_headers]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})
