"""Health, server and model metadata, and model configuration, through tritonclient and raw HTTP."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from tritonclient.utils import InferenceServerException

from tests.support import Protocol


def as_dict(protocol: Protocol, method: str, *args: Any, **kwargs: Any) -> Any:
    call = getattr(protocol.client, method)
    return call(*args, as_json=True, **kwargs) if protocol.is_grpc else call(*args, **kwargs)


def test_server_live_and_ready(protocol: Protocol) -> None:
    assert protocol.client.is_server_live()
    assert protocol.client.is_server_ready()


def test_health_bodies_are_small_json(http: httpx.Client) -> None:
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").json() == {"ready": True}


@pytest.mark.parametrize(("model", "version", "ready"), [
    ("affine", "", True), ("affine", "1", True), ("affine", "2", True), ("affine", "canary", True),
    ("broken_artifact", "", False), ("broken_artifact", "1", False), ("broken_config", "", False),
])  # fmt: skip
def test_model_ready(protocol: Protocol, model: str, version: str, ready: bool) -> None:
    assert protocol.client.is_model_ready(model, version) is ready


def test_unknown_model_ready_is_not_found(protocol: Protocol) -> None:
    if protocol.is_grpc:
        with pytest.raises(InferenceServerException) as caught:
            protocol.client.is_model_ready("no_such_model")
        assert protocol.error_code(caught.value) == "NOT_FOUND"
    else:
        assert protocol.client.is_model_ready("no_such_model") is False


def test_server_metadata(protocol: Protocol) -> None:
    meta = as_dict(protocol, "get_server_metadata")
    assert meta["name"] == "modelyard"
    assert {"binary_tensor_data", "model_repository", "statistics", "model_configuration"} <= set(
        meta["extensions"]
    )


@pytest.mark.parametrize("version", ["", "1", "2"])
def test_model_metadata_has_real_names_and_dynamic_dims(protocol: Protocol, version: str) -> None:
    meta = as_dict(protocol, "get_model_metadata", "affine", version)
    assert meta["name"] == "affine"
    assert meta["versions"] == ["1", "2"]
    assert meta["platform"] == "onnxruntime_onnx"
    shape = [int(d) for d in meta["inputs"][0]["shape"]]  # gRPC's JSON writes int64 as strings
    assert (meta["inputs"][0]["name"], meta["inputs"][0]["datatype"], shape) == ("x", "FP32", [-1, 4])
    out_shape = [int(d) for d in meta["outputs"][0]["shape"]]
    assert (meta["outputs"][0]["name"], meta["outputs"][0]["datatype"], out_shape) == ("y", "FP32", [-1, 3])


def test_model_metadata_from_artifact_without_config(protocol: Protocol) -> None:
    meta = as_dict(protocol, "get_model_metadata", "mlp")
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]] == [
        ("input", "FP32", [-1, 64])
    ]
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["outputs"]] == [
        ("logits", "FP32", [-1, 10])
    ]


def test_metadata_of_unknown_model_is_not_found(protocol: Protocol) -> None:
    with pytest.raises(InferenceServerException) as caught:
        as_dict(protocol, "get_model_metadata", "no_such_model")
    assert protocol.error_code(caught.value) == ("NOT_FOUND" if protocol.is_grpc else "404")


def test_model_config(protocol: Protocol) -> None:
    config = as_dict(protocol, "get_model_config", "affine")
    config = config.get("config", config)  # gRPC wraps it in ModelConfigResponse
    assert config["name"] == "affine"
    assert config["backend"] == "onnxruntime"
    assert config["platform"] == "onnxruntime_onnx"
    assert config["version_policy"] == {"all": {}}
    assert config["input"][0]["name"] == "x" and config["input"][0]["data_type"] == "TYPE_FP32"
    assert [int(d) for d in config["input"][0]["dims"]] == [-1, 4]
    assert config["output"][0]["data_type"] == "TYPE_FP32"


def test_bytes_datatype_is_type_string_in_config(protocol: Protocol) -> None:
    config = as_dict(protocol, "get_model_config", "text_normalizer")
    config = config.get("config", config)
    assert config["input"][0]["data_type"] == "TYPE_STRING"


def test_grpc_health_and_reflection(gateway: Any) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(gateway.grpc) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        services = {s.name for r in responses for s in r.list_services_response.service}
    assert "inference.GRPCInferenceService" in services
    assert "grpc.health.v1.Health" in services


def test_openapi_documents_the_infer_endpoint(http: httpx.Client) -> None:
    # Infer is served ahead of FastAPI's router, so the document only has it if added by hand.
    paths = http.get("/openapi.json").json()["paths"]
    for path in ("/v2/models/{model_name}/infer", "/v2/models/{model_name}/versions/{model_version}/infer"):
        operation = paths[path]["post"]
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        assert schema["required"] == ["inputs"]
        assert {p["name"] for p in operation["parameters"]} <= {"model_name", "model_version"}


def test_other_methods_on_the_infer_path_are_not_inference(http: httpx.Client) -> None:
    response = http.get("/v2/models/affine/infer")
    assert response.status_code in (404, 405)
    assert "error" in response.json()
