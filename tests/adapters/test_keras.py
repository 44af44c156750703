"""Keras 3 (`backend: keras`): the affine example through v2 REST and gRPC and TF Serving's API on
the session gateway (Keras on TensorFlow), a gateway of its own on Keras' torch backend, and the
one-backend-per-process rule."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton_http

from adapters import adapter_class
from adapters.base import LoadSpec
from gateway.config import ModelConfig
from gateway.errors import ModelNotReady
from tests.support import Protocol, TfServingProtocol, start_gateway

pytest.importorskip("keras", reason="the keras extra is not installed")

X = np.random.default_rng(11).standard_normal((6, 4)).astype(np.float32)


def onnx_affine(test_repo: Path, version: int, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(test_repo / "affine" / str(version) / "model.onnx"))
    return session.run(None, {"x": x})[0]


def infer(client: object, module: object, model: str, x: np.ndarray, version: str = "") -> np.ndarray:
    tensor = module.InferInput("x", list(x.shape), "FP32")  # type: ignore[attr-defined]
    tensor.set_data_from_numpy(x)
    result = client.infer(model, [tensor], model_version=version)  # type: ignore[attr-defined]
    return result.as_numpy("y")


@pytest.mark.parametrize("version", [1, 2])
def test_affine_keras_answers_what_onnx_answers(protocol: Protocol, test_repo: Path, version: int) -> None:
    for rows in (6, 1, 9):
        x = np.random.default_rng(rows).standard_normal((rows, 4)).astype(np.float32)
        got = infer(protocol.client, protocol.module, "affine_keras", x, str(version))
        assert got.dtype == np.float32 and got.shape == (rows, 3)
        np.testing.assert_allclose(got, onnx_affine(test_repo, version, x), rtol=1e-5, atol=1e-5)


def test_metadata_comes_from_the_model(protocol: Protocol) -> None:
    metadata = protocol.client.get_model_metadata("affine_keras", "2")
    if protocol.is_grpc:
        tensors = [(t.name, t.datatype, list(t.shape)) for t in [*metadata.inputs, *metadata.outputs]]
        platform = metadata.platform
    else:
        tensors = [
            (t["name"], t["datatype"], t["shape"]) for t in [*metadata["inputs"], *metadata["outputs"]]
        ]
        platform = metadata["platform"]
    assert tensors == [("x", "FP32", [-1, 4]), ("y", "FP32", [-1, 3])]
    assert platform == "keras_tensorflow"


def test_tf_serving_front_door(tf_protocol: TfServingProtocol, test_repo: Path) -> None:
    got, _ = tf_protocol.predict("affine_keras", {"x": X}, label="canary")
    np.testing.assert_allclose(got, onnx_affine(test_repo, 2, X), rtol=1e-5, atol=1e-5)


async def test_a_second_keras_backend_in_one_process_is_a_clear_error(test_repo: Path) -> None:
    import keras

    running = keras.backend.backend()
    other = "torch" if running != "torch" else "tensorflow"
    artifact = test_repo / "affine_keras" / "1" / "model.keras"
    config = ModelConfig(backend="keras", keras={"backend": other})
    adapter = adapter_class("keras")(LoadSpec("k", 1, artifact.parent, artifact, config))
    with pytest.raises(
        ModelNotReady,
        match=f"asks for the Keras backend '{other}', but this process runs Keras on '{running}'.*KERAS_BACKEND={other}",
    ):
        await adapter.load()
    await adapter.aclose()


async def test_a_bad_file_is_a_clear_load_error(tmp_path: Path) -> None:
    bad = tmp_path / "1" / "model.keras"
    bad.parent.mkdir()
    bad.write_bytes(b"not a zip")
    config = ModelConfig(backend="keras")
    adapter = adapter_class("keras")(LoadSpec("k", 1, bad.parent, bad, config))
    with pytest.raises(ModelNotReady, match=r"Keras cannot load model\.keras"):
        await adapter.load()
    await adapter.aclose()


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_keras_on_torch_in_a_gateway_of_its_own(test_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(test_repo / "affine_keras", repo / "affine_keras_torch")
    config = repo / "affine_keras_torch" / "config.yaml"
    config.write_text(config.read_text().replace("backend: tensorflow", "backend: torch"))
    running = start_gateway(repo, tmp_path / "gateway.log", env={"KERAS_BACKEND": "torch"})
    try:
        client = triton_http.InferenceServerClient(running.http, network_timeout=60)
        assert client.get_model_metadata("affine_keras_torch")["platform"] == "keras_torch"
        got = infer(client, triton_http, "affine_keras_torch", X, "1")
        client.close()
    finally:
        running.stop()
    np.testing.assert_allclose(got, onnx_affine(test_repo, 1, X), rtol=1e-5, atol=1e-5)
