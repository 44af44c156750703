"""`modelyard migrate convert`: every version of a model becomes the same version of a new
deployment on another backend, a model folder of its own beside the old one, `twin_of` it.

What converts to what (`ROUTES`):
- torchserve (TorchScript `model.pt`, or the module inside a `model.mar`) -> onnxruntime, by
  torch.onnx (`gateway.tools.convert.export_torchscript`);
- tensorflow (a SavedModel) -> onnxruntime (tf2onnx) or litert (TFLiteConverter);
- keras (`model.keras`) -> tensorflow (Keras' SavedModel export) or litert.
The TensorFlow-side conversions run as processes of their own (`tf_export.py`, tf2onnx), so this one
keeps no TensorFlow graph state. The new folder is built under a hidden name beside the old one and
renamed when whole: a gateway polling the repository never sees half a model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from adapters import BACKENDS, backend_named
from gateway.repository import CONFIG_FILE, ModelEntry, is_model_name, model_names, scan_model
from gateway.tools.convert import DEFAULT_OPSET, export_savedmodel, export_torchscript, torch_signature
from gateway.tools.migrate import state
from gateway.tools.migrate.state import Migration, MigrationError

# Source backend -> the backends it converts to.
ROUTES: dict[str, tuple[str, ...]] = {
    "torchserve": ("onnxruntime",),
    "tensorflow": ("onnxruntime", "litert"),
    "keras": ("tensorflow", "litert"),
}
# The new deployment's default name is MODEL_<suffix>.
SUFFIXES = {"onnxruntime": "onnx", "litert": "litert", "tensorflow": "tf", "keras": "keras"}
TARGETS = tuple(SUFFIXES)
# The source's config.yaml keys the new deployment keeps, as the user wrote them.
KEPT_KEYS = ("inputs", "outputs", "version_policy", "labels", "limits")
TF_EXPORT = Path(__file__).with_name("tf_export.py")


@dataclass(frozen=True, slots=True)
class ConvertResult:
    model: str
    source_backend: str
    to: str
    deployment: str
    folder: Path
    versions: tuple[int, ...]
    replaced: bool


def routes_text() -> str:
    return "; ".join(f"{source} -> {' or '.join(targets)}" for source, targets in ROUTES.items())


def source_entry(root: Path, model: str) -> ModelEntry:
    """The source model as the repository scan sees it; a clear error when it cannot be converted."""
    if not root.is_dir():
        raise MigrationError(f"{root} is not a folder: give the model repository with --model-repo")
    if not is_model_name(model) or not (root / model).is_dir():
        known = ", ".join(model_names(root)) or "none"
        raise MigrationError(
            f"no model '{model}' in {root} (its models: {known}); give one of them, or the repository "
            "with --model-repo"
        )
    entry = scan_model(root, model)
    if entry.problems:
        raise MigrationError(
            f"model '{model}' cannot be served as it is, so it cannot be migrated: {'; '.join(entry.problems)}"
        )
    return entry


def resolve_target(model: str, source_backend: str, to: str) -> str:
    """The backend `--to` names (aliases too: onnx, tf, tflite), if the source converts to it."""
    target = backend_named(to)
    if target not in TARGETS:
        raise MigrationError(f"--to must be one of {', '.join(TARGETS)}, not '{to}'")
    allowed = ROUTES.get(source_backend)
    if allowed is None:
        why = (
            "ONNX is already the portable format; serve it as it is"
            if source_backend == "onnxruntime"
            else "modelyard converts from torchserve, tensorflow and keras models only"
        )
        raise MigrationError(
            f"model '{model}' is served by {source_backend}, which cannot be migrated: {why} "
            f"(conversions: {routes_text()})"
        )
    if target not in allowed:
        raise MigrationError(
            f"model '{model}' is served by {source_backend}, which converts to {' or '.join(allowed)}, not {target} "
            f"(conversions: {routes_text()})"
        )
    return target


def default_name(model: str, to: str) -> str:
    return f"{model}_{SUFFIXES[to]}"


@contextlib.contextmanager
def torchscript_file(artifact: Path) -> Iterator[Path]:
    """The TorchScript file of a TorchServe version: model.pt itself, or the serialized file a
    model.mar (a zip) names in its manifest, extracted to a temporary folder."""
    if artifact.suffix != ".mar":
        yield artifact
        return
    with tempfile.TemporaryDirectory() as folder:
        # The member's own name could climb out of the folder; it is written under a fixed one.
        target = Path(folder) / "model.pt"
        try:
            with zipfile.ZipFile(artifact) as archive:
                manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
                target.write_bytes(archive.read(str(manifest["model"]["serializedFile"])))
        except (OSError, KeyError, TypeError, ValueError, zipfile.BadZipFile) as exc:
            raise MigrationError(
                f"cannot read the TorchScript module in {artifact}: {exc}; a .mar made by "
                "torch-model-archiver --serialized-file model.pt holds one"
            ) from exc
        yield target


def _run_tf_export(kind: str, source: Path, target: Path, signature: str, custom: str | None) -> None:
    command = [sys.executable, str(TF_EXPORT), kind, str(source), str(target), signature]
    command += [custom] if custom else []
    # Run as a file, its own folder is first on its path: the working directory, where a Keras
    # model's custom_objects_module may be, is put back as the gateway's own process has it.
    path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": path}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0 or not target.exists():
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise MigrationError(f"converting {source} ({kind}) failed:\n{tail}")


def convert_version(entry: ModelEntry, artifact: Path, to: str, target: Path, opset: int) -> None:
    """One version's artifact written as `target` (the new backend's artifact name)."""
    source_backend = entry.backend
    config = entry.config
    if source_backend == "torchserve":
        if not config.inputs:
            raise MigrationError(
                f"model '{entry.name}': a TorchScript module does not say its input shapes; declare "
                f"`inputs` (and `outputs`) in {entry.path / CONFIG_FILE}"
            )
        inputs, output_names = torch_signature(config, ())
        with torchscript_file(artifact) as module:
            export_torchscript(module, target, inputs, output_names, opset)
    elif source_backend == "tensorflow" and to == "onnxruntime":
        export_savedmodel(artifact, target, opset)
    elif source_backend == "tensorflow":
        folder = artifact.parent if artifact.name == "saved_model.pb" else artifact
        signature = str(config.section("tensorflow").get("signature", "serving_default"))
        _run_tf_export("savedmodel-litert", folder, target, signature, None)
    else:
        custom = config.section("keras").get("custom_objects_module")
        kind = "keras-savedmodel" if to == "tensorflow" else "keras-litert"
        _run_tf_export(kind, artifact, target, "serving_default", str(custom) if custom else None)


def new_config(entry: ModelEntry, to: str) -> str:
    """The new deployment's config.yaml: its backend, `twin_of` the source, and the source's tensor
    declarations, version policy, labels and limits as written there."""
    path = entry.path / CONFIG_FILE
    raw: dict[str, Any] = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    body: dict[str, Any] = {"backend": to, "twin_of": entry.name}
    body.update({key: raw[key] for key in KEPT_KEYS if key in raw})
    header = (
        f"# Written by modelyard migrate from {entry.name} ({entry.backend} -> {to}); "
        "every version converted into the same version number.\n"
    )
    return header + yaml.safe_dump(body, sort_keys=False, default_flow_style=None)


def convert_model(
    root: Path,
    model: str,
    to: str,
    name: str | None = None,
    force: bool = False,
    opset: int = DEFAULT_OPSET,
) -> ConvertResult:
    """Convert every version of `model` into a new model folder `name` beside it."""
    entry = source_entry(root, model)
    assert entry.backend is not None  # a scan without problems found one
    target_backend = resolve_target(model, entry.backend, to)
    deployment = name or default_name(model, target_backend)
    if not is_model_name(deployment) or deployment == model:
        raise MigrationError(f"--name '{deployment}' must be a model name other than '{model}'")
    folder = root / deployment
    if folder.exists() and not force:
        raise MigrationError(
            f"{folder} already exists: give --force to convert again and replace it, or --name for another"
        )
    # Hidden names: the repository scan takes only names that start with a letter or digit.
    building = root / f".{deployment}.migrate-new"
    shutil.rmtree(building, ignore_errors=True)
    artifact_name = BACKENDS[target_backend].artifacts[0]
    try:
        for version in entry.versions:
            if version.artifact is None:
                raise MigrationError(f"model '{model}' version {version.version} has no artifact to convert")
            target = building / str(version.version) / artifact_name
            target.parent.mkdir(parents=True)
            convert_version(entry, version.artifact, target_backend, target, opset)
        (building / CONFIG_FILE).write_text(new_config(entry, target_backend))
        replaced = _swap_in(building, folder)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return ConvertResult(
        model,
        entry.backend,
        target_backend,
        deployment,
        folder,
        tuple(v.version for v in entry.versions),
        replaced,
    )


def _swap_in(building: Path, folder: Path) -> bool:
    """`building` renamed to `folder`; an old `folder` is moved aside first and removed after, so
    the gateway sees the old model or the new one, each whole (and, for a moment, neither)."""
    if not folder.exists():
        os.rename(building, folder)
        return False
    old = folder.with_name(f".{folder.name}.migrate-old")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(folder, old)
    os.rename(building, folder)
    shutil.rmtree(old, ignore_errors=True)
    return True


def record_convert(state_dir: Path, root: Path, result: ConvertResult) -> Migration:
    """The convert step in the model's migration record, which it starts when there is none (or
    when the earlier one moved to another deployment). A new conversion voids an earlier check."""
    migration: Migration | None = None
    if state.state_path(state_dir, result.model).is_file():
        migration = state.load(state_dir, result.model)
    if migration is None or (migration.to, migration.deployment) != (result.to, result.deployment):
        migration = Migration(
            result.model, result.to, result.deployment, str(root.resolve()), result.source_backend
        )
    migration.model_repo = str(root.resolve())
    migration.source_backend = result.source_backend
    migration.steps.pop("check", None)
    migration.steps["convert"] = {
        "ok": True,
        "at": time.time(),
        "source_backend": result.source_backend,
        "to": result.to,
        "deployment": result.deployment,
        "folder": str(result.folder.resolve()),
        "versions": list(result.versions),
        "replaced": result.replaced,
    }
    migration.record(
        "convert",
        f"{result.model} ({result.source_backend}) converted to {result.deployment} ({result.to}), "
        f"versions {', '.join(map(str, result.versions))}",
    )
    state.save(state_dir, migration)
    return migration
