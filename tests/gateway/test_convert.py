"""`modelyard convert`: the example TorchScript and SavedModel become ONNX versions that match their source."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from gateway.tools.convert import ConvertError, check_conversion, convert, next_version, torch_runner
from tests.support import ROOT

REPO = ROOT / "model_repo"
MLP_TORCH = REPO / "mlp_torch" / "1" / "model.pt"
AFFINE_TF = REPO / "affine_tf" / "2" / "model.savedmodel"


def torch_module(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        # TorchScript is deprecated in torch 2.13, yet it is what model.pt holds.
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning
        )
        return torch.jit.load(str(path)).eval()


def modelyard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=ROOT, timeout=240
    )


async def test_torchscript_becomes_an_onnx_version_equal_to_torch(tmp_path: Path) -> None:
    converted, runner = convert(MLP_TORCH, tmp_path, "mlp_onnx")
    assert (converted.version, converted.path) == (1, tmp_path / "mlp_onnx" / "1" / "model.onnx")
    assert runner is not None
    report = await check_conversion(converted, tmp_path, MLP_TORCH, runner)
    assert report.ok, report.table()

    session = ort.InferenceSession(str(converted.path), providers=["CPUExecutionProvider"])
    # Names from mlp_torch/config.yaml; the batch dimension left open.
    assert [(i.name, i.shape[1]) for i in session.get_inputs()] == [("input", 64)]
    assert isinstance(session.get_inputs()[0].shape[0], str)
    assert [o.name for o in session.get_outputs()] == ["logits"]
    rows = np.random.default_rng(11).standard_normal((9, 64)).astype(np.float32)
    (onnx_logits,) = session.run(["logits"], {"input": rows})
    with torch.no_grad():
        torch_logits = torch_module(MLP_TORCH)(torch.from_numpy(rows)).numpy()
    np.testing.assert_allclose(onnx_logits, torch_logits, rtol=1e-4, atol=1e-5)


async def test_a_conversion_that_differs_from_its_source_fails_and_keeps_the_files(tmp_path: Path) -> None:
    converted, _ = convert(MLP_TORCH, tmp_path, "mlp_onnx")
    other_weights = torch_runner(REPO / "mlp_torch" / "2" / "model.pt", ["input"], ["logits"])
    report = await check_conversion(converted, tmp_path, MLP_TORCH, other_weights)
    assert not report.ok
    assert report.verdict().startswith("FAIL  ")
    assert converted.path.is_file()


def test_versions_count_up_and_are_never_overwritten(tmp_path: Path) -> None:
    first, _ = convert(MLP_TORCH, tmp_path, "mlp_onnx")
    second, _ = convert(MLP_TORCH, tmp_path, "mlp_onnx")
    assert (first.version, second.version) == (1, 2)
    assert next_version(tmp_path / "mlp_onnx") == 3
    assert (
        convert(MLP_TORCH, tmp_path, "mlp_onnx", version=7)[0].path
        == tmp_path / "mlp_onnx" / "7" / "model.onnx"
    )
    with pytest.raises(ConvertError, match="already exists"):
        convert(MLP_TORCH, tmp_path, "mlp_onnx", version=2)


async def test_a_file_without_config_takes_shapes_from_the_command(tmp_path: Path) -> None:
    bare = tmp_path / "bare.pt"
    shutil.copy(MLP_TORCH, bare)
    repo = tmp_path / "repo"
    repo.mkdir()
    with pytest.raises(ConvertError, match="--input-shape"):
        convert(bare, repo, "mlp_onnx")
    assert not (repo / "mlp_onnx").exists()  # nothing half-written is left to be served
    converted, runner = convert(bare, repo, "mlp_onnx", input_shapes=[(-1, 64)])
    session = ort.InferenceSession(str(converted.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input0"]
    assert [o.name for o in session.get_outputs()] == ["output0"]
    assert (await check_conversion(converted, repo, bare, runner)).ok


def test_what_cannot_be_converted(tmp_path: Path) -> None:
    with pytest.raises(ConvertError, match="does not exist"):
        convert(tmp_path / "nope.pt", tmp_path, "m")
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ConvertError, match="cannot tell what"):
        convert(tmp_path / "weights.bin", tmp_path, "m")
    with pytest.raises(ConvertError, match="torch cannot load"):
        convert(tmp_path / "weights.bin", tmp_path, "m", source_format="torchscript", input_shapes=[(-1, 4)])
    with pytest.raises(ConvertError, match="--from must be one of torchscript, savedmodel"):
        convert(MLP_TORCH, tmp_path, "m", source_format="keras")
    # An ONNX version cannot join a model that config.yaml puts on another backend.
    torch_model = tmp_path / "mlp_torch"
    shutil.copytree(REPO / "mlp_torch", torch_model)
    with pytest.raises(ConvertError, match="served by torchserve"):
        convert(MLP_TORCH, tmp_path, "mlp_torch")
    assert sorted(p.name for p in torch_model.iterdir()) == ["1", "2", "config.yaml"]


@pytest.mark.skipif(
    importlib.util.find_spec("tf2onnx") is None, reason="the convert extra (tf2onnx) is not installed"
)
async def test_savedmodel_becomes_an_onnx_version_equal_to_tensorflow(tmp_path: Path) -> None:
    converted, runner = convert(AFFINE_TF, tmp_path, "affine_onnx")
    assert runner is None and converted.source_format == "savedmodel"
    report = await check_conversion(converted, tmp_path, AFFINE_TF, runner, batch=6)
    assert report.ok, report.table()
    assert [(d.name, d.shape) for d in report.outputs] == [("y", (6, 3))]


def test_command_converts_and_prints_the_check(tmp_path: Path) -> None:
    result = modelyard("convert", str(MLP_TORCH), "--model-repo", str(tmp_path), "--name", "mlp_onnx")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"wrote {tmp_path}/mlp_onnx/1/model.onnx (torchscript -> ONNX opset 17)"
    assert lines[2].split()[:2] == ["logits", "4x10"]
    assert lines[-1].startswith(f"PASS  {MLP_TORCH} (torch) vs mlp_onnx:1 (onnxruntime)")

    result = modelyard(
        "convert", str(MLP_TORCH), "--model-repo", str(tmp_path), "--name", "mlp_onnx", "--version", "1"
    )
    assert result.returncode == 2
    assert "already exists" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr

    result = modelyard(
        "convert", str(MLP_TORCH), "--model-repo", str(tmp_path), "--name", "m", "--input-shape", "a,b"
    )
    assert result.returncode == 2
    assert "error: --input-shape 'a,b' is not a list of integers" in result.stderr
