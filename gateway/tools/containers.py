"""`modelyard up`: start a backend's official image for the models of a repository, through a local
Docker engine (the Python `docker` SDK, extra `docker`).

The container spec is built by pure functions from the repository scan, so it can be checked without
an engine; `start` is the only code that talks to Docker. The spec names the image, the ports
(published on the host's loopback by default), the mounts, the environment, and the files the host must
hold before the container starts (TF Serving's model config, TorchServe's archives).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from adapters.torchserve import modelyard_handler
from gateway.repository import ModelEntry
from gateway.tools.errors import ToolError

# The handler every archive carries, as in managed mode; it needs only numpy to import.
HANDLER_FILE = Path(modelyard_handler.__file__)

Backend = Literal["tfserving", "torchserve"]
TFSERVING: Backend = "tfserving"
TORCHSERVE: Backend = "torchserve"
BACKENDS: tuple[Backend, ...] = (TFSERVING, TORCHSERVE)

# The same pins as docker-compose.yml and k8s/base (tests/deploy check they agree).
TFSERVING_IMAGE = "tensorflow/serving:2.18.0"
TORCHSERVE_IMAGE = "pytorch/torchserve:0.12.0-cpu"

TFSERVING_MODELS = "/models"
TFSERVING_CONFIG = "/config/models.config"
TORCHSERVE_STORE = "/home/model-server/model-store"
TORCHSERVE_CONFIG = "/config/config.properties"
# container port -> what it serves
TFSERVING_PORTS = {8500: "gRPC", 8501: "REST"}
TORCHSERVE_PORTS = {8080: "inference", 8081: "management", 8082: "metrics"}


class UpError(ToolError):
    """Why `modelyard up` cannot start the container: one line for the user."""


class SpecError(UpError):
    """The repository holds nothing this backend can serve, or a model lacks what it needs."""


@dataclass(frozen=True)
class Mount:
    source: Path
    target: str
    read_only: bool = True


@dataclass(frozen=True)
class Archive:
    """A TorchScript file that torch-model-archiver turns into `output` before the container starts."""

    model: str
    version: int
    serialized_file: Path
    settings: str  # modelyard.json: the handler's tensor names, in forward's order
    output: Path


@dataclass(frozen=True)
class ContainerSpec:
    backend: Backend
    name: str
    image: str
    entrypoint: tuple[str, ...]
    command: tuple[str, ...]
    ports: Mapping[int, tuple[str, int]]  # container port -> (host address, host port)
    mounts: tuple[Mount, ...]
    environment: Mapping[str, str]
    # Written on the host (under the work folder) before the container starts.
    files: Mapping[Path, str] = field(default_factory=dict)
    archives: tuple[Archive, ...] = ()
    models: tuple[str, ...] = ()

    def run_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for docker's `client.containers.run`."""
        return {
            "image": self.image,
            "name": self.name,
            "entrypoint": list(self.entrypoint),
            "command": list(self.command),
            "ports": {f"{port}/tcp": host for port, host in self.ports.items()},
            "volumes": {
                str(m.source): {"bind": m.target, "mode": "ro" if m.read_only else "rw"} for m in self.mounts
            },
            "environment": dict(self.environment),
            "labels": {"org.modelyard.backend": self.backend, "org.modelyard.models": ",".join(self.models)},
            "detach": True,
        }


def _published(ports: Mapping[int, str], host: str, offset: int) -> dict[int, tuple[str, int]]:
    return {port: (host, port + offset) for port in ports}


def _saved_model(version_dir: Path) -> Path | None:
    """The SavedModel folder of a version: `model.savedmodel/` or the version folder itself."""
    for candidate in (version_dir / "model.savedmodel", version_dir):
        if (candidate / "saved_model.pb").is_file():
            return candidate
    return None


