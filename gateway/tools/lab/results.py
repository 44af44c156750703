"""What `modelyard bench` measured, and what it makes of it: the plan, the rows, the verdicts (one
line each, computed from the rows) and the table the command prints and the report shows."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, slots=True)
class BenchPlan:
    model: str
    protocol: str
    concurrency: tuple[int, ...]
    batch: tuple[int, ...]
    duration_s: float
    warmup_s: float
    deployments: str | None = None
    versions: str | None = None
    inputs: Path | None = None


@dataclass(frozen=True, slots=True)
class Scenario:
    """One measured row: a deployment at one batch size and concurrency."""

    deployment: str
    kind: str
    model: str
    version: int
    protocol: str
    batch: int
    concurrency: int
    requests: int
    req_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: int
    first_error: str | None
    rss_mib: float | None
    rss_process: str | None
    # Cores the bench process kept busy during the scenario (its warm-up included).
    generator_cpu: float
    # Evenly spaced quantiles of the latencies, for the CDF.
    latency_quantiles_ms: list[float] = field(repr=False)
    # Where the gateway's own time went: mean ms per request of each phase (decode, load, queue,
    # batch, backend, encode), from its modelyard_request_phase_seconds over the row; empty where the
    # gateway does not export them (or its /metrics needs a key).
    phases_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ParityRow:
    deployment: str
    reference: str
    output: str
    max_abs: float
    max_rel: float
    within: bool


@dataclass(slots=True)
class BenchResult:
    plan: BenchPlan
    url: str
    machine: dict[str, str]
    # The faster of the no-op runs (before and after the deployments), and both of them.
    ceiling: Scenario
    scenarios: list[Scenario]
    parity: list[ParityRow]
    ceiling_runs: list[Scenario] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)


# --- verdicts ------------------------------------------------------------------------------------


def verdicts(result: BenchResult) -> list[str]:
    """One line each, all computed from the rows: the bottom line, the load generator's ceiling and
    headroom, then one per scenario (batch x concurrency) naming the fastest deployment."""
    lines = [bottom_line(result)]
    ceiling = result.ceiling.req_per_s
    best_overall = max((s.req_per_s for s in result.scenarios), default=0.0)
    if ceiling > 0:
        share = best_overall / ceiling
        runs = " and ".join(f"{run.req_per_s:.0f}" for run in result.ceiling_runs)
        reading = (
            "the backends, not request handling, set the pace."
            if share < 0.5
            else "request handling (the generator's or the gateway's) is part of the limit."
            if share <= 1
            else "the no-op runs were disturbed (they should be the fastest): rerun on a quieter machine."
        )
        lines.append(
            f"Ceiling: the gateway's no-op endpoint takes {ceiling:.0f} req/s at c={result.ceiling.concurrency} "
            f"(runs before and after: {runs}); the fastest deployment reached {share:.0%} of it: {reading}"
        )
    # The no-op row is meant to saturate the generator; the question is whether the others did.
    busiest = max([*result.scenarios] or [result.ceiling], key=lambda s: s.generator_cpu)
    lines.append(
        f"Generator: at most {busiest.generator_cpu:.2f} of a core busy ({busiest.deployment}, "
        f"c={busiest.concurrency}); it runs on one thread, so "
        + ("it had headroom." if busiest.generator_cpu < 0.8 else "it may have been the limit there.")
    )
    for batch in result.plan.batch:
        for clients in result.plan.concurrency:
            rows = [
                s
                for s in result.scenarios
                if s.batch == batch and s.concurrency == clients and s.req_per_s > 0
            ]
            failed = [
                s.deployment
                for s in result.scenarios
                if s.batch == batch and s.concurrency == clients and s.req_per_s == 0
            ]
            where = f"c={clients}, batch {batch}"
            if not rows:
                lines.append(f"{where}: no deployment answered.")
                continue
            best = max(rows, key=lambda s: s.req_per_s)
            line = f"{where}: {best.deployment} is fastest, {best.req_per_s:.0f} req/s at p99 {best.p99_ms:.2f} ms"
            others = [
                f"{best.req_per_s / other.req_per_s:.1f}x {other.deployment} ({_ratio(best.p99_ms, other.p99_ms)})"
                for other in rows
                if other is not best
            ]
            line += (": " + ", ".join(others) + ".") if others else "."
            if failed:
                line += f" No answers from {', '.join(failed)}."
            errored = [f"{s.deployment} ({s.errors})" for s in rows if s.errors]
            if errored:
                line += f" Errors: {', '.join(errored)}."
            lines.append(line)
    return lines


def bottom_line(result: BenchResult) -> str:
    """The run in one line: who is fastest under the most load, and who answers fastest alone."""
    answered = [s for s in result.scenarios if s.req_per_s > 0]
    if not answered:
        return "Bottom line: no deployment answered."
    most = max(s.concurrency for s in answered)
    least = min(s.concurrency for s in answered)
    fastest = max((s for s in answered if s.concurrency == most), key=lambda s: s.req_per_s)
    quickest = min((s for s in answered if s.concurrency == least), key=lambda s: s.p50_ms)
    line = (
        f"Bottom line: most throughput at c={most}: {fastest.deployment} ({fastest.req_per_s:.0f} req/s); "
        f"lowest latency at c={least}: {quickest.deployment} (p50 {quickest.p50_ms:.2f} ms)"
    )
    troubled = sorted({s.deployment for s in result.scenarios if s.errors or s.req_per_s == 0})
    return line + (f"; errors from {', '.join(troubled)}." if troubled else ".")


def _ratio(mine: float, theirs: float) -> str:
    """How `mine` (a p99) compares with `theirs`, in words."""
    if not (mine > 0 and theirs > 0):
        return "an unknown p99"
    ratio = mine / theirs
    if 0.95 <= ratio <= 1.05:
        return "about the same p99"
    return f"a p99 {1 / ratio:.1f}x lower" if ratio < 1 else f"a p99 {ratio:.1f}x higher"


def format_table(result: BenchResult) -> list[list[str]]:
    """The printed and reported table, header first."""
    header = [
        "deployment",
        "batch",
        "c",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "errors",
        "RSS MiB",
        "gen CPU",
    ]
    rows = [header]
    for s in [*result.scenarios, result.ceiling]:
        rows.append(
            [
                s.deployment if s is not result.ceiling else "no-op (generator ceiling)",
                str(s.batch),
                str(s.concurrency),
                f"{s.req_per_s:.0f}",
                _ms(s.p50_ms),
                _ms(s.p90_ms),
                _ms(s.p99_ms),
                str(s.errors),
                "-" if s.rss_mib is None else f"{s.rss_mib:.0f}",
                f"{s.generator_cpu:.2f}",
            ]
        )
    return rows


def _ms(value: float) -> str:
    return "-" if value != value else f"{value:.2f}"  # NaN: no successful request


def phase_means(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, float]:
    """Mean ms per request of each phase between two readings; phases no request went through
    in between (a load, a batch wait) are left out."""
    means = {}
    for phase, (seconds, count) in after.items():
        seconds_before, count_before = before.get(phase, (0.0, 0.0))
        if count > count_before:
            means[phase] = round((seconds - seconds_before) / (count - count_before) * 1000, 4)
    return means
