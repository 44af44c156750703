"""One model's folder served as the repository (`--model-name`), in the two shapes KServe's storage
initializer leaves in /mnt/models: the artifact itself, or version folders."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from gateway.repository import Repository, scan_single_model
from scripts.build_models import _save, affine_weights, build_affine
from tests.support import RunningGateway, start_gateway

X = np.array([[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 0.0, 2.0]], dtype=np.float32)


def affine(version: int, x: np.ndarray) -> np.ndarray:
    weight, bias = affine_weights(version)
    expected: np.ndarray = x @ weight + bias
    return expected


def flat_folder(folder: Path) -> Path:
    _save(build_affine(1), folder / "model.onnx")
    return folder


def versioned_folder(folder: Path, config: str | None = None) -> Path:
    for version in (1, 2):
        _save(build_affine(version), folder / str(version) / "model.onnx")
    if config is not None:
        (folder / "config.yaml").write_text(config)
    return folder


def test_an_artifact_directly_in_the_folder_is_version_1(tmp_path: Path) -> None:
    entry = scan_single_model(flat_folder(tmp_path / "models"), "fraud")
    assert entry.ok, entry.problems
    assert (entry.name, entry.backend) == ("fraud", "onnxruntime")
    assert [(v.version, v.path, v.artifact) for v in entry.versions] == [
        (1, tmp_path / "models", tmp_path / "models" / "model.onnx")
    ]


def test_version_folders_are_read_as_in_a_repository(tmp_path: Path) -> None:
    folder = versioned_folder(tmp_path / "models", "version_policy: all\nlabels: {stable: 1}\n")
    entry = scan_single_model(folder, "fraud")
    assert entry.ok, entry.problems
    assert entry.name == "fraud" and entry.path == folder
    assert [v.version for v in entry.versions] == [1, 2]
    assert entry.config.labels == {"stable": 1}


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ("labels: {canary: 2}\n", "names versions [2]"),
        ("traffic: {1: 50, 3: 50}\n", "names versions [3]"),
        ("version_policy: {specific: [2]}\n", "selects none of the versions [1]"),
        ("fallback: [other]\n", "['other'] cannot be reached"),
        ("labelz: {stable: 1}\n", "labelz"),
    ],
)
def test_an_unversioned_folder_refuses_config_it_cannot_serve(
    tmp_path: Path, config: str, problem: str
) -> None:
    folder = flat_folder(tmp_path / "models")
    (folder / "config.yaml").write_text(config)
    entry = scan_single_model(folder, "fraud")
    assert not entry.ok
    assert any(problem in p for p in entry.problems), entry.problems


def test_an_empty_folder_says_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    entry = scan_single_model(tmp_path / "models", "fraud")
    assert not entry.ok and "no numeric version folders" in entry.problems[0]


def test_the_repository_holds_only_the_named_model(tmp_path: Path) -> None:
    folder = flat_folder(tmp_path / "models")
    (folder / "other").mkdir()  # a sub-folder is no second model here
    single = Repository(folder, "fraud")
    assert single.names() == ["fraud"]
    assert single.folder("fraud") == folder
    assert single.folder("other") is None and single.folder("models") is None
    assert Repository(tmp_path / "missing", "fraud").names() == []
    assert Repository(tmp_path).names() == ["models"]


@pytest.fixture(scope="module")
def flat_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    root = tmp_path_factory.mktemp("flat")
    running = start_gateway(flat_folder(root / "mnt-models"), root / "log.txt", "--model-name", "fraud")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def versioned_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """The name from MODELYARD_MODEL_NAME, as every flag has its variable."""
    root = tmp_path_factory.mktemp("versioned")
    folder = versioned_folder(root / "mnt-models", "version_policy: all\n")
    running = start_gateway(folder, root / "log.txt", env={"MODELYARD_MODEL_NAME": "fraud"})
    yield running
    running.stop()


def clients(gateway: RunningGateway) -> list[tuple[str, triton_http.InferenceServerClient]]:
    return [
        ("rest", triton_http.InferenceServerClient(gateway.http, network_timeout=30)),
        ("grpc", triton_grpc.InferenceServerClient(gateway.grpc)),
    ]


def infer(kind: str, client: triton_http.InferenceServerClient, version: str = "") -> tuple[str, np.ndarray]:
    module = triton_grpc if kind == "grpc" else triton_http
    tensor = module.InferInput("x", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X)
    result = client.infer("fraud", [tensor], model_version=version)
    response = result.get_response(as_json=True) if kind == "grpc" else result.get_response()
    return str(response["model_version"]), result.as_numpy("y")


def test_the_flat_shape_serves_under_the_given_name(flat_gateway: RunningGateway) -> None:
    for kind, client in clients(flat_gateway):
        try:
            assert client.is_model_ready("fraud"), kind
            version, y = infer(kind, client)
            assert version == "1"
            np.testing.assert_allclose(y, affine(1, X), rtol=1e-5, atol=1e-6)
            with pytest.raises(InferenceServerException) as caught:
                client.get_model_metadata("mnt-models")  # the folder's own name is no model
            assert "Request for unknown model: 'mnt-models' is not found" in str(caught.value), kind
        finally:
            client.close()
    index = httpx.post(f"{flat_gateway.url}/v2/repository/index").json()
    assert [(e["name"], e.get("version"), e["state"]) for e in index] == [("fraud", "1", "READY")]


def test_the_versioned_shape_serves_every_version(versioned_gateway: RunningGateway) -> None:
    for kind, client in clients(versioned_gateway):
        try:
            version, y = infer(kind, client)
            assert version == "2", kind  # the highest, with no labels or traffic
            np.testing.assert_allclose(y, affine(2, X), rtol=1e-5, atol=1e-6)
            version, y = infer(kind, client, "1")
            assert version == "1", kind
            np.testing.assert_allclose(y, affine(1, X), rtol=1e-5, atol=1e-6)
        finally:
            client.close()
