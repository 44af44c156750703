"""LiteRT (`backend: litert`): the affine example and an int8-quantized model, through v2 REST and
gRPC and TF Serving's API on the session gateway, then the adapter's own edges in-process."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from tritonclient.utils import InferenceServerException

from adapters import adapter_class
from adapters.base import LoadSpec
from gateway.config import ModelConfig
from gateway.errors import InvalidInput, ModelNotReady
from gateway.types import Datatype, TensorSpec
from tests.support import Protocol, TfServingProtocol, start_gateway

ai_edge_litert = pytest.importorskip("ai_edge_litert.interpreter", reason="the litert extra is not installed")

X = np.random.default_rng(7).standard_normal((5, 4)).astype(np.float32)


def onnx_affine(test_repo: Path, version: int, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(test_repo / "affine" / str(version) / "model.onnx"))
    return session.run(None, {"x": x})[0]


def infer(
    protocol: Protocol, model: str, x: np.ndarray, version: str = "", datatype: str = "FP32"
) -> np.ndarray:
    result = protocol.client.infer(
        model, [protocol.input("x", x, datatype)], model_version=version, outputs=[protocol.output("y")]
    )
    return result.as_numpy("y")


@pytest.mark.parametrize("version", [1, 2])
def test_affine_litert_answers_what_onnx_answers(protocol: Protocol, test_repo: Path, version: int) -> None:
    # Batches of 5, 1 and 17 rows: each differs from the last, so the interpreter resizes each time.
    for rows in (5, 1, 17):
        x = np.random.default_rng(rows).standard_normal((rows, 4)).astype(np.float32)
        got = infer(protocol, "affine_litert", x, str(version))
        assert got.dtype == np.float32 and got.shape == (rows, 3)
        np.testing.assert_allclose(got, onnx_affine(test_repo, version, x), rtol=1e-5, atol=1e-5)


def test_metadata_comes_from_the_interpreter(protocol: Protocol) -> None:
    metadata = protocol.client.get_model_metadata("affine_litert", "1")
    if protocol.is_grpc:
        inputs = [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs]
        outputs = [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs]
        platform = metadata.platform
    else:
        inputs = [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]]
        outputs = [(t["name"], t["datatype"], t["shape"]) for t in metadata["outputs"]]
        platform = metadata["platform"]
    assert (inputs, outputs, platform) == (
        [("x", "FP32", [-1, 4])],
        [("y", "FP32", [-1, 3])],
        "litert_tflite",
    )


def test_a_wrong_shape_is_a_clear_400(protocol: Protocol) -> None:
    with pytest.raises(InferenceServerException) as caught:
        infer(protocol, "affine_litert", np.zeros((2, 5), np.float32))
    assert protocol.error_code(caught.value) in ("400", "INVALID_ARGUMENT")
    assert "affine_litert" in caught.value.message()


def quantized_reference(test_repo: Path, q: np.ndarray) -> tuple[np.ndarray, dict[str, object]]:
    """The int8 answer from LiteRT's own interpreter, and the output's quantization parameters."""
    interpreter = ai_edge_litert.Interpreter(str(test_repo / "quantized_litert" / "1" / "model.tflite"))
    runner = interpreter.get_signature_runner()
    (detail,) = runner.get_output_details().values()
    (answer,) = runner(x=q).values()
    return answer, detail["quantization_parameters"]


def test_a_quantized_model_serves_its_int8_tensors(protocol: Protocol, test_repo: Path) -> None:
    metadata = protocol.client.get_model_metadata("quantized_litert")
    datatypes = (
        [t.datatype for t in [*metadata.inputs, *metadata.outputs]]
        if protocol.is_grpc
        else [t["datatype"] for t in [*metadata["inputs"], *metadata["outputs"]]]
    )
    assert datatypes == ["INT8", "INT8"]
    q = np.random.default_rng(3).integers(-128, 128, (4, 4), dtype=np.int8)
    got = infer(protocol, "quantized_litert", q, datatype="INT8")
    expected, quantization = quantized_reference(test_repo, q)
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got, expected)
    # Dequantized, the answer is the float function's, within a few quantization steps.
    interpreter = ai_edge_litert.Interpreter(str(test_repo / "quantized_litert" / "1" / "model.tflite"))
    (in_detail,) = interpreter.get_signature_runner().get_input_details().values()
    in_scale = np.float32(in_detail["quantization_parameters"]["scales"][0])
    in_zero = np.float32(in_detail["quantization_parameters"]["zero_points"][0])
    out_scale = np.float32(quantization["scales"][0])  # type: ignore[index]
    out_zero = np.float32(quantization["zero_points"][0])  # type: ignore[index]
    x = ((q.astype(np.float32) - in_zero) * in_scale).astype(np.float32)
    dequantized = (got.astype(np.float32) - out_zero) * out_scale
    np.testing.assert_allclose(dequantized, onnx_affine(test_repo, 1, x), atol=4 * out_scale)


@pytest.mark.parametrize("version", ["1", "2"])
def test_tf_serving_front_door(tf_protocol: TfServingProtocol, test_repo: Path, version: str) -> None:
    got, answered = tf_protocol.predict("affine_litert", {"x": X}, version=version)
    np.testing.assert_allclose(got, onnx_affine(test_repo, int(version), X), rtol=1e-5, atol=1e-5)
    assert answered in (None, version)
    signature = tf_protocol.signature("affine_litert", version)
    assert signature["inputs"]["x"][1] == [-1, 4]


# In-process -------------------------------------------------------------------------------------


def spec(artifact: Path, **litert: object) -> LoadSpec:
    config = ModelConfig(backend="litert", litert=dict(litert))
    return LoadSpec("m", 1, artifact.parent, artifact, config)


async def test_pool_serves_concurrent_requests_of_different_batches(test_repo: Path) -> None:
    import asyncio

    artifact = test_repo / "affine_litert" / "1" / "model.tflite"
    adapter_type = adapter_class("litert")
    async with adapter_type(spec(artifact, pool_size=3, threads=2)) as adapter:
        batches = [np.full((rows, 4), rows, np.float32) for rows in (1, 2, 3, 4, 5, 6, 7, 8)]
        results = await asyncio.gather(*(adapter.infer({"x": b}, ["y"]) for b in batches))
    for batch, result in zip(batches, results, strict=True):
        np.testing.assert_allclose(result["y"], onnx_affine(test_repo, 1, batch), rtol=1e-5, atol=1e-5)


async def test_without_xnnpack_the_answer_is_the_same(test_repo: Path) -> None:
    artifact = test_repo / "affine_litert" / "2" / "model.tflite"
    async with adapter_class("litert")(spec(artifact, xnnpack=False)) as adapter:
        assert (await adapter.metadata()).inputs == (TensorSpec("x", Datatype.FP32, (-1, 4)),)
        result = await adapter.infer({"x": X}, ["y"])
    np.testing.assert_allclose(result["y"], onnx_affine(test_repo, 2, X), rtol=1e-5, atol=1e-5)


async def test_wrong_dtype_reaching_the_adapter_is_invalid_input(test_repo: Path) -> None:
    artifact = test_repo / "affine_litert" / "1" / "model.tflite"
    async with adapter_class("litert")(spec(artifact)) as adapter:
        with pytest.raises(InvalidInput, match="LiteRT rejected the input"):
            await adapter.infer({"x": X.astype(np.float64)}, ["y"])


async def test_a_bad_file_or_config_is_a_clear_load_error(tmp_path: Path, test_repo: Path) -> None:
    bad = tmp_path / "1" / "model.tflite"
    bad.parent.mkdir()
    bad.write_bytes(b"not a flatbuffer")
    with pytest.raises(ModelNotReady, match=r"LiteRT cannot load model\.tflite"):
        await adapter_class("litert")(spec(bad)).load()
    artifact = test_repo / "affine_litert" / "1" / "model.tflite"
    with pytest.raises(ModelNotReady, match="has no signature 'nope'; it has serving_default"):
        await adapter_class("litert")(spec(artifact, signature="nope")).load()
    with pytest.raises(ModelNotReady, match="pool_size"):
        adapter_class("litert")(spec(artifact, pool_size=0))


# Without the extra ------------------------------------------------------------------------------


def without_module(shim: Path, module: str) -> None:
    """A package that fails to import the way a missing one does, ahead of site-packages."""
    (shim / module).mkdir(parents=True)
    (shim / module / "__init__.py").write_text(f"raise ModuleNotFoundError(\"No module named '{module}'\")\n")


def test_without_the_extras_those_models_say_so_and_the_rest_serves(test_repo: Path, tmp_path: Path) -> None:
    import httpx

    repo = tmp_path / "repo"
    for name in ("affine", "affine_litert", "affine_keras"):
        shutil.copytree(test_repo / name, repo / name)
    shim = tmp_path / "shim"
    without_module(shim, "ai_edge_litert")
    without_module(shim, "keras")
    running = start_gateway(repo, tmp_path / "gateway.log", env={"PYTHONPATH": str(shim)})
    try:
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
        assert httpx.post(f"{running.url}/v2/models/affine/infer", json=body, timeout=30).status_code == 200
        index = {
            row["name"]: row for row in httpx.post(f"{running.url}/v2/repository/index", timeout=30).json()
        }
        assert "pip install 'modelyard[litert]'" in index["affine_litert"]["reason"], index
        assert "pip install 'modelyard[keras]'" in index["affine_keras"]["reason"], index
        answer = httpx.post(f"{running.url}/v2/models/affine_litert/infer", json=body, timeout=30)
        assert answer.status_code == 503
        assert "modelyard[litert]" in answer.json()["error"]
    finally:
        running.stop()
