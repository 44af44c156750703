"""Inference through tritonclient over REST (JSON and binary) and gRPC, checked against onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from gateway.types import Datatype, numpy_dtype
from tests.support import Protocol

RNG_SEED = 20261125


def reference(repo: Path, model: str, version: int, feeds: dict[str, Any]) -> list[Any]:
    session = ort.InferenceSession(str(repo / model / str(version) / "model.onnx"))
    return session.run(None, feeds)


@pytest.mark.parametrize(("requested", "served"), [("", 1), ("1", 1), ("2", 2), ("stable", 1), ("canary", 2)])
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_versions_give_their_own_outputs(
    protocol: Protocol, test_repo: Path, requested: str, served: int, binary: bool
) -> None:
    x = np.random.default_rng(RNG_SEED).standard_normal((5, 4)).astype(np.float32)
    result = protocol.client.infer(
        "affine",
        [protocol.input("x", x, "FP32", binary)],
        model_version=requested,
        outputs=[protocol.output("y", binary)],
    )
    (expected,) = reference(test_repo, "affine", served, {"x": x})
    np.testing.assert_allclose(result.as_numpy("y"), expected, rtol=1e-6)
    response = result.get_response()
    version = response.model_version if protocol.is_grpc else response["model_version"]
    assert version == str(served)


def test_versions_differ(protocol: Protocol) -> None:
    x = np.ones((1, 4), dtype=np.float32)
    outputs = [
        protocol.client.infer("affine", [protocol.input("x", x, "FP32")], model_version=v).as_numpy("y")
        for v in ("1", "2")
    ]
    assert not np.allclose(outputs[0], outputs[1])


def test_mlp_batch_matches_onnxruntime(protocol: Protocol, test_repo: Path) -> None:
    batch = np.random.default_rng(RNG_SEED).standard_normal((8, 64)).astype(np.float32)
    result = protocol.client.infer("mlp", [protocol.input("input", batch, "FP32")])
    (expected,) = reference(test_repo, "mlp", 1, {"input": batch})
    assert result.as_numpy("logits").shape == (8, 10)
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-6)


def test_request_id_is_echoed(protocol: Protocol) -> None:
    x = np.zeros((1, 4), dtype=np.float32)
    result = protocol.client.infer("affine", [protocol.input("x", x, "FP32")], request_id="req-42")
    response = result.get_response()
    assert (response.id if protocol.is_grpc else response["id"]) == "req-42"


def sample(datatype: Datatype, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    """Values that reach each end of the datatype's range, so a narrowing bug shows."""
    rng = np.random.default_rng(RNG_SEED)
    count = int(np.prod(shape))
    if datatype is Datatype.BYTES:
        words = [b"", b"modelyard", "caf\u00e9 \u2615".encode(), b"x" * 300]
        return np.array([words[i % len(words)] for i in range(count)], dtype=object).reshape(shape)
    dtype = numpy_dtype(datatype)
    if datatype is Datatype.BOOL:
        return (rng.integers(0, 2, count) == 1).reshape(shape)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = rng.integers(info.min, info.max, count, dtype=dtype, endpoint=True)
        values[:2] = [info.min, info.max]
        return values.reshape(shape)
    return (rng.standard_normal(count) * 100).astype(dtype).reshape(shape)


@pytest.mark.parametrize("datatype", list(Datatype), ids=lambda d: d.value)
def test_every_datatype_round_trips(protocol: Protocol, datatype: Datatype) -> None:
    data = sample(datatype, (3, 5))
    model = f"identity_{datatype.value.lower()}"
    # REST carries tensors as JSON or as binary; tritonclient's gRPC client always sends raw contents.
    for binary in (True,) if protocol.is_grpc else (False, True):
        result = protocol.client.infer(
            model,
            [protocol.input("INPUT", data, datatype.value, binary)],
            outputs=[protocol.output("OUTPUT", binary)],
        )
        got = result.as_numpy("OUTPUT")
        assert got.shape == data.shape
        if datatype is Datatype.BYTES:
            assert [v if isinstance(v, bytes) else v.encode() for v in got.ravel()] == list(data.ravel())
        else:
            assert got.dtype == data.dtype
            np.testing.assert_array_equal(got, data)


