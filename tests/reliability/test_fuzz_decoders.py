"""Property-based fuzzing of every decoder: v2 JSON, v2 binary, v2 gRPC, TF Serving REST and gRPC.

Hypothesis feeds them malformed lengths, shapes, datatypes, NaN/Inf, huge dimensions and deep
nesting. Each input must decode to tensors that fit their shapes, or be refused with a gateway
error below 500; nothing else may escape, and no input may make the decoder allocate far more than
it sent (tracemalloc measures each case, numpy's allocations included). The case counts are
printed at the end of the run ("fuzz cases run"); MODELYARD_FUZZ_EXAMPLES raises them.
"""

from __future__ import annotations

import math
import os
import struct
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from gateway.codec import DEFAULT_LIMITS, InputLimits
from gateway.errors import GatewayError, status_for
from gateway.protocols import tfserving_rest, v2_grpc, v2_json, v2_rest
from gateway.types import Datatype, InferRequest, ModelSignature, TensorSpec
from tests.support import FUZZ_CASES

EXAMPLES = int(os.environ.get("MODELYARD_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
# The default limits (2**28 elements per tensor), so a decoder that trusts a declared shape
# would try to allocate gigabytes; and small ones, so the limits themselves are crossed often.
LIMITS = [
    DEFAULT_LIMITS,
    InputLimits(max_body_bytes=4096, max_elements=64, max_json_depth=6, max_bytes_element=16),
]
# No case may allocate more than this beyond its input.
MAX_ALLOCATION = 32 << 20

DATATYPES = [d.value for d in Datatype]
dimension = st.one_of(
    st.integers(0, 4),
    st.integers(-3, -1),
    st.sampled_from([1 << 14, 1 << 28, (1 << 28) + 1, 1 << 31, 1 << 40, (1 << 63) - 1]),
)
# Within the default limits but far beyond any data sent: what a trusting decoder would allocate.
hostile_shape = st.sampled_from(
    [[1 << 28], [1 << 14, 1 << 14], [1, 1 << 28], [(1 << 28) + 1], [1 << 40, 0], [0, -1]]
)
shape = st.one_of(
    st.lists(st.integers(0, 4), max_size=4),
    st.lists(dimension, max_size=6),
    hostile_shape,
    st.lists(st.integers(0, 1), min_size=30, max_size=70),
)
datatype = st.sampled_from(DATATYPES) | st.text(max_size=6)
# For the binary forms, where a case must get past the framing to reach the tensor checks:
# BYTES a third of the time, a hostile shape a third of the time.
binary_datatype = st.sampled_from(["BYTES", "BYTES", "BYTES", "BYTES", *DATATYPES]) | datatype
binary_shape = st.one_of(shape, hostile_shape)
scalar = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(1 << 63), (1 << 64) - 1),
    st.booleans(),
    st.text(max_size=20),
    st.none(),
    st.just({"b64": "aGVsbG8="}),
    st.just({"b64": "not base64!"}),
)
json_value = st.recursive(
    scalar,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=40,
)
data = st.one_of(
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=40),
    st.lists(st.integers(-(1 << 63), (1 << 64) - 1), max_size=40),
    st.lists(st.text(max_size=30), max_size=10),
    st.lists(st.lists(st.integers(-5, 300), max_size=4), max_size=6),
    json_value,
)


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


# orjson writes at most 254 levels; deeper bodies are made as bytes (deep_bytes).
deep = st.integers(1, 250).map(nested)
deep_bytes = st.integers(200, 3000).map(lambda n: b'{"inputs": ' + b"[" * n + b"]" * n + b"}")


def count(name: str) -> None:
    FUZZ_CASES[name] = FUZZ_CASES.get(name, 0) + 1


def decodes_or_refuses(
    decode: Callable[[], InferRequest | tuple[InferRequest, bool]], limits: InputLimits
) -> None:
    """The property: a request whose tensors fit their shapes and the limits, or a GatewayError
    below 500; and no more than MAX_ALLOCATION allocated on the way."""
    tracemalloc.start()
    refused: GatewayError | None = None
    try:
        decoded = decode()
    except GatewayError as exc:
        refused = exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    # Refused or not, a case may not have allocated far beyond what it sent.
    assert peak < MAX_ALLOCATION, f"the decoder allocated {peak} bytes"
    if refused is not None:
        status, _ = status_for(refused)
        assert status < 500, f"{type(refused).__name__} is {status}: {refused}"
        assert str(refused)
        return
    request = decoded[0] if isinstance(decoded, tuple) else decoded
    for tensor in request.inputs:
        assert tensor.data.shape == tuple(tensor.shape)
        assert math.prod(tensor.shape) <= limits.max_elements
        if tensor.datatype is Datatype.BYTES:
            assert all(len(v) <= limits.max_bytes_element for v in tensor.data.ravel())


