"""`modelyard parity`: the comparison itself on arrays, then real deployments of the example models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from gateway.tools.parity import (
    Deployment,
    ParityMismatch,
    ParityUsageError,
    compare,
    diff_output,
    fit_inputs,
    generate_inputs,
    parse_deployment,
    parse_sides,
    run_parity,
)
from gateway.types import Datatype, TensorSpec
from tests.support import ROOT, torchserve_missing

REPO = ROOT / "model_repo"


def modelyard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=ROOT, timeout=240
    )


def onnx_outputs(path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


# The comparison, on arrays -----------------------------------------------------------------------


def test_sides_from_versions_and_deployments() -> None:
    assert parse_sides("affine", "1,2", None) == (Deployment("affine", 1), Deployment("affine", 2))
    assert parse_sides("affine", None, "affine,affine_tf:2") == (
        Deployment("affine"),
        Deployment("affine_tf", 2),
    )
    assert parse_deployment("mlp_torch:1") == Deployment("mlp_torch", 1)


@pytest.mark.parametrize(
    ("versions", "deployments", "message"),
    [
        ("1,2", "affine,affine_tf", "not both"),
        (None, None, "give the two sides"),
        ("1", None, "two version numbers"),
        ("1,x", None, "two version numbers"),
        (None, "affine", "two deployments"),
        (None, "affine_tf,affine", "must start with MODEL 'affine'"),
        (None, "affine,affine_tf:latest", "MODEL:VERSION"),
    ],
)
def test_bad_sides_are_usage_errors(versions: str | None, deployments: str | None, message: str) -> None:
    with pytest.raises(ParityUsageError, match=message):
        parse_sides("affine", versions, deployments)


def test_generated_inputs_follow_the_signature_and_repeat() -> None:
    specs = [
        TensorSpec("f", Datatype.FP32, (-1, 3)),
        TensorSpec("i", Datatype.INT64, (2, -1)),
        TensorSpec("b", Datatype.BOOL, (-1,)),
        TensorSpec("u", Datatype.UINT8, (5,)),
    ]
    arrays = generate_inputs(specs, batch=6)
    assert {n: (a.shape, a.dtype) for n, a in arrays.items()} == {
        "f": ((6, 3), np.float32),
        "i": ((2, 6), np.int64),
        "b": ((6,), np.bool_),
        "u": ((5,), np.uint8),
    }
    again = generate_inputs(specs, batch=6)
    assert all(np.array_equal(arrays[n], again[n]) for n in arrays)
    assert arrays["f"].std() > 0  # random, not zeros


def test_bytes_inputs_cannot_be_generated() -> None:
    with pytest.raises(ParityUsageError, match=r"BYTES.*--inputs"):
        generate_inputs([TensorSpec("text", Datatype.BYTES, (-1,))])


def test_inputs_must_fit_the_signature() -> None:
    specs = [TensorSpec("x", Datatype.FP32, (-1, 4))]
    fitted = fit_inputs({"x": np.ones((2, 4), np.float64)}, specs, "affine:1")
    assert fitted["x"].dtype == np.float32
    with pytest.raises(ParityUsageError, match="missing x; unknown z"):
        fit_inputs({"z": np.ones((2, 4))}, specs, "affine:1")
    with pytest.raises(ParityUsageError, match=r"shape \[2, 5\]; affine:1 takes \[-1, 4\]"):
        fit_inputs({"x": np.ones((2, 5))}, specs, "affine:1")
    with pytest.raises(ParityUsageError, match="is <U1; affine:1 takes FP32"):
        fit_inputs({"x": np.full((2, 4), "a")}, specs, "affine:1")


def test_diff_is_measured_against_the_first_side() -> None:
    left = np.array([[1.0, -2.0, 0.0]], np.float32)
    right = left + np.array([[1e-3, -4e-3, 2e-3]], np.float32)
    diff = diff_output("y", left, right, rtol=0, atol=1e-2)
    expected_abs = np.abs(right.astype(np.float64) - left.astype(np.float64))
    assert diff.max_abs == pytest.approx(expected_abs.max())
    # The zero element has no relative difference: the largest is at -2.0.
    assert diff.max_rel == pytest.approx(expected_abs[0, 1] / 2.0)
    assert diff.within
    assert not diff_output("y", left, right, rtol=0, atol=1e-3).within
    assert diff_output("y", left, right, rtol=2.1e-3, atol=2.1e-3).within


def test_nan_counts_only_where_one_side_has_it() -> None:
    left = np.array([np.nan, 1.0])
    assert diff_output("y", left, left.copy(), 0, 0).within
    over = diff_output("y", left, np.array([0.0, 1.0]), 1e-3, 1e-3)
    assert not over.within
    assert over.max_abs == float("inf")


def test_bytes_outputs_are_equal_or_not() -> None:
    left = np.array([b"a", b"b"], dtype=object)
    assert diff_output("s", left, left.copy(), 0, 0).within
    differs = diff_output("s", left, np.array([b"a", b"c"], dtype=object), 1, 1)
    assert (differs.within, differs.max_abs) == (False, float("inf"))


def test_outputs_are_matched_by_name() -> None:
    one = {"y": np.zeros((2, 3), np.float32)}
    with pytest.raises(ParityMismatch, match="y only on a; logits only on b"):
        compare(one, {"logits": np.zeros((2, 3), np.float32)}, left_name="a", right_name="b")
    with pytest.raises(ParityMismatch, match=r"shape \[2, 3\] on one side and \[3, 2\]"):
        compare(one, {"y": np.zeros((3, 2), np.float32)})


def test_table_and_verdict() -> None:
    report = compare(
        {"y": np.zeros((2, 3)), "z": np.ones(4)},
        {"y": np.full((2, 3), 0.5), "z": np.ones(4)},
        left_name="a:1",
    )
    lines = report.table().splitlines()
    assert lines[0].split() == ["output", "shape", "max", "abs", "diff", "max", "rel", "diff", "within"]
    assert lines[1].split() == ["y", "2x3", "5.000e-01", "0.000e+00", "NO"]
    assert lines[2].split() == ["z", "4", "0.000e+00", "0.000e+00", "yes"]
    assert report.verdict().startswith("FAIL  a:1 vs right: y over rtol=")


# Real deployments --------------------------------------------------------------------------------


async def test_onnx_and_tensorflow_deployments_of_affine_agree() -> None:
    report = await run_parity(REPO, Deployment("affine"), Deployment("affine_tf"))
    assert report.ok, report.table()
    assert [d.name for d in report.outputs] == ["y"]
    assert (report.left, report.right) == ("affine:1", "affine_tf:1")  # the stable label


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("twin", ["affine_tf", "affine_litert", "affine_keras"])
async def test_every_deployment_of_affine_agrees_with_onnx(twin: str, version: int) -> None:
    """The example repository's one function on ONNX Runtime, TensorFlow, LiteRT and Keras."""
    pytest.importorskip({"affine_litert": "ai_edge_litert", "affine_keras": "keras"}.get(twin, "tensorflow"))
    report = await run_parity(REPO, Deployment("affine", version), Deployment(twin, version), batch=7)
    assert report.ok, report.table()
    assert [(d.name, d.shape) for d in report.outputs] == [("y", (7, 3))]


