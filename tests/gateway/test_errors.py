"""Bad requests get a clear error with the status the error table gives, over REST and gRPC alike,
and never take the gateway down."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import orjson
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.support import Protocol, RunningGateway

X = np.ones((1, 4), dtype=np.float32)
Call = Callable[[Protocol], Any]


def infer(
    model: str, name: str = "x", data: Any = X, datatype: str = "FP32", version: str = "", **kw: Any
) -> Call:
    def call(protocol: Protocol) -> Any:
        return protocol.client.infer(
            model, [protocol.input(name, data, datatype)], model_version=version, **kw
        )

    return call


def with_shared_memory(protocol: Protocol) -> Any:
    tensor = protocol.input("x", X, "FP32")
    tensor.set_shared_memory("region0", X.nbytes)
    return protocol.client.infer("affine", [tensor])


def with_classification(protocol: Protocol) -> Any:
    output = protocol.module.InferRequestedOutput("y", class_count=2)
    return protocol.client.infer("affine", [protocol.input("x", X, "FP32")], outputs=[output])


def unknown_output(protocol: Protocol) -> Any:
    return protocol.client.infer(
        "affine", [protocol.input("x", X, "FP32")], outputs=[protocol.output("nope")]
    )


CASES: list[tuple[str, Call, int, str]] = [
    ("unknown model", infer("no_such_model"), 404, "NOT_FOUND"),
    ("unknown version", infer("affine", version="7"), 404, "NOT_FOUND"),
    ("unknown label", infer("affine", version="beta"), 404, "NOT_FOUND"),
    ("wrong input name", infer("affine", name="z"), 400, "INVALID_ARGUMENT"),
    ("wrong datatype", infer("affine", data=X.astype(np.float64), datatype="FP64"), 400, "INVALID_ARGUMENT"),
    ("wrong dimension", infer("affine", data=np.ones((1, 5), np.float32)), 400, "INVALID_ARGUMENT"),
    ("wrong rank", infer("affine", data=np.ones(4, np.float32)), 400, "INVALID_ARGUMENT"),
    ("unknown output", unknown_output, 400, "INVALID_ARGUMENT"),
    ("model that failed to load", infer("broken_artifact", name="INPUT"), 503, "UNAVAILABLE"),
    ("model whose config is invalid", infer("broken_config", name="INPUT"), 503, "UNAVAILABLE"),
    (
        "backend failure at run time",
        lambda p: p.client.infer(
            "reshape",
            [p.input("x", np.ones(6, np.float32), "FP32"), p.input("shape", np.array([4, 4]), "INT64")],
        ),
        500,
        "INTERNAL",
    ),
    ("unsupported feature", with_classification, 501, "UNIMPLEMENTED"),
    # The session gateway runs with system shared memory off, its default.
    ("shared memory while it is off", with_shared_memory, 501, "UNIMPLEMENTED"),
]


@pytest.mark.parametrize(("case", "call", "status", "code"), CASES, ids=[c[0] for c in CASES])
def test_error_status_is_the_same_over_both_protocols(
    protocol: Protocol, case: str, call: Call, status: int, code: str
) -> None:
    with pytest.raises(InferenceServerException) as caught:
        call(protocol)
    assert protocol.error_code(caught.value) == (code if protocol.is_grpc else str(status))
    message = caught.value.message()
    assert message and "Traceback" not in message


def test_error_messages_name_the_model_and_version(http: httpx.Client) -> None:
    body = {"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    response = http.post("/v2/models/affine/versions/2/infer", json=body)
    assert response.status_code == 400
    assert response.json() == {"error": "model 'affine' version 2 has no input 'z'; its inputs are x"}


def good_input(**overrides: Any) -> dict[str, Any]:
    return {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4], **overrides}


MALFORMED_REST: list[tuple[str, bytes, dict[str, str]]] = [
    ("bad JSON", b'{"inputs": [', {}),
    ("JSON that is not an object", b"[1, 2]", {}),
    ("no inputs", orjson.dumps({"inputs": []}), {}),
    ("data shorter than the shape", orjson.dumps({"inputs": [good_input(data=[1, 2, 3])]}), {}),
    ("data longer than the shape", orjson.dumps({"inputs": [good_input(data=[1, 2, 3, 4, 5])]}), {}),
    ("ragged nested data", orjson.dumps({"inputs": [good_input(data=[[1, 2], [3]], shape=[1, 4])]}), {}),
    ("strings for FP32", orjson.dumps({"inputs": [good_input(data=["a", "b", "c", "d"])]}), {}),
    ("unknown datatype", orjson.dumps({"inputs": [good_input(datatype="FP8")]}), {}),
    ("negative dimension", orjson.dumps({"inputs": [good_input(shape=[-1, 4])]}), {}),
    ("shape that is not a list", orjson.dumps({"inputs": [good_input(shape="1,4")]}), {}),
    ("missing data", orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4]}]}), {}),
    (
        "header length past the body",
        orjson.dumps({"inputs": [good_input()]}),
        {"Inference-Header-Content-Length": "9999"},
    ),
    (
        "header length not a number",
        orjson.dumps({"inputs": [good_input()]}),
        {"Inference-Header-Content-Length": "ten"},
    ),
    ("bad gzip", b"not gzip", {"Content-Encoding": "gzip"}),
]


@pytest.mark.parametrize(("case", "body", "headers"), MALFORMED_REST, ids=[c[0] for c in MALFORMED_REST])
def test_malformed_rest_request_is_a_clear_400(
    http: httpx.Client, case: str, body: bytes, headers: dict[str, str]
) -> None:
    response = http.post("/v2/models/affine/infer", content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"error"}
    assert response.json()["error"]


def binary_request(
    size: int, payload: bytes, datatype: str = "FP32", shape: list[int] | None = None
) -> tuple[bytes, dict[str, str]]:
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": datatype,
                    "shape": shape or [1, 4],
                    "parameters": {"binary_data_size": size},
                }
            ]
        }
    )
    return header + payload, {"Inference-Header-Content-Length": str(len(header))}


@pytest.mark.parametrize(
    ("case", "size", "payload"),
    [
        ("truncated binary data", 16, b"\x00" * 8),
        ("binary size that does not fit the shape", 12, b"\x00" * 12),
        ("bytes left over after the inputs", 16, b"\x00" * 20),
    ],
)
def test_malformed_binary_request_is_a_clear_400(
    http: httpx.Client, case: str, size: int, payload: bytes
) -> None:
    body, headers = binary_request(size, payload)
    response = http.post("/v2/models/affine/infer", content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["error"]


def test_truncated_bytes_element_is_a_clear_400(http: httpx.Client) -> None:
    payload = (10).to_bytes(4, "little") + b"abc"  # says 10 bytes, holds 3
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "text",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": len(payload)},
                }
            ]
        }
    )
    response = http.post(
        "/v2/models/text_normalizer/infer",
        content=header + payload,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status_code == 400
    assert "truncated" in response.json()["error"]


def grpc_request(**tensor: Any) -> Any:
    request = service_pb2.ModelInferRequest(model_name="affine")
    request.inputs.add(name="x", datatype=tensor.pop("datatype", "FP32"), shape=tensor.pop("shape", [1, 4]))
    return request


def raw(request: Any, *payloads: bytes) -> Any:
    request.raw_input_contents.extend(payloads)
    return request


def typed(request: Any, values: list[float]) -> Any:
    request.inputs[0].contents.fp32_contents.extend(values)
    return request


MALFORMED_GRPC = [
    ("truncated raw contents", raw(grpc_request(), b"\x00" * 8)),
    ("raw contents for two inputs", raw(grpc_request(), b"\x00" * 16, b"\x00" * 16)),
    ("contents shorter than the shape", typed(grpc_request(), [1.0, 2.0])),
    ("no data at all", grpc_request()),
    ("unknown datatype", raw(grpc_request(datatype="FP8"), b"\x00" * 16)),
    ("FP16 in typed contents", typed(grpc_request(datatype="FP16"), [1.0] * 4)),
    ("no inputs", service_pb2.ModelInferRequest(model_name="affine")),
]


@pytest.mark.parametrize(("case", "request_message"), MALFORMED_GRPC, ids=[c[0] for c in MALFORMED_GRPC])
def test_malformed_grpc_request_is_invalid_argument(
    gateway: RunningGateway, case: str, request_message: Any
) -> None:
    with grpc.insecure_channel(gateway.grpc) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request_message, timeout=10)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details()


def test_unknown_route_is_json_404(http: httpx.Client) -> None:
    response = http.get("/v2/nothing/here")
    assert response.status_code == 404
    assert "error" in response.json()


def wait_for_inflight(http: httpx.Client, model: str, count: int) -> None:
    line = f'modelyard_inflight_requests{{model="{model}"}} {float(count)}'
    for _ in range(600):
        if line in http.get("/metrics").text:
            return
        time.sleep(0.02)
    raise AssertionError(f"{model} never had {count} request(s) in flight")


def test_over_the_limit_is_429_with_retry_after(
    protocol: Protocol, gateway: RunningGateway, http: httpx.Client
) -> None:
    """spin_limited allows one request at a time and queues none; a long one holds the slot."""
    long_request = {"inputs": [{"name": "n", "datatype": "INT64", "shape": [1], "data": [4000]}]}
    results: list[httpx.Response] = []
    holder = threading.Thread(
        target=lambda: results.append(
            httpx.post(f"{gateway.url}/v2/models/spin_limited/infer", json=long_request, timeout=120)
        )
    )
    holder.start()
    try:
        wait_for_inflight(http, "spin_limited", 1)
        if protocol.is_grpc:
            with pytest.raises(InferenceServerException) as caught:
                infer("spin_limited", name="n", data=np.array([1]), datatype="INT64")(protocol)
            assert protocol.error_code(caught.value) == "RESOURCE_EXHAUSTED"
        else:
            response = http.post(
                "/v2/models/spin_limited/infer",
                json={"inputs": [{"name": "n", "datatype": "INT64", "shape": [1], "data": [1]}]},
            )
            assert response.status_code == 429
            assert response.headers["Retry-After"] == "1"
            assert "limit" in response.json()["error"]
    finally:
        holder.join()
    assert results[0].status_code == 200, results[0].text


def test_passed_deadline_is_504(protocol: Protocol) -> None:
    """spin_deadline has timeout_ms 50; an n=3000 product takes far longer on any CPU."""
    with pytest.raises(InferenceServerException) as caught:
        infer("spin_deadline", name="n", data=np.array([3000]), datatype="INT64")(protocol)
    assert protocol.error_code(caught.value) == ("DEADLINE_EXCEEDED" if protocol.is_grpc else "504")


# Quiet errors: what a client reads names the model, version and cause, never a server path ----

ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[\w.@+-]+/)+[\w.@+-]*")


def test_client_facing_errors_and_reasons_carry_no_server_path(
    gateway: RunningGateway, http: httpx.Client, test_repo: Path
) -> None:
    bodies = {
        "metadata, failed load": http.get("/v2/models/broken_artifact").text,
        "metadata, invalid config": http.get("/v2/models/broken_config").text,
        "infer, failed load": http.post(
            "/v2/models/broken_artifact/infer", json={"inputs": [good_input()]}
        ).text,
        "load of an unknown model": http.post("/v2/repository/models/no_such_model/load").text,
        "index": http.post("/v2/repository/index").text,
        "status": http.get("/status").text,
        "TF Serving status": http.get("/v1/models/broken_artifact").text,
        "TF Serving status, invalid config": http.get("/v1/models/broken_config").text,
    }
    client = triton_grpc.InferenceServerClient(gateway.grpc)
    try:
        with pytest.raises(InferenceServerException) as caught:
            client.get_model_metadata("broken_artifact")
        bodies["gRPC metadata"] = str(caught.value)
        bodies["gRPC index"] = str(client.get_model_repository_index(as_json=True))
    finally:
        client.close()
    for where, body in bodies.items():
        assert str(test_repo) not in body, where
        assert not ABSOLUTE_PATH.search(body), (where, ABSOLUTE_PATH.search(body))
    # The model, version and cause are still there.
    failed = http.get("/v2/models/broken_artifact").json()["error"]
    assert "'broken_artifact' version 1" in failed and "model.onnx" in failed
    invalid = http.get("/v2/models/broken_config").json()["error"]
    assert "'broken_config'" in invalid and "config.yaml" in invalid and "labelz" in invalid
    assert http.post("/v2/repository/models/no_such_model/load").json() == {
        "error": "failed to load 'no_such_model', failed to poll from model repository"
    }


LONG_NAME = "n" * (10 * 1024 * 1024)


@pytest.mark.parametrize(
    "tensor",
    [
        {"name": LONG_NAME, "datatype": "FP99", "shape": [1, 4], "data": [1, 2, 3, 4]},
        {"name": LONG_NAME, "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3]},
        {"name": LONG_NAME, "datatype": "FP32", "shape": "1,4", "data": [1, 2, 3, 4]},
        {"name": LONG_NAME, "datatype": "FP32", "shape": [1, 4]},
        {"name": LONG_NAME, "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]},
        {"name": LONG_NAME, "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4], "parameters": []},
    ],
    ids=["bad datatype", "short data", "bad shape", "no data", "unknown input", "bad parameters"],
)
def test_a_10_mb_input_name_is_cut_in_its_error(http: httpx.Client, tensor: dict[str, Any]) -> None:
    response = http.post("/v2/models/affine/infer", json={"inputs": [tensor]})
    assert response.status_code == 400
    assert len(response.content) < 1000, response.text[:300]
    assert f"({len(LONG_NAME)} characters)" in response.json()["error"]


def test_a_10_mb_name_is_cut_over_grpc(gateway: RunningGateway) -> None:
    request = service_pb2.ModelInferRequest(model_name="affine")
    request.inputs.add(name=LONG_NAME, datatype="FP99", shape=[1, 4])
    with grpc.insecure_channel(gateway.grpc) as channel, pytest.raises(grpc.RpcError) as caught:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert len(caught.value.details() or "") < 1000


def test_raw_and_typed_contents_together_are_refused(gateway: RunningGateway) -> None:
    """As Triton refuses them: which of the two would the model get?"""
    request = service_pb2.ModelInferRequest(model_name="affine")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    tensor.contents.fp32_contents.extend([9, 9, 9, 9])
    request.raw_input_contents.append(np.ones(4, np.float32).tobytes())
    with grpc.insecure_channel(gateway.grpc) as channel, pytest.raises(grpc.RpcError) as caught:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == (
        "contents field must not be specified when using raw_input_contents for 'x' for model 'affine'"
    )


def test_data_beside_binary_data_size_is_refused(http: httpx.Client) -> None:
    header = orjson.dumps({"inputs": [good_input(parameters={"binary_data_size": 16})]})
    response = http.post(
        "/v2/models/affine/infer",
        content=header + np.ones(4, np.float32).tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status_code == 400
    assert response.json() == {
        "error": "input 'x' has both 'data' and a binary_data_size parameter: send its values one way"
    }


def test_a_value_beyond_fp32_is_refused_and_infinities_come_back_as_triton_writes_them(
    http: httpx.Client, gateway: RunningGateway
) -> None:
    """1e39 is no FP32 value: 400, as for an integer out of range. An infinity the model returns is
    written as Triton writes it (Infinity, -Infinity, NaN: not JSON, but what tritonclient reads),
    never as null."""
    beyond = http.post("/v2/models/affine/infer", json={"inputs": [good_input(data=[1e39, 1, 2, 3])]})
    assert beyond.status_code == 400
    assert beyond.json() == {"error": "input 'x': a value is out of range for FP32"}
    client = triton_http.InferenceServerClient(gateway.http)
    try:
        values = np.array([[np.inf, -np.inf, np.nan, 1.5]], np.float32)
        tensor = triton_http.InferInput("INPUT", [1, 4], "FP32")
        tensor.set_data_from_numpy(values, binary_data=True)
        output = triton_http.InferRequestedOutput("OUTPUT", binary_data=False)
        answer = client.infer("identity_fp32", [tensor], outputs=[output])
        np.testing.assert_array_equal(answer.as_numpy("OUTPUT"), values)
        raw = answer.get_response()["outputs"][0]["data"]
        assert raw[0] == float("inf") and raw[1] == float("-inf") and raw[3] == 1.5
    finally:
        client.close()


def test_gateway_survives_every_bad_request(gateway: RunningGateway, http: httpx.Client) -> None:
    """Runs after the cases above: the process is up, still serving, and logged no stack trace."""
    assert gateway.process.poll() is None
    assert http.get("/v2/health/live").json() == {"live": True}
    good = http.post("/v2/models/affine/infer", json={"inputs": [good_input()]})
    assert good.status_code == 200
    assert "Traceback" not in gateway.output()
