"""The live steps on the CLI: `modelyard migrate shadow | status | promote | report | finish`.

Each is a typer command function over the step of the same name (shadow.py, promote.py,
report.py); the `migrate` sub-app registers them. Exit codes: 0 done (status: PASS), 1 failed or
rolled back (status: FAIL), 2 a step that cannot run as asked (no migration, no gateway, a
bad option), 3 status without enough data yet.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from gateway.tools.errors import ToolError
from gateway.tools.migrate.live import DEFAULT_APPLY_TIMEOUT_S, DEFAULT_GATEWAY
from gateway.tools.migrate.state import DEFAULT_STATE_DIR

PROMOTE_LOGGER = "modelyard.migrate"
# Where the live steps find the gateway when --gateway is not given (default http://127.0.0.1:8000).
GATEWAY_ENV = "MODELYARD_GATEWAY_URL"

Model = Annotated[str, typer.Argument(help="The model being migrated (the source deployment clients call).")]
GatewayUrl = Annotated[
    str, typer.Option("--gateway", envvar=GATEWAY_ENV, help="The running gateway's HTTP address.")
]
ModelRepo = Annotated[Path, typer.Option(help="The model repository the gateway serves.")]
StateDir = Annotated[Path, typer.Option(help="Where the migration's state file is kept.")]
ApplyTimeout = Annotated[
    float, typer.Option(help="Seconds to wait for the gateway to apply a config change.")
]


def _fail(exc: Exception) -> typer.Exit:
    """A step that cannot run as asked: its one line, and exit 2 (as the offline steps)."""
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(2)


def shadow(
    model: Model,
    percent: Annotated[
        float, typer.Option(help="Share of the model's requests copied to the new deployment.")
    ] = 10.0,
    skip_check: Annotated[bool, typer.Option(help="Shadow even though the check did not pass.")] = False,
    gateway: GatewayUrl = DEFAULT_GATEWAY,
    model_repo: ModelRepo = Path("model_repo"),
    state_dir: StateDir = DEFAULT_STATE_DIR,
    apply_timeout_s: ApplyTimeout = DEFAULT_APPLY_TIMEOUT_S,
) -> None:
    """Copy a share of the model's live traffic to the new deployment and compare the answers."""
    from gateway.tools.migrate.shadow import ShadowOptions
    from gateway.tools.migrate.shadow import shadow as run

    try:
        done = run(model, model_repo, state_dir, gateway,
                   ShadowOptions(percent=percent, skip_check=skip_check, apply_timeout_s=apply_timeout_s))  # fmt: skip
    except ToolError as exc:
        raise _fail(exc) from None
    typer.echo(
        f"shadowing {done.percent:g}% of '{model}' to '{done.deployment}' (atol {done.atol:g}, rtol {done.rtol:g}), "
        f"applied by {done.applied.how} in {done.applied.waited_s:g} s; "
        f"`modelyard migrate status {model}` counts from now"
    )


