"""The two keys of the source model's config.yaml that a migration writes: its `shadow` entry for
the new deployment and its `split`.

The file is read and written with ruamel.yaml's round-trip mode, so the user's comments, key order
and quoting survive; every other key is left as it was. The new text is written to a temporary
file beside it and renamed over it, so a gateway polling the repository never reads half a file.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from gateway.tools.migrate.state import MigrationError

CONFIG = "config.yaml"
MISSING_RUAMEL = (
    "editing config.yaml with its comments kept needs ruamel.yaml, which is not installed where "
    "modelyard runs: install the 'migrate' extra (in a checkout: .venv/bin/python -m pip install -e "
    "'.[migrate]'; elsewhere: python -m pip install 'modelyard[migrate]')"
)


def _yaml() -> Any:
    try:
        from ruamel.yaml import YAML
    except ImportError as exc:
        raise MigrationError(MISSING_RUAMEL) from exc
    yaml = YAML()  # round-trip: comments, order and flow style are kept
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.representer.add_representer(float, _float)
    return yaml


def _float(representer: Any, value: float) -> Any:
    # YAML 1.1 readers (PyYAML, which the gateway reads config.yaml with) take 1e-05 for a string:
    # the mantissa gets its dot, 1.0e-05.
    text = repr(value)
    if "e" in text and "." not in text.split("e")[0]:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent}"
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


def config_path(model_repo: Path, model: str) -> Path:
    folder = model_repo / model
    if not folder.is_dir():
        raise MigrationError(f"model '{model}' has no folder in {model_repo}: give the right --model-repo")
    return folder / CONFIG


def _read(path: Path) -> Any:
    from ruamel.yaml.comments import CommentedMap

    yaml = _yaml()
    if not path.is_file():
        return CommentedMap()
    try:
        document = yaml.load(path.read_text())
    except Exception as exc:  # ruamel's parser and scanner errors share no useful base
        raise MigrationError(f"{path} is not YAML that can be edited: {exc}") from exc
    if document is None:
        return CommentedMap()
    if not isinstance(document, dict):
        raise MigrationError(f"{path} holds {type(document).__name__}, not a mapping of keys")
    return document


def _write(path: Path, document: Any) -> None:
    buffer = io.StringIO()
    _yaml().dump(document, buffer)
    temporary = path.with_name(f".{path.name}.migrate.tmp")
    temporary.write_text(buffer.getvalue())
    os.replace(temporary, path)


def read_split(model_repo: Path, model: str) -> dict[str, float]:
    """The `split` the source's config.yaml states now: deployment -> percent."""
    document = _read(config_path(model_repo, model))
    split = document.get("split") or {}
    if not isinstance(split, dict):
        raise MigrationError(
            f"{config_path(model_repo, model)}: split is not a mapping of deployment to percent"
        )
    return {str(name): float(percent) for name, percent in split.items()}


def read_shadow(model_repo: Path, model: str, deployment: str) -> dict[str, Any] | None:
    """The source's shadow entry for `deployment`, as written, or None."""
    document = _read(config_path(model_repo, model))
    for entry in document.get("shadow") or []:
        if isinstance(entry, dict) and entry.get("model") == deployment:
            return dict(entry)
    return None


def set_shadow(
    model_repo: Path, model: str, deployment: str, percent: float, atol: float, rtol: float
) -> Path:
    """Writes (or rewrites) the source's one shadow entry for `deployment`; other entries stay."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    path = config_path(model_repo, model)
    document = _read(path)
    entry = CommentedMap([("model", deployment), ("percent", _number(percent))])
    entry["atol"], entry["rtol"] = atol, rtol
    entry.fa.set_flow_style()
    entries = document.get("shadow")
    if not isinstance(entries, list):
        entries = CommentedSeq()
        document["shadow"] = entries
    for index, existing in enumerate(entries):
        if isinstance(existing, dict) and existing.get("model") == deployment:
            entries[index] = entry
            break
    else:
        entries.append(entry)
    _write(path, document)
    return path


def remove_shadow(model_repo: Path, model: str, deployment: str) -> bool:
    """Takes the shadow entry for `deployment` away (and the key, when it was the only one)."""
    path = config_path(model_repo, model)
    document = _read(path)
    entries = document.get("shadow")
    if not isinstance(entries, list):
        return False
    kept = [e for e in entries if not (isinstance(e, dict) and e.get("model") == deployment)]
    if len(kept) == len(entries):
        return False
    if kept:
        for index in reversed(range(len(entries))):
            if entries[index] not in kept:
                del entries[index]
    else:
        del document["shadow"]
    _write(path, document)
    return True


def set_split(model_repo: Path, model: str, deployment: str, percent: float) -> Path:
    """The source's `split` sends `percent` of its traffic to `deployment`; 0 takes the entry away
    (and the key with its last entry). Other deployments' shares stay."""
    from ruamel.yaml.comments import CommentedMap

    if not 0 <= percent <= 100:
        raise MigrationError(f"a split is a percent from 0 to 100, not {percent}")
    path = config_path(model_repo, model)
    document = _read(path)
    split = document.get("split")
    if not isinstance(split, dict):
        split = CommentedMap()
        split.fa.set_flow_style()
    if percent == 0:
        split.pop(deployment, None)
    else:
        split[deployment] = _number(percent)
    others = sum(float(v) for k, v in split.items() if k != deployment)
    if others + percent > 100:
        raise MigrationError(
            f"{path}: the split would send {others + percent:g}% of model '{model}' elsewhere; "
            "the other deployments' shares leave room for at most "
            f"{100 - others:g}% to '{deployment}'"
        )
    if split:
        document["split"] = split
    else:
        document.pop("split", None)
    _write(path, document)
    return path


def _number(value: float) -> int | float:
    """10.0 is written as 10: the file keeps the shape a person would type."""
    return int(value) if float(value).is_integer() else float(value)


def switch_backend(model_repo: Path, model: str, old_backend: str, backend: str, deployment: str) -> Any:
    """One write of the source's config.yaml: `backend` becomes the new one, the old backend's own
    section goes, and so do the split and shadow entries for `deployment`. Returns the section
    taken away (plain data, for the record), or None."""
    path = config_path(model_repo, model)
    document = _read(path)
    document["backend"] = backend
    if old_backend and old_backend != backend:
        # The file's own comments may still speak of the old backend: this one says what changed.
        document.yaml_add_eol_comment(f"was {old_backend}, until modelyard migrate finish", "backend")
    section = document.pop(old_backend, None) if old_backend and old_backend != backend else None
    split = document.get("split")
    if isinstance(split, dict):
        split.pop(deployment, None)
        if not split:
            del document["split"]
    entries = document.get("shadow")
    if isinstance(entries, list):
        for index in reversed(range(len(entries))):
            if isinstance(entries[index], dict) and entries[index].get("model") == deployment:
                del entries[index]
        if not entries:
            del document["shadow"]
    _write(path, document)
    return _plain(section)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
