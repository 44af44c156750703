"""Tensor data on the wire, below both the front doors and the adapters: JSON values, binary
buffers and the v2 gRPC contents fields to numpy and back.

JSON data goes to numpy in one call; binary and raw contents go through `numpy.frombuffer`
without a copy. Every shape is held to `InputLimits`, and every length is checked against the
shape, before anything is allocated for the tensor.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from gateway.errors import InvalidInput, MalformedRequest, PayloadTooLarge
from gateway.types import Datatype, Tensor, numpy_dtype, parse_datatype, quoted

if TYPE_CHECKING:
    from gateway.settings import Settings

# numpy 1.x holds at most 32 dimensions; a longer shape is refused before numpy sees it.
MAX_DIMS = 32
_LENGTH = struct.Struct("<I")
# The v2 gRPC message's typed contents field of each datatype (FP16 has none: raw contents only).
CONTENTS_FIELD: dict[Datatype, str] = {
    Datatype.BOOL: "bool_contents",
    Datatype.INT8: "int_contents",
    Datatype.INT16: "int_contents",
    Datatype.INT32: "int_contents",
    Datatype.INT64: "int64_contents",
    Datatype.UINT8: "uint_contents",
    Datatype.UINT16: "uint_contents",
    Datatype.UINT32: "uint_contents",
    Datatype.UINT64: "uint64_contents",
    Datatype.FP32: "fp32_contents",
    Datatype.FP64: "fp64_contents",
    Datatype.BYTES: "bytes_contents",
}
_FLOAT_KINDS = "iuf"
_INT_KINDS = "iu"


@dataclass(frozen=True, slots=True)
class InputLimits:
    """What one request may ask of the gateway; the defaults are Settings' defaults."""

    max_body_bytes: int = 256 << 20
    # JSON bodies, and the JSON header of a binary body: JSON costs more memory per byte.
    max_json_bytes: int = 64 << 20
    max_elements: int = 1 << 28
    max_json_depth: int = 64
    max_bytes_element: int = 16 << 20

    @classmethod
    def from_settings(cls, settings: Settings) -> InputLimits:
        return cls(
            max_body_bytes=settings.max_request_body_bytes,
            max_json_bytes=settings.max_json_body_bytes,
            max_elements=settings.max_tensor_elements,
            max_json_depth=settings.max_json_depth,
            max_bytes_element=settings.max_bytes_element_bytes,
        )


DEFAULT_LIMITS = InputLimits()


def body_limit(limits: InputLimits, binary: bool) -> tuple[int, str]:
    """The byte limit of a body, and the setting that sets it: binary bodies have their own."""
    if binary or limits.max_json_bytes >= limits.max_body_bytes:
        return limits.max_body_bytes, "MODELYARD_MAX_REQUEST_BODY_MB"
    return limits.max_json_bytes, "MODELYARD_MAX_JSON_BODY_MB"


def parse_datatype_field(name: str, value: Any) -> Datatype:
    if not isinstance(value, str):
        raise MalformedRequest(f"input {quoted(name)}: 'datatype' must be a string")
    try:
        return parse_datatype(value)
    except ValueError as exc:
        raise InvalidInput(f"input {quoted(name)}: {exc}") from None


def parse_shape(name: str, value: Any, limits: InputLimits = DEFAULT_LIMITS) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in value
    ):
        raise MalformedRequest(f"input {quoted(name)}: 'shape' must be a list of integers")
    return check_shape(name, tuple(value), limits)


def check_shape(name: str, shape: tuple[int, ...], limits: InputLimits = DEFAULT_LIMITS) -> tuple[int, ...]:
    """The shape, if it is one the gateway will allocate for: at most MAX_DIMS dimensions, none
    negative, and at most `max_elements` in all and in any one dimension (even beside a zero)."""
    if len(shape) > MAX_DIMS:
        raise InvalidInput(f"input {quoted(name)}: shape has {len(shape)} dimensions, more than {MAX_DIMS}")
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input {quoted(name)}: shape {list(shape)} has a negative dimension")
    if any(d > limits.max_elements for d in shape) or math.prod(shape) > limits.max_elements:
        raise PayloadTooLarge(
            f"input {quoted(name)}: shape {list(shape)} is over the limit of {limits.max_elements} elements "
            "per tensor (MODELYARD_MAX_TENSOR_ELEMENTS)"
        )
    return shape