def status(
    model: Model,
    min_agreement: Annotated[
        float, typer.Option(help="Percent of compared answers within the tolerance.")
    ] = 99.9,
    max_errors: Annotated[int, typer.Option(help="Errors of the new deployment allowed.")] = 0,
    max_p99_ratio: Annotated[float, typer.Option(help="The new deployment's p99 over the source's.")] = 1.2,
    min_requests: Annotated[int, typer.Option(help="Compared requests needed for a verdict.")] = 100,
    wait_s: Annotated[
        float,
        typer.Option(help="Keep reading the gateway up to this long while there is not enough data yet."),
    ] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
    gateway: GatewayUrl = DEFAULT_GATEWAY,
    model_repo: ModelRepo = Path("model_repo"),
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """What the shadow compared since it began, and the verdict: exit 0 PASS, 1 FAIL, 3 not enough data."""
    from gateway.tools.migrate.shadow import Criteria, StatusOptions, render
    from gateway.tools.migrate.shadow import status as run

    criteria = Criteria(min_agreement, max_errors, max_p99_ratio, min_requests)
    try:
        result = run(model, model_repo, state_dir, gateway, StatusOptions(criteria=criteria, wait_s=wait_s))
    except ToolError as exc:
        raise _fail(exc) from None
    typer.echo(json.dumps(result.as_json(), indent=2) if as_json else render(result))
    raise typer.Exit(result.exit_code)


def promote(
    model: Model,
    steps: Annotated[
        str, typer.Option(help="The new deployment's share at each step, in percent.")
    ] = "1,10,50,100",
    dwell_s: Annotated[float, typer.Option(help="Seconds each step runs before it is judged.")] = 30.0,
    min_requests_per_step: Annotated[
        int,
        typer.Option(
            help="Answers of the new deployment a step needs to be judged (it waits up to 10x dwell)."
        ),
    ] = 20,
    max_error_rate: Annotated[
        float, typer.Option(help="How far the new deployment's error rate may exceed the source's.")
    ] = 0.01,
    max_p99_ratio: Annotated[
        float,
        typer.Option(
            help="The new deployment's p99 over the source's, at most (p90 in a step of fewer than 100 answers)."
        ),
    ] = 1.2,
    skip_status: Annotated[bool, typer.Option(help="Start without the shadow's PASS.")] = False,
    gateway: GatewayUrl = DEFAULT_GATEWAY,
    model_repo: ModelRepo = Path("model_repo"),
    state_dir: StateDir = DEFAULT_STATE_DIR,
    apply_timeout_s: ApplyTimeout = DEFAULT_APPLY_TIMEOUT_S,
) -> None:
    """Move the model's traffic to the new deployment in steps; roll back by itself on a regression."""
    from gateway.tools.migrate.promote import PromoteOptions, parse_steps
    from gateway.tools.migrate.promote import promote as run

    # The rollback's WARNING line, on stderr: its own handler, whatever the root logger has.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger(PROMOTE_LOGGER)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        options = PromoteOptions(
            steps=parse_steps(steps), dwell_s=dwell_s, min_requests_per_step=min_requests_per_step,
            max_error_rate=max_error_rate, max_p99_ratio=max_p99_ratio, skip_status=skip_status,
            apply_timeout_s=apply_timeout_s,
        )  # fmt: skip
        result = run(model, model_repo, state_dir, gateway, options)
    except ToolError as exc:
        raise _fail(exc) from None
    finally:
        logger.removeHandler(handler)
    for step in result.steps:
        typer.echo(
            f"{step.percent:>5g}%  new: {step.new.requests} answers, {step.new.errors} errors, p99 "
            f"{_ms(step.new.p99_ms)}; source: {step.reference.requests} answers, p99 {_ms(step.reference.p99_ms)}"
            + (f"  REGRESSION: {step.regression}" if step.regression else "")
        )
    typer.echo(result.message, err=result.rolled_back)
    raise typer.Exit(result.exit_code)


def report(
    model: Model,
    out: Annotated[
        Path | None, typer.Option(help="The report's folder (STATE_DIR/MODEL-report by default).")
    ] = None,
    gateway: GatewayUrl = DEFAULT_GATEWAY,
    model_repo: ModelRepo = Path("model_repo"),
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Write the migration's HTML report: check, agreement, latency before and after, step history."""
    from gateway.tools.migrate.report import ReportOptions
    from gateway.tools.migrate.report import report as run

    try:
        result = run(model, model_repo, state_dir, gateway, ReportOptions(out=out))
    except ToolError as exc:
        raise _fail(exc) from None
    typer.echo(str(result.html))


def finish(
    model: Model,
    keep_twin: Annotated[
        bool, typer.Option(help="Keep the new deployment's folder (by default it leaves the repository).")
    ] = False,
    gateway: GatewayUrl = DEFAULT_GATEWAY,
    model_repo: ModelRepo = Path("model_repo"),
    state_dir: StateDir = DEFAULT_STATE_DIR,
    apply_timeout_s: ApplyTimeout = DEFAULT_APPLY_TIMEOUT_S,
) -> None:
    """After promote reached 100%: the model itself moves to the new backend, the old one retires."""
    from gateway.tools.migrate.finish import FinishOptions
    from gateway.tools.migrate.finish import finish as run

    try:
        done = run(model, model_repo, state_dir, gateway,
                   FinishOptions(keep_twin=keep_twin, apply_timeout_s=apply_timeout_s))  # fmt: skip
    except ToolError as exc:
        raise _fail(exc) from None
    versions = ", ".join(str(v) for v in done.versions)
    typer.echo(
        f"'{model}' serves versions {versions} on {done.backend} itself, applied by {done.applied.how} in "
        f"{done.applied.waited_s:g} s; its split and shadow are gone"
        + ("; the new deployment left the repository" if done.twin_removed else "")
    )
    if done.old_files:
        typer.echo(
            f"the old backend's files stay, unused, to delete when you like: {' '.join(done.old_files)}"
        )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} ms"


COMMANDS = (shadow, status, promote, report, finish)