def tfserving_spec(
    entries: Mapping[str, ModelEntry], workdir: Path, host: str = "127.0.0.1", port_offset: int = 0
) -> ContainerSpec:
    """TF Serving for every model whose versions hold TensorFlow SavedModels.

    TF Serving wants `<base>/<version>/saved_model.pb`, so each version's SavedModel folder is mounted
    as its own version folder, and a model config file serves every version under the name the
    model's `tfserving.model_name` gives (default: the gateway's name).
    """
    mounts: list[Mount] = []
    configs: list[str] = []
    models: list[str] = []
    for name, entry in sorted(entries.items()):
        if entry.problems or entry.backend not in ("tensorflow", "tfserving"):
            continue
        remote_name = str(entry.config.section("tfserving").get("model_name") or name)
        versions = []
        for version in entry.versions:
            saved_model = _saved_model(version.path)
            if saved_model is not None:
                target = f"{TFSERVING_MODELS}/{remote_name}/{version.version}"
                mounts.append(Mount(saved_model.resolve(), target))
                versions.append(version.version)
        if not versions:
            continue
        models.append(name)
        specific = " ".join(f"versions: {v}" for v in versions)
        labels = "".join(
            f'\n    version_labels {{ key: "{label}" value: {v} }}'
            for label, v in sorted(entry.config.labels.items())
            if v in versions
        )
        configs.append(
            f'  config {{\n    name: "{remote_name}"\n    base_path: "{TFSERVING_MODELS}/{remote_name}"\n'
            f'    model_platform: "tensorflow"\n    model_version_policy {{ specific {{ {specific} }} }}'
            f"{labels}\n  }}"
        )
    if not models:
        raise SpecError(
            "no model in the repository has a TensorFlow SavedModel (model.savedmodel/ or saved_model.pb)"
        )
    config_file = workdir / "models.config"
    files = {config_file: "model_config_list {\n" + "\n".join(configs) + "\n}\n"}
    mounts.append(Mount(config_file.resolve(), TFSERVING_CONFIG))
    return ContainerSpec(
        backend="tfserving",
        name="modelyard-tfserving",
        image=TFSERVING_IMAGE,
        # The image's entrypoint serves one $MODEL_NAME; the model config serves them all.
        entrypoint=("tensorflow_model_server",),
        command=("--port=8500", "--rest_api_port=8501", f"--model_config_file={TFSERVING_CONFIG}"),
        ports=_published(TFSERVING_PORTS, host, port_offset),
        mounts=tuple(mounts),
        environment={},
        files=files,
        models=tuple(models),
    )


def torchserve_spec(
    entries: Mapping[str, ModelEntry], workdir: Path, host: str = "127.0.0.1", port_offset: int = 0
) -> ContainerSpec:
    """TorchServe for every torchserve model with a `model.mar` or `model.pt` (managed-mode layout).

    A `.mar` is mounted into the model store as it is; a `.pt` is archived first with modelyard's
    handler and the tensor names from config.yaml, as managed mode does. Every archive is one
    version of its model, and TorchServe loads them all at start.
    """
    store = workdir / "model-store"
    mounts: list[Mount] = []
    archives: list[Archive] = []
    models: list[str] = []
    for name, entry in sorted(entries.items()):
        if (
            entry.problems
            or entry.backend != "torchserve"
            or entry.config.section("torchserve").get("mode") == "remote"
        ):
            continue
        for version in entry.versions:
            artifact = version.artifact
            if artifact is None:
                continue
            if artifact.suffix == ".mar":
                mounts.append(Mount(artifact.resolve(), f"{TORCHSERVE_STORE}/{name}-v{version.version}.mar"))
            else:
                if not entry.config.inputs:
                    raise SpecError(
                        f"model '{name}' version {version.version}: archiving {artifact.name} for TorchServe "
                        "needs `inputs` (and `outputs`) in config.yaml, in forward's order"
                    )
                settings = {
                    "inputs": [t.name for t in entry.config.inputs],
                    "outputs": [t.name for t in entry.config.outputs or ()],
                    "threads": int(entry.config.section("torchserve").get("threads", 1)),
                }
                archives.append(
                    Archive(
                        name,
                        version.version,
                        artifact.resolve(),
                        json.dumps(settings),
                        store / f"{name}-v{version.version}.mar",
                    )
                )
            if name not in models:
                models.append(name)
    if not models:
        raise SpecError("no torchserve model in the repository has a model.mar or model.pt")
    config_file = workdir / "config.properties"
    config = (
        "inference_address=http://0.0.0.0:8080\nmanagement_address=http://0.0.0.0:8081\n"
        "metrics_address=http://0.0.0.0:8082\nload_models=all\ndefault_workers_per_model=1\n"
        "install_py_dep_per_model=false\nmetrics_mode=prometheus\n"
        # Published on the host's loopback only; pass --host to publish wider, and turn auth on then.
        "disable_token_authorization=true\nenable_model_api=false\n"
    )
    if archives:
        mounts.append(Mount(store.resolve(), TORCHSERVE_STORE))
    mounts.append(Mount(config_file.resolve(), TORCHSERVE_CONFIG))
    return ContainerSpec(
        backend="torchserve",
        name="modelyard-torchserve",
        image=TORCHSERVE_IMAGE,
        entrypoint=("torchserve",),
        command=(
            "--start",
            "--foreground",
            "--ncs",
            "--ts-config",
            TORCHSERVE_CONFIG,
            "--model-store",
            TORCHSERVE_STORE,
        ),
        ports=_published(TORCHSERVE_PORTS, host, port_offset),
        mounts=tuple(mounts),
        environment={},
        files={config_file: config},
        archives=tuple(archives),
        models=tuple(models),
    )


