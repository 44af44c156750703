"""`migrate shadow`: the running gateway copies a share of the model's live traffic to the new
deployment and compares the answers; `migrate status`: the verdict on what it compared since.

Shadow writes one entry of the source's config.yaml (`shadow: [{model: NEW, percent, atol, rtol}]`,
the tolerance the check used), gets the gateway to apply it without a restart, and keeps a
snapshot of the gateway's counters in the migration's state: status counts from there.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gateway.tools.migrate import config_edit, state
from gateway.tools.migrate.figures import ShadowFigures, Side, Snapshot, shadow_figures
from gateway.tools.migrate.live import DEFAULT_APPLY_TIMEOUT_S, Applied, Gateway, ready, shadow_applied
from gateway.tools.migrate.state import Migration, MigrationError

# ShadowTarget's defaults (gateway/config.py), where the check recorded no tolerance.
DEFAULT_ATOL = 1e-5
DEFAULT_RTOL = 1e-4

PASS, FAIL, NOT_ENOUGH_DATA = "PASS", "FAIL", "NOT ENOUGH DATA"
# How often status --wait-s reads the gateway's counters again.
WAIT_POLL_S = 2.0


@dataclass(frozen=True, slots=True)
class ShadowOptions:
    percent: float = 10.0
    skip_check: bool = False
    # The tolerance: the check's when None.
    atol: float | None = None
    rtol: float | None = None
    apply_timeout_s: float = DEFAULT_APPLY_TIMEOUT_S
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ShadowResult:
    model: str
    deployment: str
    percent: float
    atol: float
    rtol: float
    config: Path
    applied: Applied


def check_tolerance(migration: Migration, skip_check: bool) -> tuple[float, float]:
    """The tolerance the check passed at; refuses a migration whose check did not pass."""
    check = migration.steps.get("check") or {}
    if not check.get("ok") and not skip_check:
        said = "failed" if check else "has not run"
        raise MigrationError(
            f"the check of '{migration.deployment}' against '{migration.model}' {said}: run "
            f"`modelyard migrate check {migration.model}` until it passes, or shadow it anyway with --skip-check"
        )
    return float(check.get("atol", DEFAULT_ATOL)), float(check.get("rtol", DEFAULT_RTOL))


def shadow(
    model: str, model_repo: Path, state_dir: Path, gateway_url: str, options: ShadowOptions
) -> ShadowResult:
    migration = state.load(state_dir, model)
    atol, rtol = check_tolerance(migration, options.skip_check)
    atol = options.atol if options.atol is not None else atol
    rtol = options.rtol if options.rtol is not None else rtol
    if not 0 < options.percent <= 100:
        raise MigrationError(f"--percent is a share of traffic from above 0 to 100, not {options.percent:g}")
    new = migration.deployment
    with Gateway(gateway_url, headers=options.headers) as gateway:
        if not ready(gateway.model(new)):
            gateway.apply(new, ready, "the new deployment's load", options.apply_timeout_s)
        path = config_edit.set_shadow(model_repo, model, new, options.percent, atol, rtol)
        applied = gateway.apply(
            model, shadow_applied(new, options.percent), f"the shadow to '{new}'", options.apply_timeout_s
        )
        baseline = gateway.snapshot(model, new)
    migration.steps["shadow"] = {
        "percent": options.percent, "atol": atol, "rtol": rtol, "config": str(path),
        "applied_by": applied.how, "baseline": baseline.as_json(), "skipped_check": options.skip_check,
    }  # fmt: skip
    migration.record("shadow", f"shadowing {options.percent:g}% to '{new}'", applied_by=applied.how)
    state.save(state_dir, migration)
    return ShadowResult(model, new, options.percent, atol, rtol, path, applied)


@dataclass(frozen=True, slots=True)
class Criteria:
    """What status passes: stated up front, printed with every verdict."""

    min_agreement: float = 99.9  # percent of the compared answers within the tolerance
    max_errors: int = 0
    max_p99_ratio: float = 1.2  # the new deployment's p99 over the source's
    min_requests: int = 100


@dataclass(frozen=True, slots=True)
class StatusOptions:
    criteria: Criteria = Criteria()
    headers: dict[str, str] = field(default_factory=dict)
    # Seconds to keep reading the gateway while the verdict is NOT ENOUGH DATA; 0: read it once.
    wait_s: float = 0.0
    # Keep the verdict in the migration's state (promote reads it); off for a look that changes nothing.
    save: bool = True


@dataclass(frozen=True, slots=True)
class StatusResult:
    model: str
    deployment: str
    since: float  # unix time of the shadow's baseline
    figures: ShadowFigures
    criteria: Criteria
    verdict: str
    # Each failed criterion (FAIL) or what is missing (NOT ENOUGH DATA), in words.
    reasons: list[str]

    @property
    def p99_ratio(self) -> float | None:
        return p99_ratio(self.figures.new, self.figures.source)

    def as_json(self) -> dict[str, Any]:
        figures = asdict(self.figures)
        figures["agreement"] = self.figures.agreement
        figures["errors"] = self.figures.errors
        return {
            "model": self.model, "deployment": self.deployment, "since": self.since,
            "figures": figures, "p99_ratio": self.p99_ratio, "criteria": asdict(self.criteria),
            "verdict": self.verdict, "reasons": self.reasons,
        }  # fmt: skip

    @property
    def exit_code(self) -> int:
        return {PASS: 0, FAIL: 1}.get(self.verdict, 3)


def p99_ratio(new: Side, source: Side) -> float | None:
    if new.p99_ms is None or source.p99_ms is None or source.p99_ms <= 0:
        return None
    return new.p99_ms / source.p99_ms


def judge(figures: ShadowFigures, criteria: Criteria) -> tuple[str, list[str]]:
    """The verdict: errors fail at once, and so do mismatches that no number of matches up to
    min_requests could make up for; below min_requests nothing else is judged."""
    failed: list[str] = []
    if figures.errors > criteria.max_errors:
        failed.append(
            f"errors: {figures.errors} (shadow {figures.shadow_errors}, answers {figures.new_errors}) "
            f"> {criteria.max_errors}"
        )
    if figures.compared < criteria.min_requests:
        # Mismatches so many that even all matches up to min_requests could not pass: decided now.
        judged = figures.matches + figures.mismatches
        best = (figures.matches + criteria.min_requests - judged) / criteria.min_requests
        if judged and best * 100 < criteria.min_agreement:
            failed.append(
                f"agreement: {figures.agreement * 100 if figures.agreement is not None else 0:.3f}% of "
                f"{judged} judged, short of {criteria.min_agreement:g}% even if the next "
                f"{criteria.min_requests - judged} all matched"
            )
        if failed:
            return FAIL, failed
        return NOT_ENOUGH_DATA, [f"requests compared: {figures.compared} < {criteria.min_requests}"]
    agreement = figures.agreement
    if agreement is None or agreement * 100 < criteria.min_agreement:
        shown = "none judged" if agreement is None else f"{agreement * 100:.3f}%"
        failed.append(f"agreement: {shown} < {criteria.min_agreement:g}%")
    ratio = p99_ratio(figures.new, figures.source)
    if ratio is None:
        if not failed:
            return NOT_ENOUGH_DATA, ["p99 latency: not measured on both sides yet"]
    elif ratio > criteria.max_p99_ratio:
        failed.append(
            f"p99 latency: {figures.new.p99_ms:.3f} ms vs {figures.source.p99_ms:.3f} ms, "
            f"{ratio:.2f}x > {criteria.max_p99_ratio:g}x"
        )
    return (FAIL, failed) if failed else (PASS, [])


def status(
    model: str, model_repo: Path, state_dir: Path, gateway_url: str, options: StatusOptions
) -> StatusResult:
    migration = state.load(state_dir, model)
    shadowing = migration.steps.get("shadow")
    if not shadowing:
        raise MigrationError(
            f"'{migration.deployment}' has not been shadowed yet: run `modelyard migrate shadow {model}` first"
        )
    if (migration.steps.get("promote") or {}).get("done"):
        # Reading on would count answers the shadow never compared, over its verdict in the record.
        raise MigrationError(
            f"the shadow of '{model}' to '{migration.deployment}' ended when promote reached 100%: its "
            f"last verdict stays in the record, and `modelyard migrate report {model}` shows it"
        )
    baseline = Snapshot.from_json(shadowing["baseline"])
    deadline = time.monotonic() + options.wait_s
    with Gateway(gateway_url, headers=options.headers) as gateway:
        while True:
            now = gateway.snapshot(model, migration.deployment)
            figures = shadow_figures(baseline, now, model, migration.deployment)
            verdict, reasons = judge(figures, options.criteria)
            if verdict != NOT_ENOUGH_DATA or time.monotonic() >= deadline:
                break
            time.sleep(min(WAIT_POLL_S, max(0.0, deadline - time.monotonic())))
    result = StatusResult(
        model, migration.deployment, baseline.taken_at, figures, options.criteria, verdict, reasons
    )
    if options.save:
        migration.steps["status"] = {**result.as_json(), "at": time.time()}
        migration.record("status", verdict, reasons=reasons, compared=figures.compared)
        state.save(state_dir, migration)
    return result


def render(result: StatusResult) -> str:
    """Plain aligned text: the criteria, the figures, and the verdict last."""
    f, c = result.figures, result.criteria
    agreement = "-" if f.agreement is None else f"{f.agreement * 100:.3f}%"
    worst = "-" if f.max_abs_diff is None else f"{f.max_abs_diff:.3g}"
    if f.max_abs_diff_from == "histogram" and f.max_abs_diff is not None:
        worst += " (at most: the highest bucket of the difference histogram)"
    ratio = result.p99_ratio
    rows = [
        ("model", f"{result.model} -> {result.deployment}"),
        ("since", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(result.since))),
        ("criteria", f"agreement >= {c.min_agreement:g}%, errors <= {c.max_errors}, "
                     f"p99 <= {c.max_p99_ratio:g}x, at least {c.min_requests} compared"),
        ("requests compared", str(f.compared)),
        ("agreement", agreement),
        ("mismatches", str(f.mismatches)),
        ("errors", f"{f.errors} (shadow {f.shadow_errors}, answers {f.new_errors}; dropped copies {f.dropped})"),
        ("max abs diff", worst),
        ("p99 abs diff", "-" if f.p99_abs_diff is None else f"{f.p99_abs_diff:.3g}"),
        ("latency source", _latency(f.source)),
        ("latency new", _latency(f.new)),
        ("p99 ratio", "-" if ratio is None else f"{ratio:.2f}x"),
        ("verdict", result.verdict + (": " + "; ".join(result.reasons) if result.reasons else "")),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _latency(side: Side) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f} ms"

    return f"p50 {ms(side.p50_ms)}, p99 {ms(side.p99_ms)} ({side.requests} requests)"
