"""The in-process TensorFlow adapter: SavedModel layouts, signatures, metadata, inference, errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from adapters import adapter_class
from adapters.base import LoadSpec
from adapters.tensorflow import TensorFlowAdapter
from gateway.config import ModelConfig, load_model_config
from gateway.errors import InvalidInput, ModelNotReady
from gateway.repository import scan_model
from gateway.types import Datatype, TensorSpec
from tests.support import ROOT

EXAMPLE = ROOT / "model_repo" / "affine_tf"
X = np.random.default_rng(20261125).standard_normal((6, 4)).astype(np.float32)


def spec_for(artifact: Path, config: ModelConfig | None = None, version: int = 1) -> LoadSpec:
    return LoadSpec("m", version, artifact.parent, artifact, config or ModelConfig(backend="tensorflow"))


def onnx_affine(version: int, x: np.ndarray[Any, Any]) -> Any:
    session = ort.InferenceSession(str(ROOT / "model_repo" / "affine" / str(version) / "model.onnx"))
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("version", [1, 2])
async def test_affine_tf_equals_the_onnx_affine(version: int) -> None:
    artifact = EXAMPLE / str(version) / "model.savedmodel"
    config = load_model_config(EXAMPLE / "config.yaml")
    async with TensorFlowAdapter(spec_for(artifact, config, version)) as adapter:
        assert await adapter.ready()
        signature = await adapter.metadata()
        assert signature.inputs == (TensorSpec("x", Datatype.FP32, (-1, 4)),)
        assert signature.outputs == (TensorSpec("y", Datatype.FP32, (-1, 3)),)
        assert signature.platform == "tensorflow_savedmodel"
        result = await adapter.infer({"x": X}, ["y"])
    assert result["y"].dtype == np.float32
    np.testing.assert_allclose(result["y"], onnx_affine(version, X), rtol=1e-5, atol=1e-6)
    assert not await adapter.ready()


async def test_saved_model_files_straight_in_the_version_folder(tmp_path: Path) -> None:
    shutil.copytree(EXAMPLE / "2" / "model.savedmodel", tmp_path / "plain" / "2")
    entry = scan_model(tmp_path, "plain")
    assert entry.ok, entry.problems
    assert entry.backend == "tensorflow"
    (version,) = entry.versions
    assert version.artifact == tmp_path / "plain" / "2" / "saved_model.pb"
    spec = LoadSpec("plain", 2, version.path, version.artifact, entry.config)
    async with adapter_class("tensorflow")(spec) as adapter:
        result = await adapter.infer({"x": X}, ["y"])
    np.testing.assert_allclose(result["y"], onnx_affine(2, X), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def two_signatures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SavedModel built here: serving_default (y = x + 1), `scaled` (z = 2 * x, INT32) and
    `any_rank` (upper-cased strings of any rank)."""
    import tensorflow as tf

    class Module(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
        def plus_one(self, x: Any) -> dict[str, Any]:
            return {"y": x + 1.0}

        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.int32, name="x")])
        def scaled(self, x: Any) -> dict[str, Any]:
            return {"z": x * 2}

        @tf.function(input_signature=[tf.TensorSpec(None, tf.string, name="s")])
        def any_rank(self, s: Any) -> dict[str, Any]:
            return {"upper": tf.strings.upper(s)}

    module = Module()
    path = tmp_path_factory.mktemp("two_signatures") / "1" / "model.savedmodel"
    tf.saved_model.save(
        module,
        str(path),
        signatures={"serving_default": module.plus_one, "scaled": module.scaled, "any_rank": module.any_rank},
    )
    return path


async def test_config_picks_the_signature(two_signatures: Path) -> None:
    config = ModelConfig(backend="tensorflow", tensorflow={"signature": "scaled", "intra_op_threads": 2})
    async with TensorFlowAdapter(spec_for(two_signatures, config)) as adapter:
        signature = await adapter.metadata()
        assert signature.inputs == (TensorSpec("x", Datatype.INT32, (-1, 2)),)
        assert signature.outputs == (TensorSpec("z", Datatype.INT32, (-1, 2)),)
        x = np.arange(6, dtype=np.int32).reshape(3, 2)
        result = await adapter.infer({"x": x}, ["z"])
    np.testing.assert_array_equal(result["z"], x * 2)


async def test_unknown_signature_names_the_ones_there(two_signatures: Path) -> None:
    config = ModelConfig(backend="tensorflow", tensorflow={"signature": "nope"})
    with pytest.raises(
        ModelNotReady,
        match=r"model 'm' version 1: .*no signature 'nope'; it has any_rank, scaled, serving_default",
    ):
        await TensorFlowAdapter(spec_for(two_signatures, config)).load()


async def test_unknown_rank_must_be_declared(two_signatures: Path) -> None:
    section = {"signature": "any_rank"}
    with pytest.raises(ModelNotReady, match=r"model 'm' version 1: tensor\(s\) s have no known rank"):
        await TensorFlowAdapter(
            spec_for(two_signatures, ModelConfig(backend="tensorflow", tensorflow=section))
        ).load()
    declared = ModelConfig.model_validate(
        {
            "backend": "tensorflow",
            "tensorflow": section,
            "inputs": [{"name": "s", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "upper", "datatype": "BYTES", "shape": [-1]}],
        }
    )
    async with TensorFlowAdapter(spec_for(two_signatures, declared)) as adapter:
        assert (await adapter.metadata()).inputs == (TensorSpec("s", Datatype.BYTES, (-1,)),)
        result = await adapter.infer({"s": np.array([b"abc", "caf\u00e9".encode()], dtype=object)}, ["upper"])
    assert list(result["upper"]) == [b"ABC", "CAF\u00e9".encode()]


