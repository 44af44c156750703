"""The gateway's settings, read once: flags first, then MODELYARD_* environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODELYARD_", protected_namespaces=(), extra="ignore")

    model_repo: Path = Path("model_repo")
    host: str = "127.0.0.1"
    http_port: int = Field(default=8000, ge=0, le=65535)
    grpc_port: int = Field(default=8001, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # gRPC messages carry whole tensors: allow far more than gRPC's 4 MiB default.
    grpc_max_message_mb: int = Field(default=256, ge=1)
    # How long in-flight requests may run on after a shutdown signal (the drain timeout).
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    # Across all models: requests running at once, and waiting behind them, on top of each
    # model's own `limits`. None: no global cap.
    global_max_inflight: int | None = Field(default=None, ge=1)
    global_max_queue: int = Field(default=1024, ge=0)
    # The header (gRPC: metadata key) that names a request's priority: high, normal or low.
    priority_header: str = "x-priority"
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    # Seconds between scans of the repository for new, changed or removed models; None: never,
    # and models change only through the repository API.
    poll_interval_s: float | None = Field(default=None, gt=0)
    # The repository API's load and unload (and the status page's buttons for them).
    enable_repository_api: bool = False
