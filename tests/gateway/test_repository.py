"""Reading a repository in Triton's shape: versions, policies, backends from file names, and problems."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from adapters import BACKENDS, artifact_backends
from gateway.config import ModelConfig, VersionPolicy
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


def test_config_takes_its_backend_names_and_sections_from_the_registry() -> None:
    for name in BACKENDS:
        config = ModelConfig.model_validate({"backend": name, name: {"some": "value"}})
        assert config.backend == name and config.section(name) == {"some": "value"}
    with pytest.raises(
        ValidationError, match=f"unknown backend 'caffe'; known: {', '.join(sorted(BACKENDS))}"
    ):
        ModelConfig(backend="caffe")
    with pytest.raises(ValidationError, match="caffe\n  Extra inputs are not permitted"):
        ModelConfig.model_validate({"caffe": {}})
    # Every artifact name selects its one backend, in the registry's order of preference.
    assert [b for _, b in artifact_backends()] == [b for b, a in BACKENDS.items() for _ in a.artifacts]
    assert len({name for name, _ in artifact_backends()}) == len(artifact_backends())


REMOTE_SECTIONS = {
    "tfserving": "tfserving: {grpc: 'tfs:8500', versions: {1: '1', 3: '2'}}",
    "v2": "v2: {address: 'triton:8001', versions: {1: '1', 3: '2'}}",
    "torchserve": "torchserve: {mode: remote, inference_url: 'http://ts:8080', versions: {1: '1', 3: '2'}}",
}


@pytest.mark.parametrize("backend", sorted(REMOTE_SECTIONS))
def test_remote_models_need_no_files(tmp_path: Path, backend: str) -> None:
    """Remote backends (TorchServe in its remote mode) list their versions in their section."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.yaml").write_text(
        f"backend: {backend}\nversion_policy: all\n{REMOTE_SECTIONS[backend]}\n"
    )
    entry = scan_model(tmp_path, "m")
    assert entry.ok, entry.problems
    assert [(v.version, v.artifact) for v in entry.versions] == [(1, None), (3, None)]


def test_managed_torchserve_needs_its_artifact(tmp_path: Path) -> None:
    make(tmp_path, "m", [1], config="backend: torchserve\ntorchserve: {mode: managed}\n", artifact="x.bin")
    assert "backend 'torchserve' needs model.mar or model.pt" in " ".join(scan_model(tmp_path, "m").problems)


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        (
            "backend: onnxruntime\nonnxruntime: {intra_op_thread: 2}\n",
            "onnxruntime: unknown key 'intra_op_thread' (did you mean 'intra_op_threads'?)",
        ),
        # A section is checked where the backend follows from the artifact, too.
        ("onnxruntime: {graph_optimization: most}\n", "onnxruntime.graph_optimization: Input should be"),
        ("backend: v2\nv2: {protocol: grpc}\n", "v2.address: Field required"),
        ("backend: tfserving\ntfserving: {model_name: m}\n", "tfserving: Value error, give grpc"),
        ("backend: torchserve\ntorchserve: {mode: remot}\n", "torchserve.mode: Input should be"),
        ("backend: litert\nlitert: {pool_size: 0}\n", "litert.pool_size: Input should be greater"),
        # A section of a backend the model does not use is still read: a typo there is a typo.
        ("keras: {worker: 2}\n", "keras: unknown key 'worker'"),
    ],
)
def test_each_backend_section_is_checked_at_scan(tmp_path: Path, config: str, problem: str) -> None:
    make(tmp_path, "m", [1], config=config)
    problems = scan_model(tmp_path, "m").problems
    assert any(f"model 'm': invalid config.yaml section: {problem}" in p for p in problems), problems


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
        ("backend: onnxruntime\nlabelz: {a: 1}\n", "unknown key 'labelz' (did you mean 'labels'?)"),
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