async def test_two_versions_of_affine_differ_by_what_onnxruntime_says() -> None:
    report = await run_parity(REPO, Deployment("affine", 1), Deployment("affine", 2), batch=3)
    assert not report.ok
    (diff,) = report.outputs
    inputs = generate_inputs([TensorSpec("x", Datatype.FP32, (-1, 4))], batch=3)
    v1 = onnx_outputs(REPO / "affine" / "1" / "model.onnx", inputs)["y"]
    v2 = onnx_outputs(REPO / "affine" / "2" / "model.onnx", inputs)["y"]
    assert diff.shape == (3, 3)
    assert diff.max_abs == pytest.approx(np.abs(v2.astype(np.float64) - v1).max())


async def test_an_unknown_model_or_version_is_a_usage_error() -> None:
    with pytest.raises(ParityUsageError, match="failed to load 'nope', failed to poll from model repository"):
        await run_parity(REPO, Deployment("affine"), Deployment("nope"))
    with pytest.raises(ParityUsageError, match="model 'affine' has no version 9"):
        await run_parity(REPO, Deployment("affine", 1), Deployment("affine", 9))


async def test_sides_with_other_input_names_cannot_share_inputs() -> None:
    with pytest.raises(ParityUsageError, match=r"inputs do not fit mlp:1: missing input; unknown x"):
        await run_parity(REPO, Deployment("affine"), Deployment("mlp"))


