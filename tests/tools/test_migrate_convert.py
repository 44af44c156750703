"""`modelyard migrate convert` and `check` from TorchServe to ONNX Runtime: the example `mlp_torch`
becomes `mlp_torch_onnx` beside it, checked version for version against torch itself."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import numpy_helper
from typer.testing import CliRunner

from gateway.cli import app
from gateway.config import load_model_config
from gateway.registry import Registry
from gateway.repository import scan_model
from gateway.tools.migrate import state
from gateway.tools.migrate.check import gather_inputs, record_check, run_check
from gateway.tools.migrate.convert import convert_model, record_convert
from gateway.tools.migrate.state import MigrationError
from tests.support import ROOT, archive_for_torchserve

REPO = ROOT / "model_repo"
ATOL, RTOL = 1e-5, 1e-4


def torch_module(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning
        )
        return torch.jit.load(str(path)).eval()


def repo_with(folder: Path, *models: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for model in models:
        shutil.copytree(REPO / model, folder / model)
    return folder


def migrate(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["migrate", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@dataclass(frozen=True)
class Converted:
    repo: Path
    states: Path


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Converted:
    """mlp_torch converted once, through the functions the command calls, for the tests that only read."""
    root = tmp_path_factory.mktemp("migrate")
    repo, states = repo_with(root / "repo", "mlp_torch"), root / "states"
    record_convert(states, repo, convert_model(repo, "mlp_torch", "onnxruntime"))
    return Converted(repo, states)


@pytest.fixture
def copied(converted: Converted, tmp_path: Path) -> Iterator[Converted]:
    """The converted repository and its state, copied for a test that changes them."""
    shutil.copytree(converted.repo, tmp_path / "repo")
    shutil.copytree(converted.states, tmp_path / "states")
    yield Converted(tmp_path / "repo", tmp_path / "states")


def test_every_version_becomes_a_twin_deployment_with_the_sources_declarations(converted: Converted) -> None:
    folder = converted.repo / "mlp_torch_onnx"
    assert sorted(p.name for p in folder.iterdir()) == ["1", "2", "config.yaml"]
    assert (folder / "1" / "model.onnx").is_file() and (folder / "2" / "model.onnx").is_file()
    text = (folder / "config.yaml").read_text()
    assert text.startswith("# Written by modelyard migrate from mlp_torch")
    written = yaml.safe_load(text)
    source = yaml.safe_load((REPO / "mlp_torch" / "config.yaml").read_text())
    assert written["backend"] == "onnxruntime" and written["twin_of"] == "mlp_torch"
    for key in ("inputs", "outputs", "version_policy", "labels"):
        assert written[key] == source[key], key
    assert "torchserve" not in written  # the old backend's section stays with the old model
    entry = scan_model(converted.repo, "mlp_torch_onnx")
    assert entry.ok, entry.problems
    assert (entry.backend, [v.version for v in entry.versions]) == ("onnxruntime", [1, 2])
    assert not [p for p in converted.repo.iterdir() if p.name.startswith(".")]  # nothing left half-built

    migration = state.load(converted.states, "mlp_torch")
    assert (migration.to, migration.deployment, migration.source_backend) == (
        "onnxruntime",
        "mlp_torch_onnx",
        "torchserve",
    )
    assert migration.steps["convert"]["versions"] == [1, 2]
    assert [event["step"] for event in migration.history] == ["convert"]


async def test_the_new_deployment_answers_as_torch_does_through_a_registry(converted: Converted) -> None:
    rows = np.random.default_rng(5).standard_normal((7, 64)).astype(np.float32)
    registry = Registry(converted.repo)
    try:
        model = await registry.load("mlp_torch_onnx")
        for version in (1, 2):
            adapter = model.versions[version].adapter
            assert adapter is not None
            served = (await adapter.infer({"input": rows}, ["logits"]))["logits"]
            with torch.no_grad():
                expected = torch_module(REPO / "mlp_torch" / str(version) / "model.pt")(
                    torch.from_numpy(rows)
                )
            np.testing.assert_allclose(served, expected.numpy(), rtol=RTOL, atol=ATOL)
    finally:
        await registry.aclose()


async def test_check_passes_on_generated_inputs_and_records_the_worst_difference(copied: Converted) -> None:
    migration = state.load(copied.states, "mlp_torch")
    inputs = gather_inputs("mlp_torch", None, False, copied.repo / "none", batch=3)
    result = await run_check(copied.repo, migration, inputs, ATOL, RTOL, batch=3)
    assert result.ok, result.lines()
    assert sorted({version for version, _, _ in result.reports}) == [1, 2]
    assert {(d.name, d.shape) for _, _, r in result.reports for d in r.outputs} == {("logits", (3, 10))}
    record_check(copied.states, migration, result)
    step = state.load(copied.states, "mlp_torch").steps["check"]
    largest = max(d.max_abs for _, _, r in result.reports for d in r.outputs)
    assert step["ok"] is True and step["worst_abs_diff"] == largest
    assert (step["inputs"], step["cases"], step["atol"], step["rtol"]) == ("generated", 1, ATOL, RTOL)


def perturb(model_file: Path) -> None:
    """A deliberately wrong conversion: one weight matrix of the exported graph changed."""
    graph = onnx.load(str(model_file))
    initializer = next(i for i in graph.graph.initializer if len(i.dims) == 2)
    weights = numpy_helper.to_array(initializer)
    initializer.CopyFrom(numpy_helper.from_array(weights + np.float32(0.5), initializer.name))
    onnx.save(graph, str(model_file))


def test_a_conversion_that_changes_the_outputs_is_refused_with_the_worst_difference(
    copied: Converted,
) -> None:
    perturb(copied.repo / "mlp_torch_onnx" / "2" / "model.onnx")
    code, out, err = migrate(
        "check", "mlp_torch", "--model-repo", str(copied.repo), "--state-dir", str(copied.states)
    )
    assert code == 1, out + err
    assert f"atol={ATOL:g}, rtol={RTOL:g}" in out  # the tolerance is stated
    assert "version 1 logits" in out and "(within)" in out
    assert "version 2 logits" in out and "(OVER)" in out
    step = state.load(copied.states, "mlp_torch").steps["check"]
    assert step["ok"] is False
    assert (step["worst_abs_output"], step["worst_abs_version"]) == ("logits", 2)
    assert step["worst_abs_diff"] > 0.1
    assert err.startswith("error: FAIL  mlp_torch_onnx changes mlp_torch's outputs")
    assert f"worst abs diff {step['worst_abs_diff']:.3e} (output 'logits', version 2)" in err
    assert "migrate convert mlp_torch --force" in err
    assert "Traceback" not in out + err


def test_check_runs_on_recorded_requests_and_says_how_many(copied: Converted, tmp_path: Path) -> None:
    record_dir = tmp_path / "recorded"
    (record_dir / "mlp_torch").mkdir(parents=True)
    rng = np.random.default_rng(9)
    for index, rows in enumerate((1, 5)):
        np.savez(
            record_dir / "mlp_torch" / f"100-{index}.npz",
            input=rng.standard_normal((rows, 64)).astype(np.float32),
        )
    args = (
        "--model-repo",
        str(copied.repo),
        "--state-dir",
        str(copied.states),
        "--record-dir",
        str(record_dir),
    )
    code, out, err = migrate("check", "mlp_torch", "--recorded", *args)
    assert code == 0, out + err
    assert f"inputs recorded: 2 request(s) from {record_dir / 'mlp_torch'}" in out
    assert out.splitlines()[-1].startswith("PASS  mlp_torch_onnx answers as mlp_torch")
    step = state.load(copied.states, "mlp_torch").steps["check"]
    assert (step["ok"], step["inputs"], step["cases"]) == (True, "recorded", 2)

    shutil.rmtree(record_dir / "mlp_torch")
    code, _, err = migrate("check", "mlp_torch", "--recorded", *args)
    assert code == 2 and "no recorded requests of 'mlp_torch'" in err and "record:" in err


def test_check_runs_on_an_npz_file(copied: Converted, tmp_path: Path) -> None:
    given = tmp_path / "inputs.npz"
    np.savez(given, input=np.ones((2, 64), np.float32))
    common = ("--model-repo", str(copied.repo), "--state-dir", str(copied.states))
    code, out, err = migrate("check", "mlp_torch", "--inputs", str(given), *common)
    assert code == 0, out + err
    assert state.load(copied.states, "mlp_torch").steps["check"]["inputs"] == str(given)
    np.savez(given, other=np.ones((2, 64), np.float32))
    code, _, err = migrate("check", "mlp_torch", "--inputs", str(given), *common)
    assert code == 2 and "missing input" in err and "Traceback" not in err


def test_an_existing_deployment_is_replaced_only_with_force(copied: Converted) -> None:
    common = ("--model-repo", str(copied.repo), "--state-dir", str(copied.states))
    code, _, err = migrate("check", "mlp_torch", *common)
    assert code == 0 and "check" in state.load(copied.states, "mlp_torch").steps
    marker = copied.repo / "mlp_torch_onnx" / "1" / "stale.txt"
    marker.write_text("left from before")
    code, _, err = migrate("convert", "mlp_torch", "--to", "onnxruntime", *common)
    assert code == 2
    assert err.startswith("error: ") and "already exists: give --force" in err
    assert marker.is_file()
    code, out, err = migrate("convert", "mlp_torch", "--to", "onnx", "--force", *common)
    assert code == 0, out + err
    assert out.startswith(f"replaced {copied.repo / 'mlp_torch_onnx'}")
    assert not marker.exists()
    assert sorted(p.name for p in copied.repo.iterdir()) == ["mlp_torch", "mlp_torch_onnx"]
    steps = state.load(copied.states, "mlp_torch").steps
    assert "check" not in steps and steps["convert"]["replaced"] is True  # a new conversion is unchecked


def test_migrate_model_to_backend_converts_then_checks(tmp_path: Path) -> None:
    repo = repo_with(tmp_path / "repo", "mlp_torch")
    common = ("--model-repo", str(repo), "--state-dir", str(tmp_path / "states"))
    code, out, err = migrate("mlp_torch", "--to", "onnxruntime", "--name", "mlp_next", *common)
    assert code == 0, out + err
    lines = out.splitlines()
    assert lines[0].startswith(f"wrote {repo / 'mlp_next'}: mlp_torch (torchserve) as mlp_next (onnxruntime)")
    assert lines[-1].startswith("PASS  mlp_next answers as mlp_torch")
    migration = state.load(tmp_path / "states", "mlp_torch")
    assert migration.deployment == "mlp_next"
    assert [e["step"] for e in migration.history] == ["convert", "check"]
    assert load_model_config(repo / "mlp_next" / "config.yaml").twin_of == "mlp_torch"


def test_a_torchserve_archive_converts_from_the_module_inside_it(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "mlp_mar" / "1").mkdir(parents=True)
    archive = archive_for_torchserve(
        REPO / "mlp_torch" / "1" / "model.pt", "mlp", ["input"], ["logits"], tmp_path
    )
    shutil.copy(archive, repo / "mlp_mar" / "1" / "model.mar")
    config = yaml.safe_load((REPO / "mlp_torch" / "config.yaml").read_text())
    config.update(version_policy={"latest": 1}, labels={})
    (repo / "mlp_mar" / "config.yaml").write_text(yaml.safe_dump(config))
    code, out, err = migrate(
        "mlp_mar", "--to", "onnxruntime", "--model-repo", str(repo), "--state-dir", str(tmp_path / "s")
    )
    assert code == 0, out + err
    assert out.splitlines()[-1].startswith("PASS  mlp_mar_onnx answers as mlp_mar")

    (repo / "mlp_mar" / "1" / "model.mar").write_bytes(b"not a zip")
    code, _, err = migrate(
        "convert",
        "mlp_mar",
        "--to",
        "onnx",
        "--force",
        "--model-repo",
        str(repo),
        "--state-dir",
        str(tmp_path / "s"),
    )
    assert code == 2 and "cannot read the TorchScript module in" in err
    assert (repo / "mlp_mar_onnx" / "1" / "model.onnx").is_file()  # a failed conversion leaves the old one


def test_what_cannot_be_migrated_says_what_to_do(tmp_path: Path) -> None:
    repo = repo_with(tmp_path / "repo", "mlp_torch", "affine")
    common = ("--model-repo", str(repo), "--state-dir", str(tmp_path / "states"))
    cases = [
        (
            ("convert", "affine", "--to", "litert"),
            "model 'affine' is served by onnxruntime, which cannot be migrated",
        ),
        (
            ("convert", "mlp_torch", "--to", "litert"),
            "served by torchserve, which converts to onnxruntime, not litert",
        ),
        (
            ("convert", "mlp_torch", "--to", "caffe"),
            "--to must be one of onnxruntime, litert, tensorflow, keras",
        ),
        (("convert", "nope", "--to", "onnx"), "no model 'nope' in"),
        (("convert", "mlp_torch", "--to", "onnx", "--name", "mlp_torch"), "must be a model name other than"),
        (("check", "mlp_torch"), "start one with `modelyard migrate convert mlp_torch"),
        (("chek", "mlp_torch"), "'chek' is no step of modelyard migrate (did you mean 'check'?)"),
        (("chek", "--to", "onnx"), "'chek' is neither a step of modelyard migrate (convert, check"),
        (("mlp_torch",), "give the backend to move 'mlp_torch' to: --to"),
    ]
    for args, message in cases:
        code, out, err = migrate(*args, *common)
        assert code == 2, (args, out, err)
        assert err.startswith("error: ") and message in err, (args, err)
        assert "Traceback" not in out + err
    assert sorted(p.name for p in repo.iterdir()) == ["affine", "mlp_torch"]  # nothing written

    config = repo / "mlp_torch" / "config.yaml"
    config.write_text(config.read_text().replace("inputs:", "#").replace("outputs:", "#"))
    code, _, err = migrate("convert", "mlp_torch", "--to", "onnx", *common)
    assert code == 2 and "declare `inputs`" in err
    assert sorted(p.name for p in repo.iterdir()) == ["affine", "mlp_torch"]
    with pytest.raises(MigrationError, match="is not a folder"):
        convert_model(tmp_path / "absent", "mlp_torch", "onnx")


def test_the_cli_loads_the_migrate_tools_only_when_a_step_runs() -> None:
    probe = "import sys, gateway.cli; print(sorted(m for m in sys.modules if m.startswith('gateway.tools.migrate')))"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    loaded = json.loads(result.stdout.replace("'", '"'))
    assert "gateway.tools.migrate.cli" in loaded
    assert not {"gateway.tools.migrate.convert", "gateway.tools.migrate.check"} & set(loaded)


def test_a_version_added_to_the_source_after_convert_asks_for_convert_again(copied: Converted) -> None:
    shutil.copytree(copied.repo / "mlp_torch" / "2", copied.repo / "mlp_torch" / "3")
    code, out, err = migrate(
        "check", "mlp_torch", "--model-repo", str(copied.repo), "--state-dir", str(copied.states)
    )
    assert code == 2, out + err
    assert "serves versions [1, 2, 3] now, but versions [1, 2] were converted" in err
    assert "migrate convert mlp_torch --to onnxruntime --force" in err
