"""Internal tensor, request and response types. Tensor data is always a numpy array.

BYTES tensors are numpy object arrays of `bytes`. Protobuf never appears here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np

from gateway.errors import InvalidInput

if TYPE_CHECKING:
    from gateway.config import VersionPolicy
    from gateway.timing import RequestTiming


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
    found = _DATATYPE_OF.get(dtype)  # a native dtype, as a backend's outputs are: no new dtype made
    if found is not None:
        return found
    if dtype.kind in "OSU":
        return Datatype.BYTES
    try:
        return _DATATYPE_OF[dtype.newbyteorder("=")]
    except KeyError:
        raise ValueError(f"numpy dtype {dtype} has no v2 datatype") from None


# By value, for a plain dict lookup per tensor (Datatype(name) goes through the enum's machinery).
_DATATYPE_NAMED = {datatype.value: datatype for datatype in Datatype}


def parse_datatype(name: str) -> Datatype:
    try:
        return _DATATYPE_NAMED[name]
    except (KeyError, TypeError):
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
    """A model version's inputs and outputs, and the checks a request must pass against them."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    platform: str
    _input_specs: dict[str, TensorSpec] = field(init=False, repr=False, compare=False)
    _output_names: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_input_specs", {spec.name: spec for spec in self.inputs})
        object.__setattr__(self, "_output_names", tuple(spec.name for spec in self.outputs))

    def check_inputs(self, label: str, tensors: list[Tensor]) -> dict[str, np.ndarray[Any, Any]]:
        """The request's arrays by input name, once each fits its spec by name, datatype and
        shape and every input is given once; `label` names the model and version in errors."""
        specs = self._input_specs
        arrays: dict[str, np.ndarray[Any, Any]] = {}
        for tensor in tensors:
            spec = specs.get(tensor.name)
            if spec is None:
                raise InvalidInput(
                    f"{label} has no input {quoted(tensor.name)}; its inputs are {', '.join(specs)}"
                )
            if tensor.name in arrays:
                raise InvalidInput(f"{label}: input {quoted(tensor.name)} is given twice")
            if tensor.datatype != spec.datatype:
                raise InvalidInput(
                    f"{label}: input '{spec.name}' has datatype {tensor.datatype}, the model expects {spec.datatype}"
                )
            if not spec.accepts_shape(tensor.shape):
                raise InvalidInput(
                    f"{label}: input '{spec.name}' has shape {list(tensor.shape)}, the model expects "
                    f"{list(spec.shape)} (-1 is any size)"
                )
            arrays[tensor.name] = tensor.data
        if len(arrays) != len(specs):
            missing = [name for name in specs if name not in arrays]
            raise InvalidInput(f"{label}: missing input(s) {', '.join(missing)}")
        return arrays

    def check_outputs(self, label: str, requested: list[RequestedOutput] | None) -> list[str]:
        """The output names to compute: all of them unless the request names some, each known and once."""
        known = self._output_names
        if not requested:
            return list(known)
        names = [output.name for output in requested]
        unknown = [quoted(n) for n in names if n not in known]
        if unknown:
            raise InvalidInput(
                f"{label} has no output(s) {', '.join(unknown)}; its outputs are {', '.join(known)}"
            )
        if len(set(names)) != len(names):
            raise InvalidInput(f"{label}: an output is requested twice")
        return names


# A client's name is echoed in errors only this long: a 10 MB name must not come back whole.
MAX_ECHOED_NAME = 64


def quoted(value: object) -> str:
    """A client's name (or whatever it sent in its place) for an error message, cut if long."""
    name = value if isinstance(value, str) else str(value)
    if len(name) <= MAX_ECHOED_NAME:
        return f"'{name}'"
    return f"'{name[:MAX_ECHOED_NAME]}...' ({len(name)} characters)"


@dataclass(slots=True)
class Tensor:
    name: str
    datatype: Datatype
    shape: tuple[int, ...]
    data: np.ndarray[Any, Any]
    parameters: dict[str, Any] = field(default_factory=dict)


def batch_rows(tensors: list[Tensor]) -> int:
    """The rows of a request: its first input's first dimension (1 for a scalar or no input)."""
    first = tensors[0] if tensors else None
    return first.shape[0] if first is not None and first.shape else 1


@dataclass(slots=True)
class RequestedOutput:
    name: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class InferRequest:
    """A decoded inference request; the transport's facts travel beside it in a RequestContext."""

    model_name: str
    model_version: str | None
    inputs: list[Tensor]
    outputs: list[RequestedOutput] | None = None
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    # For a front door that needs the signature to decode (TF Serving's REST rows): called once
    # routing has chosen the version, with its signature, in place of `inputs`.
    decode: Callable[[ModelSignature], list[Tensor]] | None = None


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str
    outputs: list[Tensor]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    # The backend that computed it, for the metrics; not sent to the client.
    backend: str = ""
    # Where its time went (gateway.timing), for the front door's Server-Timing; None: not measured.
    timing: RequestTiming | None = None


@dataclass(slots=True, frozen=True)
class ModelMetadata:
    name: str
    # The version these inputs and outputs are of: the one named, else the one the model stands for.
    version: str
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
    # Answers from the response cache (the time to look up and answer), and lookups that missed
    # (the time of the lookup alone), as Triton counts them.
    cache_hit: Duration = field(default_factory=Duration)
    cache_miss: Duration = field(default_factory=Duration)


@dataclass(frozen=True, slots=True)
class ServerMetadata:
    name: str
    version: str
    extensions: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ModelStatistics:
    name: str
    version: str
    stats: VersionStats


@dataclass(frozen=True, slots=True)
class ModelDescription:
    """What a model's configuration says, for Triton's model configuration extension."""

    name: str
    backend: str
    version_policy: VersionPolicy
    max_batch_size: int
    signature: ModelSignature
