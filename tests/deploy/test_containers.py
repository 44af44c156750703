"""`modelyard up`: the container specs it builds, and its answer where no Docker engine runs (here).

Nothing here pretends to start a container: the specs are checked as data, the archives are built
for real, and the command is run against an engine address where none answers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from gateway.repository import scan
from gateway.tools import containers
from tests.support import torchserve_missing

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def properties(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {key: value for key, value in pairs}


def saved_model(folder: Path) -> None:
    """A stand-in SavedModel: the spec only looks for saved_model.pb, never reads it."""
    folder.mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"\x08\x01")


@pytest.fixture
def tf_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    # model_repo/affine_tf's layout (issue 4): <version>/model.savedmodel/, with labels.
    for version in (1, 2):
        saved_model(repo / "affine_tf" / str(version) / "model.savedmodel")
    (repo / "affine_tf" / "config.yaml").write_text(
        "backend: tensorflow\nversion_policy: all\nlabels: {stable: 1, canary: 2}\n"
    )
    # TF Serving's own layout, named differently there.
    saved_model(repo / "half" / "3")
    (repo / "half" / "config.yaml").write_text(
        "backend: tfserving\ntfserving: {grpc: 'tfs:8500', model_name: half_plus_two}\n"
    )
    # Not TensorFlow: left out.
    shutil.copytree(ROOT / "model_repo" / "affine", repo / "affine")
    return repo


def test_the_images_are_the_ones_compose_and_kubernetes_pin() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert compose["tfserving"]["image"] == containers.TFSERVING_IMAGE
    assert compose["torchserve"]["image"] == containers.TORCHSERVE_IMAGE
    kustomization = yaml.safe_load((ROOT / "k8s" / "base" / "kustomization.yaml").read_text())
    pins = {image["name"]: f"{image['name']}:{image['newTag']}" for image in kustomization["images"]}
    assert pins["tensorflow/serving"] == containers.TFSERVING_IMAGE
    assert pins["pytorch/torchserve"] == containers.TORCHSERVE_IMAGE


def test_tfserving_mounts_each_saved_model_as_a_version_and_serves_them_by_config(
    tf_repo: Path, tmp_path: Path
) -> None:
    workdir = tmp_path / "work"
    spec = containers.build_spec("tfserving", scan(tf_repo), workdir)
    assert spec.image == containers.TFSERVING_IMAGE
    assert spec.models == ("affine_tf", "half")
    assert spec.ports == {8500: ("127.0.0.1", 8500), 8501: ("127.0.0.1", 8501)}
    assert {m.target: m.source for m in spec.mounts} == {
        "/models/affine_tf/1": tf_repo / "affine_tf" / "1" / "model.savedmodel",
        "/models/affine_tf/2": tf_repo / "affine_tf" / "2" / "model.savedmodel",
        "/models/half_plus_two/3": tf_repo / "half" / "3",
        "/config/models.config": workdir / "models.config",
    }
    assert all(m.read_only for m in spec.mounts)
    assert spec.entrypoint == ("tensorflow_model_server",)
    assert "--model_config_file=/config/models.config" in spec.command
    config = spec.files[workdir / "models.config"]
    assert 'name: "affine_tf"\n    base_path: "/models/affine_tf"' in config
    assert "model_version_policy { specific { versions: 1 versions: 2 } }" in config
    assert 'version_labels { key: "canary" value: 2 }' in config
    assert 'name: "half_plus_two"\n    base_path: "/models/half_plus_two"' in config
    assert "specific { versions: 3 }" in config
    assert config.count("config {") == 2
    # Nothing is written while the spec is built.
    assert not workdir.exists()


def test_the_docker_arguments_say_the_same_as_the_spec(tf_repo: Path, tmp_path: Path) -> None:
    spec = containers.build_spec("tfserving", scan(tf_repo), tmp_path, host="0.0.0.0", port_offset=100)
    kwargs = spec.run_kwargs()
    assert kwargs["image"] == "tensorflow/serving:2.18.0" and kwargs["name"] == "modelyard-tfserving"
    assert kwargs["ports"] == {"8500/tcp": ("0.0.0.0", 8600), "8501/tcp": ("0.0.0.0", 8601)}
    assert kwargs["volumes"][str(tf_repo / "half" / "3")] == {"bind": "/models/half_plus_two/3", "mode": "ro"}
    assert kwargs["entrypoint"] == ["tensorflow_model_server"]
    assert kwargs["labels"] == {
        "org.modelyard.backend": "tfserving",
        "org.modelyard.models": "affine_tf,half",
    }
    assert kwargs["detach"] is True and kwargs["environment"] == {}


@pytest.fixture
def onnx_only_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "onnx_only"
    shutil.copytree(ROOT / "model_repo" / "affine", repo / "affine")
    return repo


def test_tfserving_needs_a_saved_model(onnx_only_repo: Path, tmp_path: Path) -> None:
    with pytest.raises(containers.SpecError, match="no model in the repository has a TensorFlow SavedModel"):
        containers.build_spec("tfserving", scan(onnx_only_repo), tmp_path)


def test_torchserve_archives_the_example_with_the_handler_settings(tmp_path: Path) -> None:
    spec = containers.build_spec("torchserve", scan(ROOT / "model_repo"), tmp_path)
    assert spec.image == containers.TORCHSERVE_IMAGE and spec.models == ("mlp_torch",)
    assert spec.ports == {port: ("127.0.0.1", port) for port in (8080, 8081, 8082)}
    assert [(a.model, a.version, a.output.name) for a in spec.archives] == [
        ("mlp_torch", 1, "mlp_torch-v1.mar"),
        ("mlp_torch", 2, "mlp_torch-v2.mar"),
    ]
    for archive in spec.archives:
        assert (
            archive.serialized_file == ROOT / "model_repo" / "mlp_torch" / str(archive.version) / "model.pt"
        )
        assert json.loads(archive.settings) == {"inputs": ["input"], "outputs": ["logits"], "threads": 1}
        assert archive.output.parent == tmp_path / "model-store"
    assert {m.target: (m.source, m.read_only) for m in spec.mounts} == {
        "/home/model-server/model-store": (tmp_path / "model-store", True),
        "/config/config.properties": (tmp_path / "config.properties", True),
    }
    assert spec.command[spec.command.index("--ts-config") + 1] == "/config/config.properties"
    assert spec.command[spec.command.index("--model-store") + 1] == "/home/model-server/model-store"
    # The same TorchServe settings as the compose stack's.
    generated = properties(spec.files[tmp_path / "config.properties"])
    stack = properties((DEPLOY / "torchserve" / "config.properties").read_text())
    assert generated == {key: stack[key] for key in generated}
    assert {"inference_address", "load_models", "disable_token_authorization"} <= set(generated)


def test_torchserve_mounts_archives_as_they_are_and_skips_what_it_cannot_serve(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "packed" / "4").mkdir(parents=True)
    (repo / "packed" / "4" / "model.mar").write_bytes(b"PK")
    (repo / "packed" / "config.yaml").write_text("backend: torchserve\n")
    shutil.copytree(DEPLOY / "compose-model-repo" / "mlp_torch", repo / "remote")  # remote: served elsewhere
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.pt").write_bytes(b"")
    (repo / "broken" / "config.yaml").write_text("backend: torchserve\nlabelz: {}\n")
    spec = containers.build_spec("torchserve", scan(repo), tmp_path / "work")
    assert spec.models == ("packed",) and spec.archives == ()
    assert {m.target: m.source for m in spec.mounts} == {
        "/home/model-server/model-store/packed-v4.mar": repo / "packed" / "4" / "model.mar",
        "/config/config.properties": tmp_path / "work" / "config.properties",
    }


def test_torchserve_needs_tensor_names_to_archive_a_module(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "bare" / "1").mkdir(parents=True)
    (repo / "bare" / "1" / "model.pt").write_bytes(b"")
    with pytest.raises(containers.SpecError, match=r"model 'bare' version 1: .* needs `inputs`"):
        containers.build_spec("torchserve", scan(repo), tmp_path / "work")


def test_prepare_writes_the_config_and_builds_real_archives(tmp_path: Path) -> None:
    reason = torchserve_missing()
    if reason:
        pytest.skip(reason)
    spec = containers.build_spec("torchserve", scan(ROOT / "model_repo"), tmp_path)
    containers.prepare(spec)
    assert (tmp_path / "config.properties").read_text() == spec.files[tmp_path / "config.properties"]
    assert sorted(p.name for p in (tmp_path / "model-store").iterdir()) == [
        "mlp_torch-v1.mar",
        "mlp_torch-v2.mar",
    ]
    for version in (1, 2):
        with zipfile.ZipFile(tmp_path / "model-store" / f"mlp_torch-v{version}.mar") as archive:
            manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
            assert manifest["model"]["modelName"] == "mlp_torch"
            assert manifest["model"]["modelVersion"] == str(version)
            assert manifest["model"]["handler"] == "modelyard_handler.py"
            assert json.loads(archive.read("modelyard.json"))["inputs"] == ["input"]


def run_up(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "up", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )


def test_up_without_an_engine_fails_in_one_clear_line(tmp_path: Path) -> None:
    # An address where no engine can answer, so this holds on a machine with Docker too.
    nowhere = {"DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}
    result = run_up(
        "--backend", "torchserve", "--model-repo", "model_repo", "--workdir", str(tmp_path / "w"), env=nowhere
    )
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: modelyard up --backend torchserve: no Docker engine answers (")
    assert "Traceback" not in result.stderr
    # Nothing was prepared for a container that cannot start.
    assert not (tmp_path / "w").exists()


def test_up_refuses_an_unknown_backend_and_a_repository_without_its_models(
    onnx_only_repo: Path, tmp_path: Path
) -> None:
    nowhere = {"DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}
    unknown = run_up("--backend", "triton", env=nowhere)
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == "error: --backend must be one of tfserving, torchserve, not 'triton'"
    empty = run_up("--backend", "tfserving", "--model-repo", str(onnx_only_repo), env=nowhere)
    assert empty.returncode == 1 and "Traceback" not in empty.stderr
    assert empty.stderr.strip().endswith(
        "no model in the repository has a TensorFlow SavedModel (model.savedmodel/ or saved_model.pb)"
    )


def test_tfserving_for_the_example_repository_matches_the_stack_config(tmp_path: Path) -> None:
    text_format = pytest.importorskip("google.protobuf.text_format")
    config_pb2 = pytest.importorskip(
        "tensorflow_serving.config.model_server_config_pb2", reason="needs the tensorflow extra"
    )
    spec = containers.build_spec("tfserving", scan(ROOT / "model_repo"), tmp_path)
    ours = text_format.Parse(spec.files[tmp_path / "models.config"], config_pb2.ModelServerConfig())
    stack = text_format.Parse(
        (DEPLOY / "tfserving" / "models.config").read_text(), config_pb2.ModelServerConfig()
    )
    (reference,) = stack.model_config_list.config
    # The stack serves affine_tf; `modelyard up` serves every SavedModel of the repository (mlp_tf too).
    assert sorted(c.name for c in ours.model_config_list.config) == ["affine_tf", "mlp_tf"]
    (model,) = [c for c in ours.model_config_list.config if c.name == reference.name]
    assert (model.name, model.base_path, model.model_platform) == (
        reference.name,
        reference.base_path,
        reference.model_platform,
    )
    assert dict(model.version_labels) == dict(reference.version_labels)
    assert list(model.model_version_policy.specific.versions) == [1, 2]
    # The same mounts as the compose service's.
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["tfserving"]
    stack_mounts = {v.split(":")[1]: (ROOT / v.split(":")[0]).resolve() for v in compose["volumes"]}
    for mount in spec.mounts:
        if mount.target.startswith(f"/models/{reference.name}/"):
            assert stack_mounts[mount.target] == mount.source
