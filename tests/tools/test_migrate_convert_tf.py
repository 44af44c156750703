"""`modelyard migrate` from TensorFlow and Keras: `affine_tf` to LiteRT, `mlp_tf` to ONNX,
`affine_keras` to LiteRT and to a SavedModel, each checked against its source through the real adapters. Each conversion runs
TensorFlow in a process of its own, so there are few of them: one module-scoped run of each."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from gateway.cli import app
from gateway.registry import Registry
from gateway.tools.migrate import state
from tests.support import ROOT

REPO = ROOT / "model_repo"


def migrate(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["migrate", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("migrate_tf")
    for model in ("affine_tf", "affine_keras", "mlp_tf"):
        shutil.copytree(REPO / model, root / "repo" / model)
    # A one-version Keras model, for the SavedModel route: each version is a TensorFlow process.
    (root / "repo" / "affine_keras_one" / "1").mkdir(parents=True)
    shutil.copy(REPO / "affine_keras" / "2" / "model.keras", root / "repo" / "affine_keras_one" / "1")
    (root / "repo" / "affine_keras_one" / "config.yaml").write_text("backend: keras\n")
    return root / "repo"


@pytest.fixture(scope="module")
def runs(repo: Path) -> dict[str, tuple[int, str, str]]:
    states = repo.parent / "states"
    common = ("--model-repo", str(repo), "--state-dir", str(states), "--batch", "5")
    return {
        "affine_tf": migrate("affine_tf", "--to", "litert", *common),
        "affine_keras": migrate("affine_keras", "--to", "tflite", *common),
        "affine_keras_one": migrate("affine_keras_one", "--to", "tensorflow", *common),
        "mlp_tf": migrate("mlp_tf", "--to", "onnx", *common),
    }


@pytest.mark.parametrize(
    ("model", "deployment", "backend", "artifact"),
    [
        ("affine_tf", "affine_tf_litert", "litert", "model.tflite"),
        ("affine_keras", "affine_keras_litert", "litert", "model.tflite"),
        ("affine_keras_one", "affine_keras_one_tf", "tensorflow", "model.savedmodel"),
        ("mlp_tf", "mlp_tf_onnx", "onnxruntime", "model.onnx"),
    ],
)
def test_converted_and_checked(
    runs: dict[str, tuple[int, str, str]],
    repo: Path,
    model: str,
    deployment: str,
    backend: str,
    artifact: str,
) -> None:
    code, out, err = runs[model]
    assert code == 0, out + err
    versions = sorted(int(p.name) for p in (repo / model).iterdir() if p.name.isdigit())
    assert [line.split()[1] for line in out.splitlines() if line.startswith("  version ")] == [
        str(v) for v in versions
    ]
    assert "inputs generated from the signature, 5 row(s)" in out
    assert out.splitlines()[-1].startswith(f"PASS  {deployment} answers as {model}")
    for version in versions:
        assert (repo / deployment / str(version) / artifact).exists()
    config = yaml.safe_load((repo / deployment / "config.yaml").read_text())
    assert (config["backend"], config["twin_of"]) == (backend, model)
    source = yaml.safe_load((repo / model / "config.yaml").read_text())
    assert {k: config[k] for k in ("labels", "limits") if k in source} == {
        k: source[k] for k in ("labels", "limits") if k in source
    }
    step = state.load(repo.parent / "states", model).steps["check"]
    assert step["ok"] is True and step["versions"] == versions
    assert (step["inputs"], step["cases"]) == ("generated", 1)


async def test_the_litert_twin_answers_as_the_savedmodel(
    runs: dict[str, tuple[int, str, str]], repo: Path
) -> None:
    assert runs["affine_tf"][0] == 0
    rows = np.random.default_rng(3).standard_normal((6, 4)).astype(np.float32)
    registry = Registry(repo)
    try:
        source, twin = await registry.load("affine_tf"), await registry.load("affine_tf_litert")
        for version in (1, 2):
            adapters = (source.versions[version].adapter, twin.versions[version].adapter)
            assert adapters[0] is not None and adapters[1] is not None
            expected, served = [(await a.infer({"x": rows}, ["y"]))["y"] for a in adapters]
            np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-5)
    finally:
        await registry.aclose()
