"""`migrate promote`: the source's `split` moves its traffic to the new deployment in steps, each
one watched for a dwell and judged against the source; a regression rolls the split back by itself.

Each step writes `split: {NEW: percent}`, waits until the gateway applies it, lets traffic run for
the dwell (longer, up to max_dwell_s, until the new deployment answered min_requests_per_step),
and compares the two deployments' answers to clients (shadow copies are left out) over that
window: the new one's error rate may exceed the source's by at most max_error_rate, and its p99
may be at most max_p99_ratio times the source's (at 100% the source answers nobody, so the last
step's source figures stand in). A step in which the new deployment answered fewer than
P99_MIN_ANSWERS requests compares the two p90s instead: in so few answers the 99th percentile is
the slowest one, and one slow answer (a collection, a preempted run) would roll back a good
deployment, while a real slowdown moves the p90 as well. A regression writes the split of the last good step back (none,
for the first), counts the rollback and stops. At 100% the shadow entry goes; the split stays.
Run again, it goes on from the split the config states.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.tools.migrate import config_edit, state
from gateway.tools.migrate.figures import Side, is_client, side
from gateway.tools.migrate.live import DEFAULT_APPLY_TIMEOUT_S, Gateway, shadow_applied, split_applied
from gateway.tools.migrate.shadow import PASS, StatusOptions, status
from gateway.tools.migrate.state import Migration, MigrationError

log = logging.getLogger("modelyard.migrate")

DEFAULT_STEPS = (1.0, 10.0, 50.0, 100.0)
# The fewest answers whose 99th percentile is not simply the slowest answer.
P99_MIN_ANSWERS = 100


@dataclass(frozen=True, slots=True)
class PromoteOptions:
    steps: tuple[float, ...] = DEFAULT_STEPS
    dwell_s: float = 30.0
    min_requests_per_step: int = 20
    # A step that has not seen min_requests_per_step answers by then is not judged: the split
    # goes back to the last good step (not counted as a rollback).
    max_dwell_s: float | None = None  # 10 x dwell_s when None
    max_error_rate: float = 0.01
    max_p99_ratio: float = 1.2
    # The shadow's verdict that must pass before the first step (with these criteria).
    status: StatusOptions = field(default_factory=StatusOptions)
    skip_status: bool = False
    apply_timeout_s: float = DEFAULT_APPLY_TIMEOUT_S
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StepResult:
    percent: float
    new: Side
    source: Side
    # The source figures the new deployment was held to (the previous step's where the source
    # answered too few).
    reference: Side
    regression: str | None

    def as_json(self) -> dict[str, Any]:
        def part(s: Side) -> dict[str, Any]:
            return {"requests": s.requests, "errors": s.errors, "p50_ms": s.p50_ms, "p90_ms": s.p90_ms,
                    "p99_ms": s.p99_ms}  # fmt: skip

        return {"percent": self.percent, "new": part(self.new), "source": part(self.source),
                "reference": part(self.reference), "regression": self.regression}  # fmt: skip


@dataclass(frozen=True, slots=True)
class PromoteResult:
    model: str
    deployment: str
    split: float  # the share the new deployment has now
    steps: list[StepResult]
    rolled_back: bool
    message: str

    @property
    def done(self) -> bool:
        return self.split >= 100 and not self.rolled_back

    @property
    def exit_code(self) -> int:
        return 0 if not self.rolled_back else 1


def parse_steps(text: str) -> tuple[float, ...]:
    """ "1,10,50,100" -> (1.0, 10.0, 50.0, 100.0): increasing, above 0, ending at most at 100."""
    try:
        steps = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise MigrationError(f"--steps is a list of percents like 1,10,50,100, not '{text}'") from exc
    if not steps or any(b <= a for a, b in itertools.pairwise(steps)) or steps[0] <= 0 or steps[-1] > 100:
        raise MigrationError(
            f"--steps must increase from above 0 to at most 100, like 1,10,50,100, not '{text}'"
        )
    return steps


def _require_pass(
    model: str, model_repo: Path, state_dir: Path, gateway_url: str, options: PromoteOptions
) -> None:
    verdict = status(model, model_repo, state_dir, gateway_url, options.status)
    if verdict.verdict != PASS:
        raise MigrationError(
            f"the shadow's verdict on '{verdict.deployment}' is {verdict.verdict}"
            + (f" ({'; '.join(verdict.reasons)})" if verdict.reasons else "")
            + f": promote moves traffic only after `modelyard migrate status {model}` passes "
            "(let the shadow run longer, or fix the new deployment; --skip-status overrides it)"
        )


def promote(
    model: str, model_repo: Path, state_dir: Path, gateway_url: str, options: PromoteOptions
) -> PromoteResult:
    migration = state.load(state_dir, model)
    new = migration.deployment
    current = config_edit.read_split(model_repo, model).get(new, 0.0)
    remaining = [p for p in options.steps if p > current]
    if current == 0 and not options.skip_status:
        _require_pass(model, model_repo, state_dir, gateway_url, options)
        migration = state.load(state_dir, model)  # status recorded its verdict
    judged: list[StepResult] = []
    previous_source: Side | None = _last_source(migration)
    max_dwell = options.max_dwell_s if options.max_dwell_s is not None else 10 * options.dwell_s
    with Gateway(gateway_url, headers=options.headers) as gateway:
        last_good = current
        for percent in remaining:
            config_edit.set_split(model_repo, model, new, percent)
            gateway.apply(model, split_applied(new, percent), f"the split of {percent:g}% to '{new}'",
                          options.apply_timeout_s)  # fmt: skip
            migration.record("promote", f"split {percent:g}% to '{new}'")
            state.save(state_dir, migration)
            step = _watch(gateway, model, new, percent, options, max_dwell, previous_source)
            judged.append(step)
            migration.record("promote", f"step {percent:g}% judged", **step.as_json())
            if step.regression is not None:
                return _roll_back(gateway, migration, model_repo, state_dir, step, last_good, judged, options)
            last_good = percent
            if step.source.requests >= options.min_requests_per_step:
                previous_source = step.source
            migration.steps["promote"] = {"split": percent, "steps": [s.as_json() for s in judged]}
            state.save(state_dir, migration)
        if last_good >= 100:
            config_edit.remove_shadow(model_repo, model, new)
            gateway.apply(model, shadow_applied(new, None), f"the end of the shadow to '{new}'",
                          options.apply_timeout_s)  # fmt: skip
            migration.record("promote", f"'{new}' answers all of '{model}'; the shadow is removed")
    message = f"'{new}' answers {last_good:g}% of '{model}'" + (
        f"; the shadow is removed. Clients still call '{model}'. Its own versions stay loaded: they "
        f"answer if '{new}' cannot, and setting the split back to 0 rolls back at once"
        if last_good >= 100
        else ""
    )
    migration.steps["promote"] = {
        "split": last_good,
        "steps": [s.as_json() for s in judged],
        "done": last_good >= 100,
    }
    state.save(state_dir, migration)
    return PromoteResult(model, new, last_good, judged, False, message)


def _last_source(migration: Migration) -> Side | None:
    for event in reversed(migration.history):
        source = event.get("source") if event.get("step") == "promote" else None
        if source and source.get("requests"):
            return Side(
                source["requests"], source["errors"], source["p50_ms"], source["p99_ms"], source.get("p90_ms")
            )
    return None


def _watch(
    gateway: Gateway,
    model: str,
    new: str,
    percent: float,
    options: PromoteOptions,
    max_dwell_s: float,
    previous_source: Side | None,
) -> StepResult:
    before = gateway.snapshot(model, new)
    started = time.monotonic()
    time.sleep(options.dwell_s)
    while True:
        after = gateway.snapshot(model, new)
        new_side = side(before, after, new, is_client)
        source = side(before, after, model, is_client)
        if new_side.requests >= options.min_requests_per_step or time.monotonic() - started >= max_dwell_s:
            break
        time.sleep(min(1.0, options.dwell_s))
    reference = (
        source
        if source.requests >= options.min_requests_per_step or previous_source is None
        else previous_source
    )
    return StepResult(percent, new_side, source, reference, _regression(new_side, reference, options))


def _regression(new: Side, reference: Side, options: PromoteOptions) -> str | None:
    if new.requests < options.min_requests_per_step:
        return (
            f"not enough traffic: '{new}' answered {new.requests} requests, fewer than "
            f"--min-requests-per-step {options.min_requests_per_step}"
        )
    if new.error_rate > reference.error_rate + options.max_error_rate:
        return (
            f"error rate {new.error_rate:.2%} ({new.errors} of {new.requests}) vs the source's "
            f"{reference.error_rate:.2%}, more than --max-error-rate {options.max_error_rate:g} above it"
        )
    few = new.requests < P99_MIN_ANSWERS
    tail, ours, theirs = (
        ("p90", new.p90_ms, reference.p90_ms) if few else ("p99", new.p99_ms, reference.p99_ms)
    )
    if ours is not None and theirs is not None and theirs > 0:
        ratio = ours / theirs
        if ratio > options.max_p99_ratio:
            why = (
                f" (the step saw {new.requests} answers, fewer than {P99_MIN_ANSWERS}: p90 stands in for p99)"
            )
            return (
                f"{tail} latency {ours:.3f} ms vs the source's {theirs:.3f} ms, "
                f"{ratio:.2f}x > --max-p99-ratio {options.max_p99_ratio:g}{why if few else ''}"
            )
    return None


def _roll_back(
    gateway: Gateway,
    migration: Migration,
    model_repo: Path,
    state_dir: Path,
    step: StepResult,
    last_good: float,
    judged: list[StepResult],
    options: PromoteOptions,
) -> PromoteResult:
    model, new = migration.model, migration.deployment
    config_edit.set_split(model_repo, model, new, last_good)
    gateway.apply(model, split_applied(new, last_good), f"the rollback of the split to {last_good:g}%",
                  options.apply_timeout_s)  # fmt: skip
    unjudged = step.regression is not None and step.regression.startswith("not enough traffic")
    if not unjudged:
        migration.rollbacks += 1
    event = "step not judged, split restored" if unjudged else "rollback"
    migration.record("promote", event, **{"from": step.percent, "to": last_good, "figure": step.regression})
    log.warning(
        "%s of model '%s': split to '%s' back from %g%% to %g%%: %s",
        event, model, new, step.percent, last_good, step.regression,
    )  # fmt: skip
    migration.steps["promote"] = {"split": last_good, "steps": [s.as_json() for s in judged], "done": False}
    state.save(state_dir, migration)
    advice = (
        "send more traffic, or give a longer --dwell-s or a lower --min-requests-per-step"
        if unjudged
        else f"find why '{new}' regressed (its config, its backend, the machine), fix it, and run "
        f"`modelyard migrate promote {model}` again: it goes on from {last_good:g}%"
    )
    message = (
        f"{'stopped' if unjudged else 'rolled back'} at the {step.percent:g}% step: {step.regression}; "
        f"'{new}' is back to {last_good:g}% of '{model}'; {advice}"
    )
    return PromoteResult(model, new, last_good, judged, True, message)
