"""The `modelyard` command."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from gateway.loaded import State
from gateway.registry import Registry
from gateway.repository import scan
from gateway.settings import Settings
from gateway.tools.commands import register as register_tools

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="modelyard: one front door for inference.",
)
repo_app = typer.Typer(no_args_is_help=True, help="Work with a model repository.")
app.add_typer(repo_app, name="repo")


@app.command()
def serve(
    model_repo: Annotated[
        Path | None, typer.Option(help="Model repository folder [env MODELYARD_MODEL_REPO].")
    ] = None,
    model_name: Annotated[
        str | None,
        typer.Option(
            help="Serve --model-repo as this one model's folder, as KServe leaves /mnt/models "
            "[env MODELYARD_MODEL_NAME]."
        ),
    ] = None,
    host: Annotated[str | None, typer.Option(help="Address to bind [env MODELYARD_HOST].")] = None,
    http_port: Annotated[
        int | None, typer.Option(help="HTTP port, default 8000 [env MODELYARD_HTTP_PORT].")
    ] = None,
    grpc_port: Annotated[
        int | None, typer.Option(help="gRPC port, default 8001 [env MODELYARD_GRPC_PORT].")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Serving processes sharing the ports under a supervisor, default 1 [env MODELYARD_WORKERS]."
        ),
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help="debug|info|warning|error [env MODELYARD_LOG_LEVEL].")
    ] = None,
    poll_interval: Annotated[
        float | None,
        typer.Option(
            help="Seconds between scans of the repository for changes [env MODELYARD_POLL_INTERVAL_S]."
        ),
    ] = None,
    enable_repository_api: Annotated[
        bool | None,
        typer.Option(
            "--enable-repository-api",
            help="Allow the repository API to load and unload models [env MODELYARD_ENABLE_REPOSITORY_API].",
            show_default=False,
        ),
    ] = None,
    load_mode: Annotated[
        str | None,
        typer.Option(
            help="eager: load every model at start; on_demand: each at its first request "
            "[env MODELYARD_LOAD_MODE]."
        ),
    ] = None,
    model_memory_budget: Annotated[
        str | None,
        typer.Option(
            help="Memory the resident models may hold, e.g. 2GiB or 50%; least recently used idle "
            "versions unload to make room [env MODELYARD_MODEL_MEMORY_BUDGET]."
        ),
    ] = None,
    record_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where models with `record:` keep their sampled inputs, default .modelyard/recorded "
            "[env MODELYARD_RECORD_DIR]."
        ),
    ] = None,
    api_keys_file: Annotated[
        Path | None,
        typer.Option(help="YAML/JSON file of API keys; turns auth on [env MODELYARD_API_KEYS_FILE]."),
    ] = None,
    tls_certfile: Annotated[
        Path | None,
        typer.Option(help="PEM certificate: serve HTTP and gRPC over TLS [env MODELYARD_TLS_CERTFILE]."),
    ] = None,
    tls_keyfile: Annotated[
        Path | None, typer.Option(help="PEM private key of --tls-certfile [env MODELYARD_TLS_KEYFILE].")
    ] = None,
    max_request_body_mb: Annotated[
        float | None,
        typer.Option(help="Largest REST request body, default 256 [env MODELYARD_MAX_REQUEST_BODY_MB]."),
    ] = None,
) -> None:
    """Serve a model repository over REST and gRPC."""
    from gateway.server import StartupError, run

    given: dict[str, Any] = {
        "model_repo": model_repo,
        "model_name": model_name,
        "host": host,
        "http_port": http_port,
        "grpc_port": grpc_port,
        "workers": workers,
        "log_level": log_level,
        "poll_interval_s": poll_interval,
        "enable_repository_api": enable_repository_api,
        "load_mode": load_mode,
        "model_memory_budget": model_memory_budget,
        "record_dir": record_dir,
        "api_keys_file": api_keys_file,
        "tls_certfile": tls_certfile,
        "tls_keyfile": tls_keyfile,
        "max_request_body_mb": max_request_body_mb,
    }
    try:
        settings = Settings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        run(settings)
    except StartupError as exc:
        typer.echo(f"modelyard: {exc}", err=True)
        raise typer.Exit(1) from None


@repo_app.command("check")
def check(
    directory: Annotated[Path, typer.Argument(help="The model repository to check.")],
    load: Annotated[bool, typer.Option(help="Also load every version with its backend.")] = True,
) -> None:
    """Validate a repository: layout, config.yaml, and (by default) that every version loads."""
    logging.basicConfig(level=logging.CRITICAL)
    if not directory.is_dir():
        typer.echo(f"error: {directory} is not a folder", err=True)
        raise typer.Exit(2)
    problems = asyncio.run(_check(directory, load))
    if problems:
        typer.echo(f"\n{problems} problem(s) found in {directory}", err=True)
        raise typer.Exit(1)
    typer.echo(f"\n{directory}: all models valid")


async def _check(directory: Path, load: bool) -> int:
    entries = scan(directory)
    if not entries:
        typer.echo(f"FAIL  {directory}: no model folders")
        return 1
    problems = 0
    registry = Registry(directory)
    try:
        for name, entry in entries.items():
            if not entry.ok:
                problems += len(entry.problems)
                for problem in entry.problems:
                    typer.echo(f"FAIL  {problem}")
                continue
            versions = ", ".join(str(v.version) for v in entry.versions)
            if not load:
                typer.echo(f"ok    model '{name}': versions {versions} ({entry.backend})")
                continue
            try:
                model = await registry.load(name, resident=True)
            except Exception:
                model = registry.get(name)
            failed = [v for v in model.versions.values() if v.state is not State.READY]
            for version in failed:
                # A load's reason names its model and version already; other reasons get them.
                label = f"model '{name}' version {version.version}"
                reason = version.reason if version.reason.startswith(label) else f"{label}: {version.reason}"
                typer.echo(f"FAIL  {reason}")
            problems += len(failed)
            if not failed:
                typer.echo(f"ok    model '{name}': versions {versions} ({entry.backend}), loaded")
    finally:
        await registry.aclose()
    return problems


register_tools(app)
