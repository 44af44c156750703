"""A gateway that serves no TensorFlow-family model does not load TensorFlow, until the first TF
Serving gRPC call, which is then answered as always, the start-up noise still filtered."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest

from gateway.native_logs import is_noise
from tests.support import RunningGateway, start_gateway

X = np.random.default_rng(20261203).standard_normal((3, 4)).astype(np.float32)


def tensorflow_loaded(pid: int) -> bool:
    """Whether the process has TensorFlow's native library mapped: what importing it loads."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "libtensorflow_framework" in maps or "_pywrap_tensorflow_internal" in maps


def expected(repo: Path) -> Any:
    session = ort.InferenceSession(str(repo / "affine" / "1" / "model.onnx"))
    return session.run(None, {"x": X})[0]


@pytest.fixture(scope="module")
def onnx_gateway(small_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    running = start_gateway(small_repo, tmp_path_factory.mktemp("onnx_only") / "gateway.log")
    yield running
    assert running.stop() == 0


def test_tensorflow_is_loaded_by_the_first_tfserving_grpc_call(
    onnx_gateway: RunningGateway, small_repo: Path
) -> None:
    tf = pytest.importorskip("tensorflow")
    from tensorflow_serving.apis import (
        get_model_status_pb2,
        model_service_pb2_grpc,
        predict_pb2,
        prediction_service_pb2_grpc,
    )

    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(X.shape), "data": X.ravel().tolist()}]}
    answer = httpx.post(f"{onnx_gateway.url}/v2/models/affine/infer", json=body, timeout=10)
    assert answer.status_code == 200, answer.text
    (output,) = answer.json()["outputs"]
    np.testing.assert_allclose(np.reshape(output["data"], output["shape"]), expected(small_repo), rtol=1e-5)
    assert not tensorflow_loaded(onnx_gateway.process.pid)

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "affine"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(X))
    with grpc.insecure_channel(onnx_gateway.grpc) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        # Several first calls at once: all wait for the one import.
        calls: list[Future[Any]] = [stub.Predict.future(request, timeout=120) for _ in range(4)]
        for call in calls:
            result = call.result()
            np.testing.assert_allclose(
                tf.make_ndarray(result.outputs["y"]), expected(small_repo), rtol=1e-5, atol=1e-6
            )
            assert result.model_spec.version.value == 1
        status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
            get_model_status_pb2.GetModelStatusRequest(model_spec=request.model_spec), timeout=10
        )
        assert [v.version for v in status.model_version_status] == [1]
    assert tensorflow_loaded(onnx_gateway.process.pid)
    noise = [line for line in onnx_gateway.output().splitlines(True) if is_noise(line)]
    assert not noise, noise


def test_the_registered_methods_are_the_packages() -> None:
    pytest.importorskip("tensorflow_serving")
    from tensorflow_serving.apis import model_service_pb2, prediction_service_pb2

    from gateway.protocols.tfserving_grpc import METHODS

    served = {
        service.full_name: tuple(sorted(m.name for m in service.methods))
        for module in (prediction_service_pb2, model_service_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
    }
    assert served == {name: tuple(sorted(methods)) for name, methods in METHODS.items()}