def tensor_from_values(
    name: str, datatype: Datatype, shape: tuple[int, ...], values: Any, limits: InputLimits = DEFAULT_LIMITS
) -> Tensor:
    """A tensor from JSON values (flat or nested lists) or a gRPC contents field."""
    count = math.prod(check_shape(name, shape, limits))
    if datatype is Datatype.BYTES:
        array = _bytes_from_values(name, values, limits)
    else:
        array = _numbers_from_values(name, datatype, values)
    if array.size != count:
        raise InvalidInput(
            f"input {quoted(name)}: shape {list(shape)} needs {count} elements, the data has {array.size}"
        )
    return Tensor(name, datatype, shape, array.reshape(shape))


def _numbers_from_values(name: str, datatype: Datatype, values: Any) -> np.ndarray[Any, Any]:
    if not isinstance(values, list | tuple | np.ndarray) and not hasattr(values, "__len__"):
        raise MalformedRequest(f"input {quoted(name)}: 'data' must be a list")
    try:
        raw = np.asarray(values)
    except ValueError as exc:
        raise InvalidInput(f"input {quoted(name)}: the data is not a regular nested list ({exc})") from None
    dtype = numpy_dtype(datatype)
    if raw.size == 0:
        return np.empty(0, dtype=dtype)
    kind = raw.dtype.kind
    if datatype is Datatype.BOOL:
        if kind != "b":
            raise InvalidInput(f"input {quoted(name)}: BOOL data must be true/false values")
    elif dtype.kind in _INT_KINDS:
        if kind not in _INT_KINDS:
            # numpy turns integers beyond int64 (large UINT64 values) into floats or objects:
            # look at the values themselves before refusing them.
            return _big_integers(name, datatype, np.array(values, dtype=object))
        info = np.iinfo(dtype)
        if int(raw.min()) < info.min or int(raw.max()) > info.max:
            raise InvalidInput(f"input {quoted(name)}: a value is out of range for {datatype}")
    elif kind not in _FLOAT_KINDS:
        raise InvalidInput(f"input {quoted(name)}: {datatype} data must be numbers")
    # A finite number the datatype cannot hold (1e39 as FP32) is refused, as an integer out of
    # range is: the cast would make it an infinity the client never sent. Infinities sent as such
    # stay (they cast without overflow).
    try:
        with np.errstate(over="raise", invalid="ignore"):
            return raw.astype(dtype, copy=False).ravel()
    except FloatingPointError:
        raise InvalidInput(f"input {quoted(name)}: a value is out of range for {datatype}") from None


# Text of a large JSON array is read this much at a time: the Python objects orjson makes for one
# piece (about 32 bytes a number) live only until numpy has them.
JSON_PIECE_BYTES = 1 << 18


@dataclass(frozen=True, slots=True)
class JsonArray:
    """The text between the brackets of a flat JSON array of numbers, in place in the body."""

    source: bytes | bytearray
    start: int
    end: int


def tensor_from_json_array(
    name: str,
    datatype: Datatype,
    shape: tuple[int, ...],
    array: JsonArray,
    limits: InputLimits = DEFAULT_LIMITS,
) -> Tensor:
    """A tensor from a flat JSON array of numbers, read a piece at a time into one numpy array: no
    Python object per element outlives its piece, so a large body is not inflated in memory."""
    count = math.prod(check_shape(name, shape, limits))
    if datatype is Datatype.BYTES:
        raise InvalidInput(f"input {quoted(name)}: BYTES data must be strings")
    out = np.empty(count, dtype=numpy_dtype(datatype))
    source, start, end = array.source, array.start, array.end
    found = 0
    while start < end:
        stop = end
        if end - start > JSON_PIECE_BYTES:
            comma = source.rfind(b",", start, start + JSON_PIECE_BYTES)
            stop = comma if comma > start else end
        try:
            piece = orjson.loads(b"[" + source[start:stop] + b"]")
        except orjson.JSONDecodeError as exc:
            raise MalformedRequest(f"the body is not valid JSON: input {quoted(name)}: {exc}") from None
        values = _numbers_from_values(name, datatype, piece)
        if found + values.size <= count:
            out[found : found + values.size] = values
        found += values.size
        start = stop + 1
    if found != count:
        raise InvalidInput(
            f"input {quoted(name)}: shape {list(shape)} needs {count} elements, the data has {found}"
        )
    return Tensor(name, datatype, shape, out.reshape(shape))