def v2_input() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"name": st.text(min_size=0, max_size=5), "datatype": datatype, "shape": shape},
        optional={
            "data": data | deep,
            "parameters": st.dictionaries(st.text(max_size=8), json_value, max_size=2),
        },
    )


v2_body = st.fixed_dictionaries(
    {"inputs": st.lists(v2_input(), max_size=3) | json_value},
    optional={"outputs": json_value, "parameters": json_value, "id": scalar},
)


@pytest.mark.parametrize("limits", LIMITS, ids=["default_limits", "small_limits"])
@FUZZ
@given(body=v2_body | json_value | st.binary(max_size=200) | deep.map(lambda d: {"inputs": d}) | deep_bytes)
def test_v2_json_decoder(limits: InputLimits, body: Any) -> None:
    count("v2 REST JSON")
    raw = body if isinstance(body, bytes) else orjson.dumps(body, option=orjson.OPT_PASSTHROUGH_SUBCLASS)
    decodes_or_refuses(lambda: v2_rest.decode_infer_request(raw, None, "m", None, limits), limits)


def bytes_elements(values: list[bytes], lie: int) -> bytes:
    """BYTES elements in Triton's form, with one length field off by `lie`."""
    parts = []
    for index, value in enumerate(values):
        length = max(0, min(len(value) + (lie if index == 0 else 0), 0xFFFFFFFF))
        parts.append(struct.pack("<I", length) + value)
    return b"".join(parts)


@st.composite
def binary_requests(draw: st.DrawFn) -> tuple[bytes, str]:
    inputs = []
    payload = b""
    for index in range(draw(st.integers(1, 3))):
        dtype = draw(binary_datatype)
        chunk = (
            bytes_elements(draw(st.lists(st.binary(max_size=20), max_size=5)), draw(st.integers(-3, 1 << 20)))
            if dtype == "BYTES"
            else draw(st.binary(max_size=64))
        )
        # Mostly the true size, so that most cases reach the checks past it.
        declared = len(chunk) if draw(st.integers(0, 9)) < 8 else draw(st.sampled_from([1 << 40, -1, 3]))
        inputs.append(
            {
                "name": f"in{index}",
                "datatype": dtype,
                "shape": draw(binary_shape),
                "parameters": {"binary_data_size": declared},
            }
        )
        payload += chunk
    header = orjson.dumps({"inputs": inputs})
    length = draw(
        st.one_of(st.just(str(len(header))), st.integers(-5, len(header) + 300).map(str), st.text(max_size=4))
    )
    return header + payload, length


@pytest.mark.parametrize("limits", LIMITS, ids=["default_limits", "small_limits"])
@FUZZ
@given(request=binary_requests())
def test_v2_binary_decoder(limits: InputLimits, request: tuple[bytes, str]) -> None:
    count("v2 REST binary")
    body, header_length = request
    decodes_or_refuses(lambda: v2_rest.decode_infer_request(body, header_length, "m", None, limits), limits)


_CONTENTS = ["bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents"]
_CONTENTS += ["fp32_contents", "fp64_contents", "bytes_contents"]


@st.composite
def grpc_requests(draw: st.DrawFn) -> Any:
    request = service_pb2.ModelInferRequest(model_name="m")
    use_raw = draw(st.booleans())
    for index in range(draw(st.integers(0, 3))):
        dims = [max(min(d, (1 << 63) - 1), -(1 << 63)) for d in draw(shape)]
        tensor = request.inputs.add(
            name=draw(st.sampled_from([f"in{index}", ""])), datatype=draw(datatype), shape=dims
        )
        if use_raw:
            request.raw_input_contents.append(
                draw(st.binary(max_size=64))
                if draw(st.booleans())
                else bytes_elements(
                    draw(st.lists(st.binary(max_size=8), max_size=4)), draw(st.integers(-2, 1 << 30))
                )
            )
            continue
        field = draw(st.sampled_from(_CONTENTS))
        values: Any
        if field == "bool_contents":
            values = draw(st.lists(st.booleans(), max_size=20))
        elif field in ("fp32_contents", "fp64_contents"):
            values = draw(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=20))
        elif field == "bytes_contents":
            values = draw(st.lists(st.binary(max_size=30), max_size=8))
        elif field.startswith("uint"):
            values = draw(st.lists(st.integers(0, (1 << 32) - 1), max_size=20))
        else:
            values = draw(st.lists(st.integers(-(1 << 31), (1 << 31) - 1), max_size=20))
        getattr(tensor.contents, field).extend(values)
    if use_raw and draw(st.booleans()):
        request.raw_input_contents.append(b"extra")
    return request


