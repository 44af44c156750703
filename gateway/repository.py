"""Reads a model repository in Triton's shape: DIR/<model>/<numeric version>/<artifact>."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from adapters import BACKENDS, artifact_backends
from adapters.base import OptionsError
from gateway.config import MODEL_NAME, ConfigError, ModelConfig, load_model_config

CONFIG_FILE = "config.yaml"


@dataclass(frozen=True, slots=True)
class VersionEntry:
    version: int
    path: Path
    artifact: Path | None


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """One model folder as found on disk. `problems` lists why it cannot be served, if it cannot."""

    name: str
    path: Path
    config: ModelConfig
    backend: str | None
    versions: tuple[VersionEntry, ...]
    problems: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.problems


def is_model_name(name: str) -> bool:
    return bool(MODEL_NAME.match(name))


def model_names(root: Path) -> list[str]:
    """Folders that look like models: a valid name, not hidden."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and is_model_name(p.name))


def is_remote(config: ModelConfig, backend: str | None) -> bool:
    """Whether the model's backend serves from elsewhere, as its registered class says for these options."""
    adapter = BACKENDS.get(backend) if backend else None
    if adapter is None:
        return False
    try:
        return adapter.serves_remotely(adapter.parse_options(config))
    except OptionsError:
        return adapter.remote


def starts_server(config: ModelConfig, backend: str | None) -> bool:
    """Whether the gateway starts and owns a server for this model, as its registered class says."""
    adapter = BACKENDS.get(backend) if backend else None
    if adapter is None:
        return False
    try:
        return adapter.starts_server(adapter.parse_options(config))
    except OptionsError:
        return False


def _find_artifact(version_dir: Path, backend: str | None) -> Path | None:
    names = BACKENDS[backend].artifacts if backend else tuple(n for n, _ in artifact_backends())
    for name in names:
        candidate = version_dir / name
        if candidate.exists():
            return candidate
    return None


def _backend_of(artifact: Path) -> str:
    return next(backend for name, backend in artifact_backends() if artifact.name == name)


def _read_sections(
    name: str, config: ModelConfig, backends: set[str], options: dict[str, BaseModel], problems: list[str]
) -> None:
    """Validates each backend's section with its options model, so a typo inside one is found
    before anything loads."""
    for backend in sorted(backends - set(options)):
        try:
            options[backend] = BACKENDS[backend].parse_options(config)
        except OptionsError as exc:
            problems.append(f"model '{name}': invalid config.yaml section: {exc}")


def scan_model(
    root: Path, name: str, path: Path | None = None, override: Mapping[str, Any] | None = None
) -> ModelEntry:
    """Model `name` of the repository `root`; `path` is its folder where that is not `root / name`.
    `override` holds config.yaml keys that stand in for the file's (a repository load's config)."""
    path = root / name if path is None else path
    config, problems = _read_config(path / CONFIG_FILE, override)
    if not path.is_dir():
        return ModelEntry(name, path, config, None, (), (f"model '{name}': no folder {path}",))

    found = sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit())
    backend: str | None = config.backend
    options: dict[str, BaseModel] = {}
    _read_sections(name, config, set(config.sections) | ({backend} if backend else set()), options, problems)
    # Remote backends serve from elsewhere: their version folders need no artifact, or may be absent.
    adapter = BACKENDS[backend] if backend else None
    remote = adapter is not None and (
        adapter.serves_remotely(options[backend]) if backend in options else adapter.remote
    )
    if adapter is not None and remote and not found and backend in options:
        # A remote model has no files here: its versions may be listed in config.yaml instead of
        # as empty folders (which git cannot hold).
        found = list(adapter.listed_versions(options[backend]))
    if remote and not found:
        found = [1]
    selected = config.version_policy.select(found)
    versions = []
    for version in selected:
        version_dir = path / str(version)
        artifact = _find_artifact(version_dir, backend)
        if artifact is None and backend is None:
            problems.append(
                f"model '{name}' version {version}: no model artifact in {version_dir} "
                f"(expected one of {', '.join(n for n, _ in artifact_backends())})"
            )
        elif artifact is not None and backend is None:
            backend = _backend_of(artifact)
            _read_sections(name, config, {backend}, options, problems)
        elif artifact is None and not remote and backend is not None and BACKENDS[backend].artifacts:
            expected = " or ".join(BACKENDS[backend].artifacts)
            problems.append(
                f"model '{name}' version {version}: backend '{backend}' needs {expected} in {version_dir}"
            )
        versions.append(VersionEntry(version, version_dir, artifact))

    if not found:
        problems.append(f"model '{name}': no numeric version folders in {path}")
    elif not selected:
        problems.append(f"model '{name}': version_policy selects none of the versions {found}")
    mixed = {_backend_of(v.artifact) for v in versions if v.artifact is not None} - {backend}
    if mixed and config.backend is None:
        problems.append(
            f"model '{name}': versions mix backends {sorted(mixed | {backend or ''})}; set backend in config.yaml"
        )
    loaded = {v.version for v in versions}
    for label, version in config.labels.items():
        if version not in loaded:
            problems.append(
                f"model '{name}': label '{label}' points at version {version}, which is not loaded"
            )
    for version in config.traffic:
        if version not in loaded:
            problems.append(f"model '{name}': traffic names version {version}, which is not loaded")
    for deployment in config.fallback:
        if deployment == name:
            problems.append(f"model '{name}': it lists itself as a fallback")
        elif not (root / deployment).is_dir():
            problems.append(f"model '{name}': fallback '{deployment}' is not a model in {root}")
    for deployment in config.split:
        if deployment == name:
            problems.append(f"model '{name}': its split sends requests to itself")
        elif not (root / deployment).is_dir():
            problems.append(f"model '{name}': split deployment '{deployment}' is not a model in {root}")
    problems += _missing_samples(name, path, config)
    for target in config.shadow:
        if target.model is not None and not (root / target.model).is_dir():
            problems.append(f"model '{name}': shadow model '{target.model}' is not a model in {root}")
    for rule in config.routing.canary:
        if rule.version is not None and rule.version not in loaded:
            problems.append(
                f"model '{name}': the canary rule on header {rule.header} names version {rule.version}, which is not loaded"
            )
        if rule.label is not None and rule.label not in config.labels:
            problems.append(
                f"model '{name}': the canary rule on header {rule.header} names label '{rule.label}', which config.yaml does not define"
            )
    return ModelEntry(name, path, config, backend, tuple(versions), tuple(problems))