async def test_input_the_graph_rejects_is_invalid(two_signatures: Path) -> None:
    async with TensorFlowAdapter(spec_for(two_signatures)) as adapter:
        with pytest.raises(
            InvalidInput, match="model 'm' version 1: TensorFlow rejected the input"
        ) as caught:
            # Past the gateway's shape check, the graph itself refuses a rank it was not built for.
            await adapter.infer({"x": np.ones((2, 2), np.float32)}, ["y"])
    assert caught.value.__cause__ is not None


async def test_unreadable_savedmodel_is_not_ready(tmp_path: Path) -> None:
    artifact = tmp_path / "m" / "1" / "saved_model.pb"
    artifact.parent.mkdir(parents=True)
    artifact.write_bytes(b"not a SavedModel")
    with pytest.raises(
        ModelNotReady, match="model 'm' version 1: TensorFlow cannot load the SavedModel"
    ) as caught:
        await TensorFlowAdapter(spec_for(artifact)).load()
    assert caught.value.__cause__ is not None


def test_invalid_section_is_not_ready() -> None:
    config = ModelConfig(backend="tensorflow", tensorflow={"signatur": "x"})
    with pytest.raises(
        ModelNotReady,
        match=r"model 'm' version 1: invalid config\.yaml section: tensorflow: unknown key 'signatur' \(did you mean 'signature'\?\)",
    ):
        TensorFlowAdapter(spec_for(EXAMPLE / "1" / "model.savedmodel", config))


def test_without_tensorflow_the_error_says_what_to_install() -> None:
    """The classes import without TensorFlow; loading a version is what needs it."""
    code = (
        "import asyncio, sys; sys.modules['tensorflow'] = None\n"
        "from pathlib import Path\n"
        "from adapters import adapter_class\n"
        "from adapters.base import LoadSpec\n"
        "from gateway.config import ModelConfig\n"
        "from gateway.errors import ModelNotReady\n"
        "sections = {'tensorflow': {}, 'tfserving': {'grpc': '127.0.0.1:1'}}\n"
        "async def main():\n"
        "    for backend, section in sections.items():\n"
        "        config = ModelConfig.model_validate({'backend': backend, backend: section})\n"
        "        artifact = Path('model_repo/affine_tf/1/model.savedmodel')\n"
        "        adapter = adapter_class(backend)(LoadSpec('m', 1, artifact.parent, artifact, config))\n"
        "        try:\n"
        "            await adapter.load()\n"
        "        except ModelNotReady as exc:\n"
        "            print(exc)\n"
        "asyncio.run(main())\n"
        "assert 'tensorflow' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    for backend, line in zip(("tensorflow", "tfserving"), lines, strict=True):
        assert f"model 'm' version 1: backend '{backend}' cannot import tensorflow" in line
        assert "install the 'tensorflow' extra (pip install 'modelyard[tensorflow]')" in line


def test_build_script_is_reproducible(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "scripts.build_tf_models", "--repo", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    built = sorted(
        p.relative_to(tmp_path / "affine_tf") for p in (tmp_path / "affine_tf").rglob("*") if p.is_file()
    )
    committed = sorted(p.relative_to(EXAMPLE) for p in EXAMPLE.rglob("*") if p.is_file())
    assert built == committed
    for relative in built:
        assert (tmp_path / "affine_tf" / relative).read_bytes() == (EXAMPLE / relative).read_bytes(), relative
    # The same script's LiteRT twin is byte-identical too; the Keras twin's zip records when it was
    # saved, so its config and weights are compared instead.
    for version in ("1", "2"):
        litert = Path(version) / "model.tflite"
        assert (tmp_path / "affine_litert" / litert).read_bytes() == (
            ROOT / "model_repo" / "affine_litert" / litert
        ).read_bytes()
        assert keras_contents(tmp_path / "affine_keras" / version / "model.keras") == keras_contents(
            ROOT / "model_repo" / "affine_keras" / version / "model.keras"
        )
    for name in ("affine_litert", "affine_keras"):
        assert (tmp_path / name / "config.yaml").read_text() == (
            ROOT / "model_repo" / name / "config.yaml"
        ).read_text()


def keras_contents(path: Path) -> tuple[str, list[bytes]]:
    """A .keras file's model config and its weights, as bytes, without the time it was saved."""
    import zipfile

    import h5py

    with zipfile.ZipFile(path) as archive, tempfile.TemporaryDirectory() as folder:
        config = archive.read("config.json").decode()
        archive.extract("model.weights.h5", folder)
        weights: list[bytes] = []
        with h5py.File(Path(folder) / "model.weights.h5") as h5:
            h5.visititems(
                lambda _, item: weights.append(item[()].tobytes()) if isinstance(item, h5py.Dataset) else None
            )
    return config, weights
