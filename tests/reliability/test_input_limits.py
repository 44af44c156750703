"""Input hardening: every configured limit refuses what is over it, over each front door, with the
error table's status, and the gateway serves on afterwards. Path traversal on every model route."""

from __future__ import annotations

import gzip
import http.client
from collections.abc import Iterator
from urllib.parse import quote

import grpc
import httpx
import numpy as np
import orjson
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from tests.support import RunningGateway, float_tensor_proto

# conftest.LIMITED_ENV's limits.
MAX_BODY = 64 * 1024
MAX_ELEMENTS = 1024
MAX_DEPTH = 8
MAX_STRING = 1000
GOOD = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}


@pytest.fixture
def limited(limited_gateway: RunningGateway) -> RunningGateway:
    return limited_gateway


@pytest.fixture
def client(limited: RunningGateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=limited.url, timeout=30) as http:
        yield http


def assert_refused(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"}
    assert words in response.json()["error"]


def assert_still_serving(client: httpx.Client) -> None:
    assert client.post("/v2/models/affine/infer", json=GOOD).status_code == 200


def test_body_over_the_limit_is_413_before_it_is_read(client: httpx.Client) -> None:
    body = orjson.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0.5] * 20000}]}
    )
    assert len(body) > MAX_BODY
    assert_refused(client.post("/v2/models/affine/infer", content=body), 413, "over the limit")
    assert_still_serving(client)


def test_chunked_body_over_the_limit_is_413_while_it_arrives(client: httpx.Client) -> None:
    sent = []

    def chunks() -> Iterator[bytes]:
        # No Content-Length: the gateway counts as the chunks arrive.
        for _ in range(8):
            sent.append(1)
            yield b" " * (16 * 1024)
        yield orjson.dumps(GOOD)

    response = client.post("/v2/models/affine/infer", content=chunks())
    assert_refused(response, 413, "over the limit")
    assert_still_serving(client)


def test_gzip_bomb_is_413_not_inflated(client: httpx.Client) -> None:
    bomb = gzip.compress(b" " * (50 * 1024 * 1024))
    assert len(bomb) < MAX_BODY
    response = client.post("/v2/models/affine/infer", content=bomb, headers={"Content-Encoding": "gzip"})
    assert_refused(response, 413, "inflates to more than")
    assert_still_serving(client)