def scan(root: Path) -> dict[str, ModelEntry]:
    return {name: scan_model(root, name) for name in model_names(root)}


@dataclass(frozen=True, slots=True)
class Repository:
    """Where the models are. Triton's shape: a folder per model under `root`. With `model_name`,
    `root` is that one model's folder instead, as KServe's storage initializer leaves /mnt/models."""

    root: Path
    model_name: str | None = None

    def names(self) -> list[str]:
        if self.model_name is None:
            return model_names(self.root)
        return [self.model_name] if self.root.is_dir() else []

    def folder(self, name: str) -> Path | None:
        """The model's folder, or None where `name` is no model here."""
        if self.model_name is None:
            path = self.root / name
            return path if is_model_name(name) and path.is_dir() else None
        return self.root if name == self.model_name and self.root.is_dir() else None

    def scan(self, name: str, override: Mapping[str, Any] | None = None) -> ModelEntry:
        if self.model_name is None:
            return scan_model(self.root, name, override=override)
        return scan_single_model(self.root, name, override)


def scan_single_model(folder: Path, name: str, override: Mapping[str, Any] | None = None) -> ModelEntry:
    """`folder` as one model, `name`: version folders in Triton's shape, or else an artifact directly
    in it (KServe's storage initializer copies a single file there), served as version 1."""
    has_versions = folder.is_dir() and any(p.is_dir() and p.name.isdigit() for p in folder.iterdir())
    config, problems = _read_config(folder / CONFIG_FILE, override)
    artifact = None if has_versions else _find_artifact(folder, config.backend)
    if artifact is None:
        # Triton's shape, one level down; an empty folder gets scan_model's "no version folders".
        return scan_model(folder, name, path=folder, override=override)
    named = {*config.labels.values(), *config.traffic}
    named |= {rule.version for rule in config.routing.canary if rule.version is not None}
    if named - {1}:
        problems.append(
            f"model '{name}': {folder} holds one artifact, served as version 1, but config.yaml "
            f"names versions {sorted(named - {1})}"
        )
    if not config.version_policy.select([1]):
        problems.append(f"model '{name}': version_policy selects none of the versions [1]")
    others = [*config.fallback, *(t.model for t in config.shadow if t.model is not None)]
    if others:
        problems.append(f"model '{name}': it is the only model here, so {others} cannot be reached")
    problems += _missing_samples(name, folder, config)
    backend = config.backend or _backend_of(artifact)
    return ModelEntry(name, folder, config, backend, (VersionEntry(1, folder, artifact),), tuple(problems))


def _read_config(path: Path, override: Mapping[str, Any] | None = None) -> tuple[ModelConfig, list[str]]:
    try:
        return load_model_config(path, override), []
    except ConfigError as exc:
        return ModelConfig(), [str(exc)]


def _missing_samples(name: str, folder: Path, config: ModelConfig) -> list[str]:
    samples = config.warmup.samples if config.warmup is not None else ()
    return [
        f"model '{name}': warmup sample {sample} is not a file in {folder}"
        for sample in samples
        if not (folder / sample).is_file()
    ]