def build_spec(
    backend: Backend,
    entries: Mapping[str, ModelEntry],
    workdir: Path,
    host: str = "127.0.0.1",
    port_offset: int = 0,
) -> ContainerSpec:
    builder = tfserving_spec if backend == "tfserving" else torchserve_spec
    return builder(entries, workdir, host, port_offset)


class EngineUnavailable(UpError):
    """No Docker engine answers, or the docker SDK is not installed."""


def docker_client() -> Any:
    try:
        import docker
        from docker.errors import DockerException
    except ImportError as exc:
        raise EngineUnavailable("the docker SDK is not installed: pip install 'modelyard[docker]'") from exc
    try:
        client = docker.from_env()
        client.ping()
    except DockerException as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EngineUnavailable(f"no Docker engine answers ({reason})") from exc
    return client


def prepare(spec: ContainerSpec) -> None:
    """Write the spec's files and build its archives on the host."""
    for path, content in spec.files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    for archive in spec.archives:
        archive.output.parent.mkdir(parents=True, exist_ok=True)
        # Built beside the store, never in it: TorchServe's load_models=all would take any folder
        # in the store for a model.
        with tempfile.TemporaryDirectory(dir=archive.output.parent.parent) as scratch:
            build = Path(scratch)
            (build / "modelyard.json").write_text(archive.settings)
            command = [sys.executable, "-m", "model_archiver.model_packaging", "--model-name", archive.model,
                       "--version", str(archive.version), "--serialized-file", str(archive.serialized_file),
                       "--handler", str(HANDLER_FILE), "--extra-files", str(build / "modelyard.json"),
                       "--export-path", str(build), "--force"]  # fmt: skip
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise SpecError(
                    f"torch-model-archiver failed for model '{archive.model}' version {archive.version} "
                    f"(is the torchserve extra installed?): {result.stderr.strip()[-300:]}"
                )
            (build / f"{archive.model}.mar").replace(archive.output)


def start(spec: ContainerSpec, client: Any) -> str:
    """Replace any container of the same name and start this one; its id."""
    from docker.errors import DockerException, NotFound

    try:
        with contextlib.suppress(NotFound):
            client.containers.get(spec.name).remove(force=True)
        container = client.containers.run(**spec.run_kwargs())
    except DockerException as exc:
        raise UpError(f"Docker could not start {spec.image}: {str(exc).splitlines()[0]}") from exc
    return str(container.short_id)