@pytest.mark.parametrize(
    "shape", [[MAX_ELEMENTS + 1], [1 << 40, 0], [1 << 62, 1 << 62], [MAX_ELEMENTS // 4 + 1, 4]], ids=str
)
def test_shape_over_the_element_limit_is_413_before_the_data_is_read(
    client: httpx.Client, shape: list[int]
) -> None:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": shape, "data": [1, 2, 3, 4]}]}
    assert_refused(client.post("/v2/models/affine/infer", json=body), 413, "elements per tensor")
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": shape, "parameters": {"binary_data_size": 16}}
            ]
        }
    )
    binary = client.post(
        "/v2/models/affine/infer",
        content=header + b"\0" * 16,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert_refused(binary, 413, "elements per tensor")


def test_shape_over_the_element_limit_over_grpc(limited: RunningGateway) -> None:
    client = triton_grpc.InferenceServerClient(limited.grpc)
    try:
        data = np.zeros((MAX_ELEMENTS // 4 + 1, 4), np.float32)
        tensor = triton_grpc.InferInput("x", list(data.shape), "FP32")
        tensor.set_data_from_numpy(data)
        with pytest.raises(InferenceServerException) as caught:
            client.infer("affine", [tensor])
        assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "elements per tensor" in str(caught.value)
        # Over gRPC's own message limit: gRPC refuses it with the same code.
        big = np.zeros((2, 200_000), np.float32)
        tensor = triton_grpc.InferInput("INPUT", list(big.shape), "FP32")
        tensor.set_data_from_numpy(big)
        with pytest.raises(InferenceServerException) as caught:
            client.infer("identity_fp32", [tensor])
        assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        ok = triton_grpc.InferInput("x", [1, 4], "FP32")
        ok.set_data_from_numpy(np.ones((1, 4), np.float32))
        assert client.infer("affine", [ok]).as_numpy("y").shape == (1, 3)
    finally:
        client.close()


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def test_json_nested_too_deep_is_400(client: httpx.Client) -> None:
    too_deep = {**GOOD, "parameters": {"deep": nested(MAX_DEPTH)}}
    assert_refused(client.post("/v2/models/affine/infer", json=too_deep), 400, "nested deeper than 8")
    shallow = {**GOOD, "parameters": {"shallow": nested(MAX_DEPTH - 3)}}
    assert client.post("/v2/models/affine/infer", json=shallow).status_code == 200
    # Past orjson's own limit of 1024 levels: still a clear 400, no recursion in the gateway.
    hostile = b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert_refused(client.post("/v2/models/affine/infer", content=hostile), 400, "not valid JSON")
    rows = {"instances": [[[[[[[[[[1.0]]]]]]]]]]}
    assert_refused(client.post("/v1/models/affine:predict", json=rows), 400, "nested deeper than 8")
    assert_still_serving(client)


def test_bytes_element_over_the_limit_is_413_over_every_front_door(
    client: httpx.Client, limited: RunningGateway
) -> None:
    long_text = "x" * (MAX_STRING + 1)
    body = {"inputs": [{"name": "INPUT", "datatype": "BYTES", "shape": [1, 1], "data": [long_text]}]}
    assert_refused(client.post("/v2/models/identity_bytes/infer", json=body), 413, "BYTES element 0")
    raw = len(long_text).to_bytes(4, "little") + long_text.encode()
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT",
                    "datatype": "BYTES",
                    "shape": [1, 1],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    )
    binary = client.post(
        "/v2/models/identity_bytes/infer",
        content=header + raw,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert_refused(binary, 413, "BYTES element 0")
    predict = client.post("/v1/models/identity_bytes:predict", json={"instances": [[long_text]]})
    assert_refused(predict, 413, "BYTES element 0")
    grpc_client = triton_grpc.InferenceServerClient(limited.grpc)
    try:
        tensor = triton_grpc.InferInput("INPUT", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[long_text.encode()]], dtype=object))
        with pytest.raises(InferenceServerException) as caught:
            grpc_client.infer("identity_bytes", [tensor])
        assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        short = triton_grpc.InferInput("INPUT", [1, 1], "BYTES")
        short.set_data_from_numpy(np.array([[b"short"]], dtype=object))
        assert grpc_client.infer("identity_bytes", [short]).as_numpy("OUTPUT").ravel().tolist() == [b"short"]
    finally:
        grpc_client.close()


def test_bytes_shape_larger_than_its_buffer_is_refused_before_allocation(http: httpx.Client) -> None:
    """On the default limits (2**28 elements), a BYTES shape the buffer cannot fill is 400 at once:
    the array of 2**28 elements (2 GiB of pointers) is never allocated."""
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT",
                    "datatype": "BYTES",
                    "shape": [1 << 14, 1 << 14],
                    "parameters": {"binary_data_size": 8},
                }
            ]
        }
    )
    response = http.post(
        "/v2/models/identity_bytes/infer",
        content=header + b"\1\0\0\0a\0\0\0",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert_refused(response, 400, "BYTES elements need at least")


def test_tfserving_grpc_refuses_a_shape_its_values_do_not_fill(limited: RunningGateway) -> None:
    """tf.make_ndarray would repeat one value over the whole shape: the gateway checks first."""
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    def predict(shape: list[int], values: list[float]) -> grpc.RpcError:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "affine"
        request.inputs["x"].CopyFrom(float_tensor_proto(shape, values))
        with grpc.insecure_channel(limited.grpc) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                stub.Predict(request, timeout=30)
        return caught.value

    huge = predict([1 << 30, 4], [1.0])
    assert huge.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, huge.details()
    short = predict([2, 4], [1.0])
    assert short.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs 8 values, got 1" in (short.details() or "")
    negative = predict([-1, 4], [1.0, 2.0, 3.0, 4.0])
    assert negative.code() == grpc.StatusCode.INVALID_ARGUMENT


# Path traversal --------------------------------------------------------------------------------


def raw_request(gateway: RunningGateway, method: str, path: str) -> tuple[int, str]:
    """The path sent exactly as given: httpx would resolve '..' segments before sending."""
    connection = http.client.HTTPConnection("127.0.0.1", gateway.http_port, timeout=30)
    try:
        body = orjson.dumps(GOOD) if method == "POST" else None
        connection.request(method, path, body=body)
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


TRAVERSALS = [
    "..",
    "../affine",
    "../../etc/passwd",
    "..%2Faffine",
    "%2e%2e",
    "affine/../identity_fp32",
    "outside",
]


def test_no_model_route_reaches_outside_the_repository(limited: RunningGateway, client: httpx.Client) -> None:
    """Every route that takes a model name (from the OpenAPI document), with names that try to
    climb out of the repository: never a 200, never a 500. A model folder beside the repository
    can be neither loaded nor served."""
    outside = limited.repo.parent / "outside"
    (outside / "1").mkdir(parents=True, exist_ok=True)
    (outside / "1" / "model.onnx").write_bytes((limited.repo / "affine" / "1" / "model.onnx").read_bytes())
    paths = client.get("/openapi.json").json()["paths"]
    model_routes = [(m.upper(), p) for p, ops in paths.items() if "{model_name}" in p for m in ops]
    assert len(model_routes) >= 20, model_routes
    checked = 0
    for method, template in model_routes:
        for name in TRAVERSALS:
            for version in ("1", "../1", "..%2F2"):
                path = (
                    template.replace("{model_name}", name if "%" in name else quote(name, safe=""))
                    .replace("{model_version}", version)
                    .replace("{model_label}", version)
                )
                status, text = raw_request(limited, method, path)
                assert status in (400, 404, 405, 501), (method, path, text)
                checked += 1
    # The same names as raw, unencoded path segments: the router itself must not normalise them.
    for name in TRAVERSALS:
        for path in (f"/v2/models/{name}/infer", f"/v2/repository/models/{name}/load", f"/v1/models/{name}"):
            status, text = raw_request(limited, "GET" if path.startswith("/v1") else "POST", path)
            assert status in (400, 404, 405), (path, text)
            checked += 1
    index = client.post("/v2/repository/index").json()
    assert "outside" not in {entry["name"] for entry in index}
    assert checked > 400


def test_no_grpc_method_reaches_outside_the_repository(limited: RunningGateway) -> None:
    (limited.repo.parent / "outside" / "1").mkdir(parents=True, exist_ok=True)
    client = triton_grpc.InferenceServerClient(limited.grpc)
    tensor = triton_grpc.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
    try:
        for name in [*TRAVERSALS, "%2e%2e/affine"]:
            calls = [
                lambda n=name: client.load_model(n),
                lambda n=name: client.unload_model(n),
                lambda n=name: client.get_model_metadata(n),
                lambda n=name: client.get_model_config(n),
                lambda n=name: client.infer(n, [tensor]),
                lambda n=name: client.infer("affine", [tensor], model_version=f"../{n}"),
            ]
            for call in calls:
                with pytest.raises(InferenceServerException) as caught:
                    call()
                assert caught.value.status() in ("StatusCode.NOT_FOUND", "StatusCode.INVALID_ARGUMENT"), str(
                    caught.value
                )
        assert client.infer("affine", [tensor]).as_numpy("y").shape == (1, 3)
    finally:
        client.close()