@pytest.mark.skipif(torchserve_missing() is not None, reason=str(torchserve_missing()))
async def test_onnx_mlp_and_its_torchserve_deployment_agree() -> None:
    report = await run_parity(REPO, Deployment("mlp"), Deployment("mlp_torch", 1), batch=5)
    assert report.ok, report.table()
    assert [(d.name, d.shape) for d in report.outputs] == [("logits", (5, 10))]


async def test_onnx_mlp_and_its_tensorflow_deployment_agree() -> None:
    report = await run_parity(REPO, Deployment("mlp"), Deployment("mlp_tf"), batch=5)
    assert report.ok, report.table()
    assert [(d.name, d.shape) for d in report.outputs] == [("logits", (5, 10))]
    # Not equal by accident of all-zero outputs: the logits vary across rows.
    inputs = generate_inputs([TensorSpec("input", Datatype.FP32, (-1, 64))], batch=5)
    assert np.ptp(onnx_outputs(REPO / "mlp" / "1" / "model.onnx", inputs)["logits"]) > 0.1


# The command -------------------------------------------------------------------------------------


def test_command_within_tolerance_exits_0() -> None:
    result = modelyard("parity", "affine", "--model-repo", str(REPO), "--deployments", "affine:2,affine_tf:2")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[0] == "output"
    assert lines[1].split()[:2] == ["y", "4x3"]
    assert lines[-1] == "PASS  affine:2 vs affine_tf:2: every output within rtol=0.0001, atol=1e-05"


def test_command_over_tolerance_exits_1_with_the_table() -> None:
    result = modelyard("parity", "affine", "--model-repo", str(REPO), "--versions", "1,2")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].split()[:2] == ["y", "4x3"]
    assert lines[-1].startswith("FAIL  affine:1 vs affine:2: y over rtol=0.0001, atol=1e-05")
    assert "Traceback" not in result.stdout + result.stderr


def test_command_takes_inputs_from_an_npz_file(tmp_path: Path) -> None:
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=np.arange(14 * 4, dtype=np.float32).reshape(14, 4))
    result = modelyard(
        "parity",
        "affine",
        "--model-repo",
        str(REPO),
        "--deployments",
        "affine,affine_tf",
        "--inputs",
        str(inputs),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    row = result.stdout.splitlines()[1].split()
    assert (row[0], row[1], row[-1]) == ("y", "14x3", "yes")

    np.savez(inputs, z=np.zeros((2, 4), np.float32))
    result = modelyard(
        "parity", "affine", "--model-repo", str(REPO), "--versions", "1,2", "--inputs", str(inputs)
    )
    assert result.returncode == 2
    assert "error: inputs do not fit affine:1: missing x; unknown z" in result.stderr


def test_command_takes_strings_for_bytes_inputs(tmp_path: Path) -> None:
    # An .npz holds strings as fixed-width bytes (object arrays would need pickle).
    inputs = tmp_path / "text.npz"
    np.savez(inputs, text=np.array([b"Hello  World", b" a B "], dtype="S"))
    result = modelyard(
        "parity", "text_normalizer", "--model-repo", str(REPO),
        "--deployments", "text_normalizer,text_normalizer:1", "--inputs", str(inputs),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[1].split() == ["normalized", "2", "0.000e+00", "0.000e+00", "yes"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["affine", "--versions", "1,2", "--deployments", "affine,affine_tf"], "not both"),
        (["affine"], "give the two sides"),
        (["nope", "--versions", "1,2"], "failed to load 'nope', failed to poll from model repository"),
        (["text_normalizer", "--deployments", "text_normalizer,text_normalizer:1"], "BYTES"),
        (["affine", "--versions", "1,2", "--inputs", "/no/such.npz"], "cannot read inputs from /no/such.npz"),
        (["affine", "--versions", "1,2", "--batch", "0"], "--batch must be at least 1"),
        (["affine", "--versions", "1,2", "--rtol", "-1"], "tolerances cannot be negative"),
    ],
)
def test_command_usage_errors_exit_2_without_a_traceback(args: list[str], message: str) -> None:
    result = modelyard("parity", *args, "--model-repo", str(REPO))
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
