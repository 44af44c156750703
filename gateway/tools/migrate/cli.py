"""`modelyard migrate`: its steps as commands (`migrate STEP MODEL ...`), and `migrate MODEL --to X`,
which runs convert then check.

Each step imports its tool when it runs, so the CLI loads no framework until one is needed. Exit
status: 2 for a step that cannot run as asked (the message names what to do), 1 for a check that
refused the conversion or a model that did not load.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from gateway.errors import GatewayError
from gateway.tools.errors import ToolError
from gateway.tools.migrate.state import DEFAULT_STATE_DIR
from gateway.tools.parity import DEFAULT_ATOL, DEFAULT_BATCH, DEFAULT_RTOL

# The command `migrate MODEL --to X` stands for.
DEFAULT_STEP = "run"

# The options every step takes, for the steps' signatures.
ModelArg = Annotated[str, typer.Argument(help="The source model: the deployment clients call now.")]
ModelRepo = Annotated[Path, typer.Option(help="The model repository.")]
StateDir = Annotated[Path, typer.Option(help="Where the migration's record is kept.")]
To = Annotated[str, typer.Option(help="onnxruntime, litert, tensorflow or keras.")]
Name = Annotated[
    str | None,
    typer.Option(help="The new deployment's model name; default MODEL_onnx (_litert, _tf, _keras)."),
]
Force = Annotated[bool, typer.Option(help="Replace the new deployment when it exists already.")]
InputsFile = Annotated[Path | None, typer.Option(help=".npz of one request's inputs, keyed by input name.")]
Recorded = Annotated[bool, typer.Option(help="Check on the requests the gateway recorded for MODEL.")]
RecordDir = Annotated[Path, typer.Option(help="The gateway's --record-dir.")]
Atol = Annotated[float, typer.Option(help="Absolute tolerance.")]
Rtol = Annotated[float, typer.Option(help="Relative tolerance, against the source's output.")]
Batch = Annotated[int, typer.Option(help="Rows of generated inputs (the size of -1 dimensions).")]


class StepGroup(TyperGroup):
    """`migrate STEP ...`, or `migrate MODEL ...` for the default step: a first word that is no
    step's name is taken as a model."""

    # Loosely typed: newer typer releases vendor click as typer._click, older ones use click's own.
    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            if len(args) > 1 and not args[1].startswith("-"):
                # `migrate WORD MODEL`: WORD was meant as a step.
                steps = [name for name, command in self.commands.items() if not command.hidden]
                close = difflib.get_close_matches(args[0], steps, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                typer.echo(
                    f"error: '{args[0]}' is no step of modelyard migrate{hint}; the steps are "
                    f"{', '.join(steps)}: write `modelyard migrate STEP MODEL`, or `modelyard migrate MODEL --to X`",
                    err=True,
                )
                raise typer.Exit(2)
            args = [DEFAULT_STEP, *args]
        return super().resolve_command(ctx, args)


migrate = typer.Typer(
    cls=StepGroup,
    name="migrate",
    no_args_is_help=True,
    help="Move a model to another framework without touching its clients: "
    "`modelyard migrate MODEL --to onnxruntime` converts then checks; each step also runs on its own.",
)


@contextlib.contextmanager
def reported() -> Iterator[None]:
    """A step's failure as `error: ...` and its exit status, without a traceback."""
    from gateway.tools.migrate.check import CheckRefused

    logging.basicConfig(level=logging.CRITICAL)
    try:
        yield
    except CheckRefused as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except ToolError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except GatewayError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@migrate.command()
def convert(
    model: ModelArg,
    to: To,
    name: Name = None,
    force: Force = False,
    model_repo: ModelRepo = Path("model_repo"),
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Write every version of MODEL on another backend, as a new model beside it (`twin_of` MODEL)."""
    with reported():
        _convert(model, to, name, force, model_repo, state_dir)


def _convert(model: str, to: str, name: str | None, force: bool, model_repo: Path, state_dir: Path) -> None:
    from gateway.tools.migrate import convert as conversion

    result = conversion.convert_model(model_repo, model, to, name, force)
    conversion.record_convert(state_dir, model_repo, result)
    typer.echo(
        f"{'replaced' if result.replaced else 'wrote'} {result.folder}: {model} ({result.source_backend}) "
        f"as {result.deployment} ({result.to}), versions {', '.join(map(str, result.versions))}"
    )


@migrate.command()
def check(
    model: ModelArg,
    inputs: InputsFile = None,
    recorded: Recorded = False,
    record_dir: RecordDir = Path(".modelyard/recorded"),
    atol: Atol = DEFAULT_ATOL,
    rtol: Rtol = DEFAULT_RTOL,
    batch: Batch = DEFAULT_BATCH,
    model_repo: ModelRepo = Path("model_repo"),
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Parity of every converted version with its source; exit 1 when an output differs over the tolerance."""
    with reported():
        _check(model, inputs, recorded, record_dir, atol, rtol, batch, model_repo, state_dir)


def _check(
    model: str,
    inputs: Path | None,
    recorded: bool,
    record_dir: Path,
    atol: float,
    rtol: float,
    batch: int,
    model_repo: Path,
    state_dir: Path,
) -> None:
    from gateway.tools.migrate import check as checking
    from gateway.tools.migrate import state

    migration = state.load(state_dir, model)
    if "convert" not in migration.steps:
        raise state.MigrationError(
            f"model '{model}' has no conversion to check: run `modelyard migrate convert {model} --to X` first"
        )
    given = checking.gather_inputs(model, inputs, recorded, record_dir, batch)
    # An in-process TensorFlow, Keras or LiteRT side imports its framework through the adapters'
    # quiet import, which filters the native start-up lines itself (a filter held here too would
    # hold its lock across the loaders' threads).
    result = asyncio.run(checking.run_check(model_repo, migration, given, atol, rtol, batch))
    checking.record_check(state_dir, migration, result)
    lines = result.lines()
    for line in lines[:-1]:
        typer.echo(line)
    if not result.ok:
        raise checking.CheckRefused(lines[-1])
    typer.echo(lines[-1])


@migrate.command(DEFAULT_STEP, hidden=True)
def run(
    ctx: typer.Context,
    model: ModelArg,
    to: Annotated[str | None, typer.Option(help="onnxruntime, litert, tensorflow or keras.")] = None,
    name: Name = None,
    force: Force = False,
    inputs: InputsFile = None,
    recorded: Recorded = False,
    record_dir: RecordDir = Path(".modelyard/recorded"),
    atol: Atol = DEFAULT_ATOL,
    rtol: Rtol = DEFAULT_RTOL,
    batch: Batch = DEFAULT_BATCH,
    model_repo: ModelRepo = Path("model_repo"),
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Convert MODEL, then check the new deployment against it."""
    with reported():
        if not (model_repo / model).is_dir():
            group = ctx.parent.command if ctx.parent is not None else None
            commands = group.commands if isinstance(group, TyperGroup) else {}
            steps = [name for name, command in commands.items() if not command.hidden]
            raise ToolError(
                f"'{model}' is neither a step of modelyard migrate ({', '.join(steps)}) nor a model in "
                f"{model_repo}: write `modelyard migrate STEP MODEL` or `modelyard migrate MODEL --to X` "
                "(and --model-repo where the model is)"
            )
        if to is None:
            raise ToolError(
                f"give the backend to move '{model}' to: --to onnxruntime, litert, tensorflow or keras"
            )
        _convert(model, to, name, force, model_repo, state_dir)
        _check(model, inputs, recorded, record_dir, atol, rtol, batch, model_repo, state_dir)


def _add_live_steps() -> None:
    """The steps against a running gateway (live_commands.py), after convert and check."""
    from gateway.tools.migrate import live_commands

    for step in live_commands.COMMANDS:
        migrate.command()(step)


_add_live_steps()
