"""The tools' commands on the `modelyard` CLI: up, parity, convert, bench and migrate (a group of
its own, gateway/tools/migrate/cli.py).

Each command imports its tool when it runs, so `modelyard serve` loads none of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from adapters import BACKENDS
from gateway.errors import GatewayError
from gateway.repository import scan
from gateway.tools import parity as checks
from gateway.tools.errors import ToolError
from gateway.tools.migrate.cli import migrate

if TYPE_CHECKING:
    import rich.progress

    from gateway.tools.lab.bench import BenchPlan, BenchResult

# The backends --deployments takes, each with its aliases, for the help text.
BACKEND_NAMES = ", ".join(
    f"{name} or {' or '.join(adapter.aliases)}" if adapter.aliases else name
    for name, adapter in BACKENDS.items()
)


def register(app: typer.Typer) -> None:
    """Adds the tools' commands to the CLI."""
    for command in (up, parity, convert, bench):
        app.command()(command)
    app.add_typer(migrate)


def up(
    backend: Annotated[str, typer.Option(help="tfserving or torchserve.")],
    model_repo: Annotated[Path, typer.Option(help="The model repository whose models it serves.")] = Path(
        "model_repo"
    ),
    workdir: Annotated[
        Path, typer.Option(help="Where the generated config and archives go (mounted into the container).")
    ] = Path(".modelyard"),
    host: Annotated[
        str, typer.Option(help="Host address the container's ports are published on.")
    ] = "127.0.0.1",
    port_offset: Annotated[int, typer.Option(help="Added to each published port, to run beside others.")] = 0,
) -> None:
    """Start a backend's official image (Docker) for the models of a repository."""
    from gateway.tools import containers

    if backend not in containers.BACKENDS:
        typer.echo(
            f"error: --backend must be one of {', '.join(containers.BACKENDS)}, not {backend!r}", err=True
        )
        raise typer.Exit(2)
    if not model_repo.is_dir():
        typer.echo(f"error: {model_repo} is not a folder", err=True)
        raise typer.Exit(2)
    entries = scan(model_repo)
    for entry in entries.values():
        for problem in entry.problems:
            typer.echo(f"skipped: {problem}", err=True)
    try:
        spec = containers.build_spec(
            containers.TFSERVING if backend == "tfserving" else containers.TORCHSERVE,
            entries,
            (workdir / backend).resolve(),
            host,
            port_offset,
        )
        client = containers.docker_client()
        containers.prepare(spec)
        container_id = containers.start(spec, client)
    except containers.UpError as exc:
        typer.echo(f"error: modelyard up --backend {backend}: {exc}", err=True)
        raise typer.Exit(1) from None
    ports = ", ".join(f"{h}:{p} -> {c}" for c, (h, p) in spec.ports.items())
    typer.echo(
        f"started {spec.name} ({spec.image}, id {container_id}) for {', '.join(spec.models)}; ports {ports}"
    )


