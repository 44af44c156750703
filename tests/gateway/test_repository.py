"""Reading a repository in Triton's shape: versions, policies, backends from file names, and problems."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest

from adapters import ARTIFACTS, BACKENDS, REMOTE_BACKENDS
from gateway.config import BackendName, ModelConfig, VersionPolicy
from gateway.repository import scan, scan_model
from scripts.build_models import _save, build_affine


def make(
    repo: Path, name: str, versions: list[int], config: str | None = None, artifact: str = "model.onnx"
) -> None:
    for version in versions:
        folder = repo / name / str(version)
        folder.mkdir(parents=True)
        (folder / artifact).write_bytes(b"")
    if config is not None:
        (repo / name / "config.yaml").write_text(config)


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ({"latest": 1}, [3]),
        ({"latest": 2}, [2, 3]),
        ({"specific": [1, 3]}, [1, 3]),
        ("all", [1, 2, 3]),
        ({"all": {}}, [1, 2, 3]),
    ],
)
def test_version_policy(policy: object, expected: list[int]) -> None:
    assert VersionPolicy.model_validate(policy).select([3, 1, 2]) == expected


def test_default_policy_is_the_latest_version(tmp_path: Path) -> None:
    make(tmp_path, "m", [1, 2, 10])
    entry = scan_model(tmp_path, "m")
    assert [v.version for v in entry.versions] == [10]
    assert entry.ok and entry.backend == "onnxruntime"


@pytest.mark.parametrize(
    ("artifact", "backend"),
    [("model.onnx", "onnxruntime"), ("model.savedmodel", "tensorflow"), ("saved_model.pb", "tensorflow"),
     ("model.mar", "torchserve"), ("model.pt", "torchserve"), ("model.tflite", "litert"),
     ("model.keras", "keras")],
)  # fmt: skip
def test_backend_follows_the_artifact_name(tmp_path: Path, artifact: str, backend: str) -> None:
    make(tmp_path, "m", [1], artifact=artifact)
    assert scan_model(tmp_path, "m").backend == backend


def test_every_backend_is_known_to_config_and_repository() -> None:
    """A backend is one adapters/ module plus its BACKENDS and ARTIFACTS entries and a config section."""
    backends = set(BACKENDS)
    assert set(get_args(BackendName)) == backends
    assert set(ARTIFACTS) == backends
    assert backends <= set(ModelConfig.model_fields)
    assert backends >= REMOTE_BACKENDS and not any(ARTIFACTS[b] for b in REMOTE_BACKENDS)


@pytest.mark.parametrize("backend", ["tfserving", "v2"])
def test_remote_models_need_no_files(tmp_path: Path, backend: str) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.yaml").write_text(
        f"backend: {backend}\nversion_policy: all\n{backend}: {{versions: {{1: '1', 3: '2'}}}}\n"
    )
    entry = scan_model(tmp_path, "m")
    assert entry.ok, entry.problems
    assert [(v.version, v.artifact) for v in entry.versions] == [(1, None), (3, None)]


def test_non_numeric_folders_and_hidden_models_are_ignored(tmp_path: Path) -> None:
    make(tmp_path, "m", [1])
    (tmp_path / "m" / "latest").mkdir()
    (tmp_path / ".cache" / "1").mkdir(parents=True)
    (tmp_path / "README.md").write_text("not a model")
    entries = scan(tmp_path)
    assert list(entries) == ["m"]
    assert [v.version for v in entries["m"].versions] == [1]


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ("backend: onnxruntime\nlabelz: {a: 1}\n", "labelz: Extra inputs are not permitted"),
        ("backend: caffe\n", "backend"),
        ("labels: {stable: 9}\n", "label 'stable' points at version 9"),
        ("traffic: {1: 50, 4: 50}\n", "traffic names version 4"),
        ("traffic: {1: 0}\n", "must not all be zero"),
        ("labels: {'3': 1}\n", "non-numeric name"),
        ("version_policy: {specific: [7]}\n", "selects none of the versions [1]"),
        ("version_policy: {latest: 1, all: {}}\n", "give one of latest, specific or all"),
        ("inputs: [{name: x, datatype: FP8, shape: [1]}]\n", "datatype"),
        (": : :\n", "cannot read YAML"),
    ],
)
def test_config_problems_are_reported_clearly(tmp_path: Path, config: str, problem: str) -> None:
    make(tmp_path, "m", [1], config=config)
    entry = scan_model(tmp_path, "m")
    assert not entry.ok
    assert any(problem in p for p in entry.problems), entry.problems


def test_missing_artifact_and_missing_versions(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "noartifact" / "1").mkdir(parents=True)
    entries = scan(tmp_path)
    assert "no numeric version folders" in entries["empty"].problems[0]
    assert "no model artifact" in entries["noartifact"].problems[0]


def test_example_repository_config_is_valid() -> None:
    root = Path(__file__).resolve().parents[2] / "model_repo"
    entries = scan(root)
    assert {"affine", "mlp", "text_normalizer"} <= set(entries)
    assert all(entry.ok for entry in entries.values()), {n: e.problems for n, e in entries.items()}
    assert entries["affine"].config.labels == {"stable": 1, "canary": 2}


def test_committed_examples_are_what_the_build_script_makes(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2] / "model_repo"
    _save(build_affine(2), tmp_path / "affine.onnx")
    assert (tmp_path / "affine.onnx").read_bytes() == (root / "affine" / "2" / "model.onnx").read_bytes()


def test_config_defaults() -> None:
    config = ModelConfig()
    assert config.version_policy.select([1, 2]) == [2]
    assert config.limits.max_inflight == 64 and config.limits.max_queue == 256


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ("fallback: [m]\n", "it lists itself as a fallback"),
        ("fallback: [elsewhere]\n", "fallback 'elsewhere' is not a model"),
        ("shadow: [{model: elsewhere}]\n", "shadow model 'elsewhere' is not a model"),
        ("shadow: [{version: 2, percent: 0}]\n", "greater than 0"),
    ],
)
def test_rollout_references_are_checked(tmp_path: Path, config: str, problem: str) -> None:
    make(tmp_path, "m", [1], config=config)
    assert any(problem in p for p in scan_model(tmp_path, "m").problems), scan_model(tmp_path, "m").problems
