"""Keras 3 (`backend: keras`): the affine example through v2 REST and gRPC and TF Serving's API on
the session gateway (Keras on TensorFlow), a gateway of its own on Keras' torch backend, and the
one-backend-per-process rule."""

from __future__ import annotations

import importlib.util
import shutil
import warnings
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


# Every kind of .keras file Keras 3 loads and calls ------------------------------------------------

CUSTOM_MODULE = '''
import keras


@keras.saving.register_keras_serializable(package="modelyard_test")
class ScaledDense(keras.Model):
    """A subclassed model: no Input, no functional graph; built by its first call."""

    def __init__(self, units=3, scale=2.0, **kwargs):
        super().__init__(**kwargs)
        self.units, self.scale = units, scale
        self.dense = keras.layers.Dense(units)

    def call(self, features):
        return self.dense(features) * self.scale

    def get_config(self):
        return {**super().get_config(), "units": self.units, "scale": self.scale}
'''


def keras_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[Path, str | None]]:
    """One .keras file per kind of model, each saved with `model.save()` as users save them; and the
    module that registers the subclassed one, which is then forgotten, as in a fresh process."""
    import importlib
    import sys

    import keras

    module = f"custom_layers_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(CUSTOM_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    custom = importlib.import_module(module)
    x = np.zeros((5, 4), np.float32)
    with_input = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, "relu"), keras.layers.Dense(3)])
    called = keras.Sequential([keras.layers.Dense(8, "relu"), keras.layers.Dense(3)])
    called(x)  # built only by being called, on a batch of 5
    inputs = keras.Input((4,), name="x")
    functional = keras.Model(inputs, keras.layers.Dense(3, name="y")(keras.layers.Dense(8)(inputs)))
    subclassed = custom.ScaledDense()
    subclassed(x)
    kinds = {
        "sequential_with_input": (with_input, None),
        "sequential_called": (called, None),
        "functional": (functional, None),
        "subclassed": (subclassed, module),
    }
    files = {}
    for kind, (model, custom_module) in kinds.items():
        path = tmp_path / kind / "1" / "model.keras"
        path.parent.mkdir(parents=True)
        with warnings.catch_warnings():
            # TensorFlow's variables predate numpy 2's copy keyword; saving reads them through __array__.
            warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
            model.save(path)
        files[kind] = (path, custom_module)
    keras.saving.get_custom_objects().pop("modelyard_test>ScaledDense")
    del sys.modules[module]
    return files


@pytest.mark.parametrize("kind", ["sequential_with_input", "sequential_called", "functional", "subclassed"])
async def test_every_kind_of_keras_model_serves_what_keras_predicts(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import keras

    path, custom_module = keras_models(tmp_path, monkeypatch)[kind]
    section = {"custom_objects_module": custom_module} if custom_module else {}
    config = ModelConfig(backend="keras", keras=section)
    async with adapter_class("keras")(LoadSpec(kind, 1, path.parent, path, config)) as adapter:
        signature = await adapter.metadata()
        ((name, datatype, shape),) = [(s.name, s.datatype.value, s.shape) for s in signature.inputs]
        assert (datatype, shape) == ("FP32", (-1, 4)), signature
        ((output, out_datatype, out_shape),) = [
            (s.name, s.datatype.value, s.shape) for s in signature.outputs
        ]
        assert (out_datatype, out_shape) == ("FP32", (-1, 3)), signature
        if kind == "functional":
            assert (name, output) == ("x", "y")
        # Any batch, not only the one a model was first called with.
        for rows in (1, 5, 7):
            x = np.random.default_rng(rows).standard_normal((rows, 4)).astype(np.float32)
            got = (await adapter.infer({name: x}, [output]))[output]
            expected = keras.saving.load_model(path, compile=False).predict(x, verbose=0)
            assert got.shape == (rows, 3)
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


async def test_a_subclassed_model_needs_the_module_that_registers_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, module = keras_models(tmp_path, monkeypatch)["subclassed"]
    adapter = adapter_class("keras")(LoadSpec("s", 1, path.parent, path, ModelConfig(backend="keras")))
    with pytest.raises(ModelNotReady, match=r"ScaledDense.*keras\.custom_objects_module"):
        await adapter.load()
    await adapter.aclose()
    missing = ModelConfig(backend="keras", keras={"custom_objects_module": "no_such_module_here"})
    adapter = adapter_class("keras")(LoadSpec("s", 1, path.parent, path, missing))
    with pytest.raises(
        ModelNotReady, match=r"cannot import keras\.custom_objects_module 'no_such_module_here'"
    ):
        await adapter.load()
    await adapter.aclose()
    named = ModelConfig(backend="keras", keras={"custom_objects_module": module})
    async with adapter_class("keras")(LoadSpec("s", 1, path.parent, path, named)) as adapter:
        assert await adapter.ready()
