"""Internal tensor, request and response types. Tensor data is always a numpy array.

BYTES tensors are numpy object arrays of `bytes`. Protobuf never appears here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np


class Datatype(StrEnum):
    BOOL = "BOOL"
    UINT8 = "UINT8"
    UINT16 = "UINT16"
    UINT32 = "UINT32"
    UINT64 = "UINT64"
    INT8 = "INT8"
    INT16 = "INT16"
    INT32 = "INT32"
    INT64 = "INT64"
    FP16 = "FP16"
    FP32 = "FP32"
    FP64 = "FP64"
    BYTES = "BYTES"


_NUMPY_OF: dict[Datatype, np.dtype[Any]] = {
    Datatype.BOOL: np.dtype(np.bool_),
    Datatype.UINT8: np.dtype("<u1"),
    Datatype.UINT16: np.dtype("<u2"),
    Datatype.UINT32: np.dtype("<u4"),
    Datatype.UINT64: np.dtype("<u8"),
    Datatype.INT8: np.dtype("<i1"),
    Datatype.INT16: np.dtype("<i2"),
    Datatype.INT32: np.dtype("<i4"),
    Datatype.INT64: np.dtype("<i8"),
    Datatype.FP16: np.dtype("<f2"),
    Datatype.FP32: np.dtype("<f4"),
    Datatype.FP64: np.dtype("<f8"),
    Datatype.BYTES: np.dtype(object),
}
_DATATYPE_OF: dict[np.dtype[Any], Datatype] = {
    dtype.newbyteorder("="): datatype for datatype, dtype in _NUMPY_OF.items()
}


def numpy_dtype(datatype: Datatype) -> np.dtype[Any]:
    """The little-endian numpy dtype that carries a v2 datatype on the wire."""
    return _NUMPY_OF[datatype]


def datatype_of(dtype: np.dtype[Any]) -> Datatype:
    """The v2 datatype of a numpy dtype; strings map to BYTES."""
    if dtype.kind in "OSU":
        return Datatype.BYTES
    try:
        return _DATATYPE_OF[dtype.newbyteorder("=")]
    except KeyError:
        raise ValueError(f"numpy dtype {dtype} has no v2 datatype") from None


def parse_datatype(name: str) -> Datatype:
    try:
        return Datatype(name)
    except ValueError:
        raise ValueError(
            f"unknown datatype {name!r}; expected one of {', '.join(d.value for d in Datatype)}"
        ) from None


def element_count(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


@dataclass(slots=True, frozen=True)
class TensorSpec:
    """A declared input or output: -1 marks a dimension of any size."""

    name: str
    datatype: Datatype
    shape: tuple[int, ...]

    def accepts_shape(self, shape: tuple[int, ...]) -> bool:
        if len(shape) != len(self.shape):
            return False
        return all(want in (-1, got) for want, got in zip(self.shape, shape, strict=True))


@dataclass(slots=True, frozen=True)
class ModelSignature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    platform: str


@dataclass(slots=True)
class Tensor:
    name: str
    datatype: Datatype
    shape: tuple[int, ...]
    data: np.ndarray[Any, Any]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class RequestedOutput:
    name: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class InferRequest:
    model_name: str
    model_version: str | None
    inputs: list[Tensor]
    outputs: list[RequestedOutput] | None = None
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    protocol: str = "rest"
    # Absolute time.monotonic() by which the answer is due, from the client's own deadline.
    deadline: float | None = None
    # HTTP headers or gRPC metadata, names in lower case: routing rules may read them.
    headers: Mapping[str, str] = field(default_factory=dict)
    # For logs and the client: X-Request-ID, else the v2 `id`, else generated (gateway/request_meta.py).
    request_id: str | None = None


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str
    outputs: list[Tensor]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(slots=True, frozen=True)
class IndexEntry:
    """One row of the repository index, in Triton's repository extension's terms."""

    name: str
    version: str
    state: str
    reason: str = ""


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns


@dataclass(slots=True)
class VersionStats:
    """Counters in the shape of Triton's statistics extension."""

    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