def parity(
    model: Annotated[str, typer.Argument(help="The model whose deployments are compared.")],
    model_repo: Annotated[Path, typer.Option(help="The model repository.")] = Path("model_repo"),
    versions: Annotated[str | None, typer.Option(help="Two versions of MODEL, like 1,2.")] = None,
    deployments: Annotated[
        str | None, typer.Option(help="Two models of the repository, MODEL first, each NAME or NAME:VERSION.")
    ] = None,
    inputs: Annotated[
        Path | None,
        typer.Option(help=".npz of inputs keyed by name; default: generated from MODEL's metadata."),
    ] = None,
    rtol: Annotated[
        float, typer.Option(help="Relative tolerance, against MODEL's output.")
    ] = checks.DEFAULT_RTOL,
    atol: Annotated[float, typer.Option(help="Absolute tolerance.")] = checks.DEFAULT_ATOL,
    batch: Annotated[
        int, typer.Option(help="Size of -1 dimensions in generated inputs.")
    ] = checks.DEFAULT_BATCH,
) -> None:
    """Run the same inputs through two deployments; exit 1 when an output differs over the tolerance."""
    logging.basicConfig(level=logging.CRITICAL)
    try:
        left, right = checks.parse_sides(model, versions, deployments)
        given = checks.read_inputs(inputs) if inputs is not None else None
        report = asyncio.run(checks.run_parity(model_repo, left, right, given, batch, rtol, atol))
    except checks.ParityUsageError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except (GatewayError, ToolError) as exc:
        typer.echo(f"FAIL  {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(report.table())
    typer.echo(report.verdict())
    if not report.ok:
        raise typer.Exit(1)


def convert(
    source: Annotated[Path, typer.Argument(help="A TorchScript file (model.pt) or a SavedModel folder.")],
    name: Annotated[str, typer.Option(help="The model the new ONNX version belongs to.")],
    model_repo: Annotated[Path, typer.Option(help="The model repository to write into.")] = Path(
        "model_repo"
    ),
    version: Annotated[
        int | None, typer.Option(help="The new version; default: highest existing + 1.")
    ] = None,
    source_format: Annotated[
        str | None, typer.Option("--from", help="torchscript or savedmodel; default: from the path.")
    ] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset to export.")] = 17,
    input_shape: Annotated[
        list[str] | None,
        typer.Option(
            help="TorchScript only, once per input, like -1,64 (names input0..); default: config.yaml."
        ),
    ] = None,
    check: Annotated[bool, typer.Option(help="Run the parity check against the source afterwards.")] = True,
    rtol: Annotated[float, typer.Option(help="Relative tolerance of the check.")] = checks.DEFAULT_RTOL,
    atol: Annotated[float, typer.Option(help="Absolute tolerance of the check.")] = checks.DEFAULT_ATOL,
    batch: Annotated[int, typer.Option(help="Rows of the check's generated inputs.")] = checks.DEFAULT_BATCH,
) -> None:
    """Export a TorchScript module or a SavedModel to ONNX as a new version, then check parity."""
    from gateway.tools import convert as conversion

    logging.basicConfig(level=logging.CRITICAL)
    try:
        shapes = [_shape(text) for text in input_shape or []]
        converted, runner = conversion.convert(
            source, model_repo, name, version, source_format, opset, shapes
        )
    except (conversion.ConvertError, checks.ParityUsageError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {converted.path} ({converted.source_format} -> ONNX opset {opset})")
    if not check:
        return
    try:
        report = asyncio.run(
            conversion.check_conversion(converted, model_repo, source, runner, batch, rtol, atol)
        )
    except (GatewayError, ToolError) as exc:
        typer.echo(f"FAIL  {exc} (kept {converted.path})", err=True)
        raise typer.Exit(1) from None
    typer.echo(report.table())
    typer.echo(report.verdict())
    if not report.ok:
        typer.echo(f"kept {converted.path} for inspection; remove it before serving", err=True)
        raise typer.Exit(1)


def _shape(text: str) -> list[int]:
    try:
        return [int(d) for d in text.split(",")]
    except ValueError:
        raise checks.ParityUsageError(
            f"--input-shape '{text}' is not a list of integers like -1,64"
        ) from None


def bench(
    model: Annotated[str, typer.Argument(help="The model whose deployments are measured.")],
    deployments: Annotated[
        str | None,
        typer.Option(
            help=f"Backends ({BACKEND_NAMES}: MODEL's or a twin's) or models, "
            "each with an optional :VERSION; default: MODEL and its twins."
        ),
    ] = None,
    versions: Annotated[str | None, typer.Option(help="Versions of MODEL instead, like 1,2.")] = None,
    protocol: Annotated[str, typer.Option(help="rest-json, rest-binary or grpc.")] = "rest-binary",
    concurrency: Annotated[str, typer.Option(help="Clients at once, one scenario each.")] = "1,4,16,64",
    duration: Annotated[str, typer.Option(help="Measured per scenario, like 10s or 500ms.")] = "10s",
    warmup: Annotated[str, typer.Option(help="Discarded before each scenario.")] = "2s",
    batch: Annotated[str, typer.Option(help="Rows per request, one scenario each.")] = "1",
    inputs: Annotated[
        Path | None, typer.Option(help=".npz with the input's rows; default: generated from metadata.")
    ] = None,
    url: Annotated[
        str | None, typer.Option(help="A running gateway's HTTP URL; default: start one on --model-repo.")
    ] = None,
    grpc_address: Annotated[
        str | None, typer.Option("--grpc", help="Its gRPC host:port; default: the URL's port + 1.")
    ] = None,
    model_repo: Annotated[Path, typer.Option(help="The repository a started gateway serves.")] = Path(
        "model_repo"
    ),
    out: Annotated[Path, typer.Option(help="The report folder.")] = Path("bench-report"),
) -> None:
    """Measure MODEL's deployments one after the other through the gateway; write a report folder."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from gateway.tools.lab import bench as lab
    from gateway.tools.lab.report import ReportError, markdown_table, require_plotting, write_report

    console = Console(stderr=True)
    try:
        if protocol not in lab.PROTOCOLS:
            raise lab.BenchError(f"--protocol must be one of {', '.join(lab.PROTOCOLS)}, not '{protocol}'")
        plan = lab.BenchPlan(
            model=model,
            protocol=protocol,
            concurrency=lab.parse_ints(concurrency, "--concurrency"),
            batch=lab.parse_ints(batch, "--batch"),
            duration_s=lab.parse_duration(duration),
            warmup_s=lab.parse_duration(warmup, "--warmup", allow_zero=True),
            deployments=deployments,
            versions=versions,
            inputs=inputs,
        )
        require_plotting()
        out.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            if url is None:
                console.print(f"starting a gateway on {model_repo} (log: {out / 'gateway.log'})")
                url, grpc_address = stack.enter_context(lab.started_gateway(model_repo, out / "gateway.log"))
            progress = stack.enter_context(
                Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    TimeRemainingColumn(),
                    console=console,
                    transient=True,
                )
            )
            task = progress.add_task("preparing", total=None)

            def show(what: str, seconds: float) -> None:
                progress.reset(task, total=seconds, description=what)
                progress.start_task(task)

            address = lab.grpc_address_for(url, grpc_address)
            result = asyncio.run(_bench_with_ticks(plan, url, address, show, progress, task))
        files = write_report(result, out)
    except (lab.BenchError, ReportError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except (GatewayError, ToolError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    table = Table(title=f"modelyard bench {model} ({protocol})")
    rows = lab.format_table(result)
    for column in rows[0]:
        table.add_column(column, justify="left" if column == "deployment" else "right")
    for row in rows[1:]:
        table.add_row(*row)
    # Wide enough for the table where stdout is not a terminal (a log, a pipe).
    Console(width=None if sys.stdout.isatty() else 140).print(table)
    for line in result.verdicts:
        typer.echo(f"- {line}")
    for diff in result.parity:
        typer.echo(
            f"parity {diff.deployment} vs {diff.reference}: max abs {diff.max_abs:.3e}, "
            f"max rel {diff.max_rel:.3e} ({'within' if diff.within else 'OVER'} tolerance)"
        )
    typer.echo(f"report: {files[0]} ({', '.join(f.name for f in files[1:])})")
    (out / "table.md").write_text(markdown_table(result) + "\n")


async def _bench_with_ticks(
    plan: BenchPlan,
    url: str,
    grpc_address: str,
    show: Callable[[str, float], None],
    progress: rich.progress.Progress,
    task: rich.progress.TaskID,
) -> BenchResult:
    """The bench, with a ticker advancing the progress bar by the clock while each scenario runs."""
    from gateway.tools.lab.bench import run_bench

    async def tick() -> None:
        while True:
            await asyncio.sleep(0.2)
            progress.advance(task, 0.2)

    ticker = asyncio.create_task(tick())
    try:
        return await run_bench(plan, url, grpc_address, show)
    finally:
        ticker.cancel()
