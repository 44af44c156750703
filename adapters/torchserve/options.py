"""The `torchserve:` section of a model's config.yaml."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.breaker import GuardOptions
from gateway.errors import ModelNotReady


class TorchServeOptions(BaseModel):
    """The `torchserve:` section of a model's config.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["managed", "remote"] = "managed"
    # Remote mode: where TorchServe answers, and the model's name and versions there.
    inference_url: str | None = None
    management_url: str | None = None
    model_name: str | None = None
    # gateway version -> TorchServe version; without one, the remote's default version serves.
    versions: dict[int, str] = Field(default_factory=dict)
    # TorchServe's token authorization: the key itself, or the environment variable holding it.
    token: str | None = None
    token_env: str | None = None
    management_token: str | None = None
    management_token_env: str | None = None
    # TorchServe-side batching and workers (managed mode registers the model with these).
    batch_size: int = Field(default=1, ge=1)
    max_batch_delay_ms: int = Field(default=5, ge=0)
    workers: int = Field(default=1, ge=1)
    threads: int = Field(default=1, ge=1)
    response_timeout_s: int = Field(default=120, ge=1)
    # A .npz file of example inputs, beside config.yaml: the model's metadata when config.yaml
    # declares no inputs and outputs.
    sample: str | None = None
    timeout_s: float = Field(default=60.0, gt=0)
    # The circuit breaker and retries of this TorchServe's inference address (gateway/breaker.py).
    resilience: GuardOptions = GuardOptions()

    def secret(self, value: str | None, env: str | None, label: str) -> str | None:
        if value:
            return value
        if env:
            if env not in os.environ:
                raise ModelNotReady(f"{label}: environment variable {env} (torchserve {env!r}) is not set")
            return os.environ[env]
        return None