@pytest.mark.parametrize("limits", LIMITS, ids=["default_limits", "small_limits"])
@FUZZ
@given(request=grpc_requests())
def test_v2_grpc_decoder(limits: InputLimits, request: Any) -> None:
    count("v2 gRPC")
    decodes_or_refuses(lambda: v2_grpc.decode_infer_request(request, limits), limits)


SPECS = st.lists(
    st.builds(
        TensorSpec,
        name=st.sampled_from(["x", "y", "text"]),
        datatype=st.sampled_from(list(Datatype)),
        shape=st.just((-1, -1)),
    ),
    min_size=1,
    max_size=2,
    unique_by=lambda spec: spec.name,
).map(tuple)
tf_body = st.one_of(
    st.fixed_dictionaries({"instances": data | deep}, optional={"signature_name": st.text(max_size=5)}),
    st.fixed_dictionaries(
        {"inputs": data | deep | st.dictionaries(st.sampled_from(["x", "y", "z"]), data | deep)}
    ),
    st.fixed_dictionaries(
        {"instances": st.lists(st.dictionaries(st.sampled_from(["x", "y"]), data), max_size=4)}
    ),
    json_value,
)


@pytest.mark.parametrize("limits", LIMITS, ids=["default_limits", "small_limits"])
@FUZZ
@given(body=tf_body, specs=SPECS)
def test_tfserving_rest_decoder(limits: InputLimits, body: Any, specs: tuple[TensorSpec, ...]) -> None:
    count("TF Serving REST")
    raw = orjson.dumps(body)

    def decode() -> InferRequest:
        request, _ = tfserving_rest.decode_predict(v2_json.json_object(raw, limits), "m", None, limits)
        assert request.decode is not None
        request.inputs = request.decode(ModelSignature(specs, (), "test"))
        return request

    decodes_or_refuses(decode, limits)


@st.composite
def tf_predict_requests(draw: st.DrawFn) -> Any:
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = draw(st.sampled_from(["m", ""]))
    request.model_spec.signature_name = draw(st.sampled_from(["", "serving_default", "other"]))
    for index in range(draw(st.integers(0, 2))):
        dims = [max(min(d, (1 << 63) - 1), -(1 << 63)) for d in draw(shape)]
        proto = tensor_pb2.TensorProto(
            dtype=draw(st.integers(0, 30) | st.sampled_from([101, 1000])),
            tensor_shape=tensor_shape_pb2.TensorShapeProto(
                dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims],
                unknown_rank=draw(st.booleans()) and draw(st.booleans()),
            ),
        )
        kind = draw(st.sampled_from(["content", "float", "int", "string", "int64", "none"]))
        if kind == "content":
            proto.tensor_content = draw(st.binary(max_size=64))
        elif kind == "float":
            proto.float_val.extend(draw(st.lists(st.floats(allow_nan=True, width=32), max_size=12)))
        elif kind == "int":
            proto.int_val.extend(draw(st.lists(st.integers(-(1 << 31), (1 << 31) - 1), max_size=12)))
        elif kind == "int64":
            proto.int64_val.extend(draw(st.lists(st.integers(-(1 << 63), (1 << 63) - 1), max_size=12)))
        elif kind == "string":
            proto.string_val.extend(draw(st.lists(st.binary(max_size=24), max_size=6)))
        request.inputs[f"in{index}"].CopyFrom(proto)
    return request


@pytest.mark.parametrize("limits", LIMITS, ids=["default_limits", "small_limits"])
@FUZZ
@given(request=tf_predict_requests())
def test_tfserving_grpc_decoder(limits: InputLimits, request: Any) -> None:
    pytest.importorskip("tensorflow")
    from gateway.protocols import tfserving_services_grpc as tfserving_grpc

    count("TF Serving gRPC")
    decodes_or_refuses(lambda: tfserving_grpc.decode_predict(request, limits), limits)


def test_nan_and_inf_decode_as_floats() -> None:
    """JSON has no NaN: orjson writes it as null, which FP32 data refuses; binary data and gRPC
    carry NaN and Inf as they are."""
    body = orjson.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [float("nan"), 1.0]}]}
    )
    with pytest.raises(GatewayError):
        v2_rest.decode_infer_request(body, None, "m", None)
    values = np.array([np.nan, np.inf, -np.inf], np.float32)
    header = orjson.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "parameters": {"binary_data_size": 12}}]}
    )
    decoded = v2_rest.decode_infer_request(header + values.tobytes(), str(len(header)), "m", None)
    np.testing.assert_array_equal(decoded.inputs[0].data, values)