@pytest.mark.parametrize("datatype", [d for d in Datatype if d is not Datatype.FP16], ids=lambda d: d.value)
def test_every_datatype_in_grpc_typed_contents(gateway: Any, datatype: Datatype) -> None:
    """gRPC clients other than tritonclient send typed `contents` fields instead of raw bytes."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    data = sample(datatype, (2, 3))
    field = {
        Datatype.BOOL: "bool_contents", Datatype.INT8: "int_contents", Datatype.INT16: "int_contents",
        Datatype.INT32: "int_contents", Datatype.INT64: "int64_contents", Datatype.UINT8: "uint_contents",
        Datatype.UINT16: "uint_contents", Datatype.UINT32: "uint_contents", Datatype.UINT64: "uint64_contents",
        Datatype.FP32: "fp32_contents", Datatype.FP64: "fp64_contents", Datatype.BYTES: "bytes_contents",
    }[datatype]  # fmt: skip
    request = service_pb2.ModelInferRequest(model_name=f"identity_{datatype.value.lower()}")
    tensor = request.inputs.add(name="INPUT", datatype=datatype.value, shape=[2, 3])
    getattr(tensor.contents, field).extend(data.ravel().tolist())
    with grpc.insecure_channel(gateway.grpc) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert list(response.outputs[0].shape) == [2, 3]
    raw = response.raw_output_contents[0]
    if datatype is Datatype.BYTES:
        from gateway.codec import deserialize_bytes

        assert list(deserialize_bytes("OUTPUT", raw, 6)) == list(data.ravel())
    else:
        np.testing.assert_array_equal(np.frombuffer(raw, dtype=numpy_dtype(datatype)).reshape(2, 3), data)


def test_strings_model(protocol: Protocol, test_repo: Path) -> None:
    text = np.array([b"The Cat", b"of", b"Hello WORLD"], dtype=object)
    result = protocol.client.infer("text_normalizer", [protocol.input("text", text, "BYTES")])
    (expected,) = reference(
        test_repo, "text_normalizer", 1, {"text": np.array([t.decode() for t in text], dtype=object)}
    )
    assert [bytes(v) for v in result.as_numpy("normalized")] == [e.encode() for e in expected]


def test_only_requested_outputs_are_returned(http: Any) -> None:
    body = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}],
        "outputs": [{"name": "y"}],
    }
    response = http.post("/v2/models/affine/versions/1/infer", json=body)
    assert response.status_code == 200
    assert [o["name"] for o in response.json()["outputs"]] == ["y"]


def test_nested_json_data_is_accepted(http: Any, test_repo: Path) -> None:
    rows = [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": rows}]}
    response = http.post("/v2/models/affine/versions/2/infer", json=body)
    assert response.status_code == 200
    (expected,) = reference(test_repo, "affine", 2, {"x": np.array(rows, dtype=np.float32)})
    output = response.json()["outputs"][0]
    assert output["shape"] == [2, 3]
    np.testing.assert_allclose(np.array(output["data"]).reshape(2, 3), expected, rtol=1e-6)


def test_request_without_content_type_is_json(gateway: Any) -> None:
    import httpx

    body = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}]}'
    response = httpx.post(f"{gateway.url}/v2/models/affine/infer", content=body, headers={"content-type": ""})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"


def test_gzip_request_body(http: Any) -> None:
    import gzip

    import orjson

    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    response = http.post(
        "/v2/models/affine/infer",
        content=gzip.compress(orjson.dumps(body)),
        headers={"Content-Encoding": "gzip"},
    )
    assert response.status_code == 200, response.text
