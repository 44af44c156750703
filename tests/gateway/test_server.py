"""The composition root reports what stops it from starting; exiting the process is the CLI's."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.server import Gateway, StartupError
from gateway.settings import Settings
from tests.support import free_port


def settings(repo: Path, **extra: object) -> Settings:
    return Settings(model_repo=repo, http_port=free_port(), grpc_port=free_port(), **extra)


async def test_a_missing_repository_is_a_startup_error_not_an_exit(tmp_path: Path) -> None:
    gateway = Gateway(settings(tmp_path / "nope"))
    with pytest.raises(StartupError, match="is not a folder"):
        await gateway.start()
    await gateway.stop()


def test_a_bad_keys_file_is_a_startup_error(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys: [{name: a, key: short, models: ['*'], actions: [infer]}]\n")
    with pytest.raises(StartupError, match="API keys"):
        Gateway(settings(tmp_path, api_keys_file=keys))
