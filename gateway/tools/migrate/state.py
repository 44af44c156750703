"""A migration's record: one JSON file per model, written by each step and read by the next.

It lives under the state folder (`--state-dir`, `.modelyard/migrations` by default), never in the
model repository, so writing it never makes the gateway reload a model.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gateway.tools.errors import ToolError

DEFAULT_STATE_DIR = Path(".modelyard/migrations")


class MigrationError(ToolError):
    """A step cannot run, or ran and refused: the message names what to do next."""


@dataclass(slots=True)
class Migration:
    """What the steps have done to move `model` (the source deployment) to `deployment`."""

    model: str
    # The backend moved to (onnxruntime, litert, tensorflow, keras) and the new deployment's name.
    to: str
    deployment: str
    model_repo: str
    source_backend: str = ""
    created_at: float = field(default_factory=time.time)
    # Each step's result, keyed by the step's name (convert, check, shadow, status, promote),
    # as the step wrote it: the latest run of each.
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Every event in order: {"at": unix time, "step": name, "event": text, ...}.
    history: list[dict[str, Any]] = field(default_factory=list)
    # Automatic rollbacks during promote, counted across runs.
    rollbacks: int = 0

    def record(self, step: str, event: str, **details: Any) -> None:
        self.history.append({"at": time.time(), "step": step, "event": event, **details})


def state_path(state_dir: Path, model: str) -> Path:
    return state_dir / f"{model}.json"


def load(state_dir: Path, model: str) -> Migration:
    """The model's migration; a clear error when none was started."""
    path = state_path(state_dir, model)
    if not path.is_file():
        raise MigrationError(
            f"no migration of model '{model}' under {state_dir}: start one with "
            f"`modelyard migrate convert {model} --to onnxruntime` (or give --state-dir)"
        )
    try:
        return Migration(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise MigrationError(f"{path} is not a migration record: {exc}") from exc


def save(state_dir: Path, migration: Migration) -> Path:
    """Written whole to a temporary file and renamed, so a reader never sees half of it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_path(state_dir, migration.model)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(asdict(migration), indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)
    return path
