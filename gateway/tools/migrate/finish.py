"""`migrate finish`: after promote has moved all of the model's traffic, the model itself moves to
the new backend, and the old backend's deployment is retired.

The new deployment's files go into the model's own version folders, beside the old ones. Then one
write of its config.yaml switches `backend`, drops the old backend's section, and takes away the
split and shadow entries for the new deployment. The gateway reloads the model on the new
backend, and its old versions serve until the new ones are ready; until then, the split still
sends every request to the new deployment. Once the gateway shows the model ready on the new
backend, the new deployment's folder leaves the repository (unless kept), and the gateway
unloads it. No folder is ever missing from the repository, so no poll sees the model gone.

The old backend's files stay beside the new ones, unused: the record lists them, to delete when
wanted. A managed TorchServe that serves no model any more stops by itself (adapters/torchserve/managed.py).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.tools.migrate import config_edit, state
from gateway.tools.migrate.live import DEFAULT_APPLY_TIMEOUT_S, Applied, Gateway
from gateway.tools.migrate.state import MigrationError

# A folder whose name starts with a dot is not a model: the repository scan skips it.
REMOVED_SUFFIX = ".migrate-removed"


@dataclass(frozen=True, slots=True)
class FinishOptions:
    keep_twin: bool = False
    apply_timeout_s: float = DEFAULT_APPLY_TIMEOUT_S
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FinishResult:
    model: str
    backend: str
    versions: list[int]
    old_files: list[str]
    twin_removed: bool
    applied: Applied


def on_backend(backend: str, versions: list[int]) -> Any:
    """The model's /status entry has every one of `versions` READY on `backend`, and no split."""

    def check(entry: dict[str, Any] | None) -> bool:
        if entry is None or entry.get("split"):
            return False
        found = {int(v["version"]): v for v in entry.get("versions", [])}
        return all(
            found.get(v, {}).get("state") == "READY" and found[v].get("backend") == backend for v in versions
        )

    return check


def finish(
    model: str, model_repo: Path, state_dir: Path, gateway_url: str, options: FinishOptions
) -> FinishResult:
    migration = state.load(state_dir, model)
    new = migration.deployment
    split = config_edit.read_split(model_repo, model).get(new, 0.0)
    if split < 100:
        raise MigrationError(
            f"'{new}' answers {split:g}% of '{model}', not all of it: run `modelyard migrate promote "
            f"{model}` to 100% first, so that no request depends on the versions of '{model}' while they move"
        )
    versions = _versions(model_repo / new)
    if not versions:
        raise MigrationError(f"{model_repo / new} has no version folders to move into '{model}'")
    with Gateway(gateway_url, headers=options.headers) as gateway:
        old_files = [_move_in(model_repo / new / str(v), model_repo / model / str(v)) for v in versions]
        old_section = config_edit.switch_backend(
            model_repo, model, migration.source_backend, migration.to, new
        )
        migration.record("finish", f"'{model}' moved to {migration.to}", old_section=old_section)
        state.save(state_dir, migration)
        applied = gateway.apply(
            model, on_backend(migration.to, versions), f"the move to {migration.to}", options.apply_timeout_s
        )
        removed = False
        if not options.keep_twin:
            _retire(model_repo / new)
            gateway.unload(new)  # at once where the repository API is on; else at the next poll
            removed = True
    kept = sorted(f for files in old_files for f in files)
    migration.steps["finish"] = {
        "backend": migration.to, "versions": versions, "old_files": kept, "twin_removed": removed,
        "applied_by": applied.how, "at": time.time(),
    }  # fmt: skip
    migration.record(
        "finish", f"'{model}' serves on {migration.to}" + (f"; '{new}' removed" if removed else "")
    )
    state.save(state_dir, migration)
    return FinishResult(model, migration.to, versions, kept, removed, applied)


def _versions(folder: Path) -> list[int]:
    return (
        sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
        if folder.is_dir()
        else []
    )


def _move_in(source: Path, target: Path) -> list[str]:
    """Copies each entry of the new deployment's version folder into the model's, each under a
    hidden name first, then renamed: the old backend's files stay. Returns the old files' paths."""
    if not target.is_dir():
        raise MigrationError(
            f"'{target.parent.name}' has no version {target.name}: its versions and the new deployment's differ"
        )
    old = [str(p) for p in target.iterdir() if not p.name.startswith(".")]
    for entry in sorted(source.iterdir()):
        if entry.name.startswith("."):
            continue
        final = target / entry.name
        if final.exists():
            raise MigrationError(
                f"{final} exists already: the new deployment's '{entry.name}' would replace a file of "
                f"'{target.parent.name}'; move it aside and run finish again"
            )
        staged = target / f".{entry.name}.migrate-new"
        if entry.is_dir():
            shutil.copytree(entry, staged, dirs_exist_ok=False)
        else:
            shutil.copy2(entry, staged)
        os.replace(staged, final)
    return old


def _retire(folder: Path) -> None:
    """The folder leaves the repository in one rename (the gateway unloads it at its next poll),
    then goes."""
    hidden = folder.with_name(f".{folder.name}{REMOVED_SUFFIX}")
    shutil.rmtree(hidden, ignore_errors=True)
    os.replace(folder, hidden)
    shutil.rmtree(hidden, ignore_errors=True)