def _big_integers(name: str, datatype: Datatype, raw: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    flat = raw.ravel()
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
        raise InvalidInput(f"input {quoted(name)}: {datatype} data must be integers")
    try:
        return np.array(flat.tolist(), dtype=numpy_dtype(datatype))
    except OverflowError:
        raise InvalidInput(f"input {quoted(name)}: a value is out of range for {datatype}") from None


def _bytes_from_values(name: str, values: Any, limits: InputLimits) -> np.ndarray[Any, Any]:
    try:
        nested = np.array(values, dtype=object)
    except ValueError as exc:
        raise InvalidInput(f"input {quoted(name)}: the data is not a regular nested list ({exc})") from None
    flat = nested.ravel()
    out = np.empty(flat.size, dtype=object)
    for index, value in enumerate(flat):
        if isinstance(value, str):
            out[index] = value.encode("utf-8")
        elif isinstance(value, bytes):
            out[index] = value
        else:
            raise InvalidInput(f"input {quoted(name)}: BYTES data must be strings")
        if len(out[index]) > limits.max_bytes_element:
            raise _element_too_long(name, index, len(out[index]), limits)
    return out


def _element_too_long(name: str, index: int, length: int, limits: InputLimits) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"input {quoted(name)}: BYTES element {index} has {length} bytes, over the limit of "
        f"{limits.max_bytes_element} (MODELYARD_MAX_BYTES_ELEMENT_MB)"
    )


def tensor_from_buffer(
    name: str,
    datatype: Datatype,
    shape: tuple[int, ...],
    buffer: memoryview | bytes,
    limits: InputLimits = DEFAULT_LIMITS,
) -> Tensor:
    """A tensor from raw little-endian bytes (Triton's binary extension, gRPC raw contents)."""
    count = math.prod(check_shape(name, shape, limits))
    if datatype is Datatype.BYTES:
        array = deserialize_bytes(name, buffer, count, limits)
    else:
        dtype = numpy_dtype(datatype)
        expected = count * dtype.itemsize
        if len(buffer) != expected:
            raise InvalidInput(
                f"input {quoted(name)}: shape {list(shape)} of {datatype} needs {expected} bytes, got {len(buffer)}"
            )
        array = np.frombuffer(buffer, dtype=dtype)
    return Tensor(name, datatype, shape, array.reshape(shape))


def deserialize_bytes(
    name: str, buffer: memoryview | bytes, count: int, limits: InputLimits = DEFAULT_LIMITS
) -> np.ndarray[Any, Any]:
    """BYTES elements, each a 4-byte little-endian length and then its bytes."""
    view = memoryview(buffer)
    # Each element takes at least its 4-byte length: a shape the buffer cannot fill is refused
    # before the array of `count` elements is allocated.
    if count * _LENGTH.size > len(view):
        raise InvalidInput(
            f"input {quoted(name)}: {count} BYTES elements need at least {count * _LENGTH.size} bytes, got {len(view)}"
        )
    out = np.empty(count, dtype=object)
    offset = 0
    for index in range(count):
        if offset + 4 > len(view):
            raise InvalidInput(f"input {quoted(name)}: BYTES data ends after {index} of {count} elements")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if length > limits.max_bytes_element:
            raise _element_too_long(name, index, length, limits)
        if offset + length > len(view):
            raise InvalidInput(f"input {quoted(name)}: BYTES element {index} is truncated")
        out[index] = bytes(view[offset : offset + length])
        offset += length
    if offset != len(view):
        raise InvalidInput(
            f"input {quoted(name)}: {len(view) - offset} bytes left over after {count} BYTES elements"
        )
    return out


def serialize_bytes(array: np.ndarray[Any, Any]) -> bytes:
    parts = []
    for value in array.ravel():
        item = value if isinstance(value, bytes) else str(value).encode("utf-8")
        parts.append(_LENGTH.pack(len(item)))
        parts.append(item)
    return b"".join(parts)


def tensor_to_bytes(tensor: Tensor) -> bytes:
    if tensor.datatype is Datatype.BYTES:
        return serialize_bytes(tensor.data)
    return np.ascontiguousarray(tensor.data, dtype=numpy_dtype(tensor.datatype)).tobytes()


def json_numbers(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any] | orjson.Fragment:
    """Numbers for a JSON answer. JSON has no NaN or infinity, and orjson would write null, a value
    the model never gave: non-finite values are written as Triton and TF Serving write them, `NaN`,
    `Infinity` and `-Infinity`, which tritonclient and Python's json read back."""
    if array.dtype.kind != "f" or bool(np.isfinite(array).all()):
        return array
    return orjson.Fragment(json.dumps(array.tolist(), allow_nan=True))


def tensor_to_values(tensor: Tensor) -> Sequence[Any] | np.ndarray[Any, Any]:
    """Flat row-major values for JSON: a numpy array orjson can write, or a list of str."""
    if tensor.datatype is Datatype.BYTES:
        try:
            return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in tensor.data.ravel()]
        except UnicodeDecodeError:
            raise InvalidInput(
                f"output {quoted(tensor.name)} holds bytes that are not UTF-8 text; request it as binary data"
            ) from None
    return np.ascontiguousarray(tensor.data).ravel()
