"""The hot path's goals, as one table, and their verdicts computed from one peers run's rows.

Every goal is a ratio or a difference between rows of the same run, so it holds on a noisy
machine as well as the rows themselves do. A verdict is met, not met (with the numbers), or not
measured (a row it needs is missing). A row with errors, or whose answer failed its check, counts
as not met.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from drive import MODEL, Row

# Target names the verdicts look for; peers.py names its rows with these.
# The gateway as it starts by default: its gRPC on the native gRPC server (TLS off).
MODELYARD = "modelyard"
# The gateway on grpcio's gRPC server (MODELYARD_GRPC_SERVER=grpcio, what it runs with TLS on): gRPC
# rows only, with verdicts of their own for the gRPC goals.
MODELYARD_GRPCIO = "modelyard (grpcio)"
CANNED = "canned answer"
# The canned answer on the native gRPC server's stack: the floor of the default gateway's gRPC rows.
CANNED_NATIVE = "canned answer (native gRPC)"
MLSERVER = "MLServer"
KSERVE = "KServe"
INPROCESS = "onnxruntime"
PEERS = (
    MLSERVER,
    KSERVE,
)  # MLServer in its best setting for one core; its default-setting row is not a peer here
# The heavy MLP's deployments in the heavy scenario's repository.
HEAVY = "heavy"  # batching off
HEAVY_BATCHED_C8 = "heavy_batched8"  # batching sized for 8 clients
HEAVY_BATCHED = "heavy_batched"  # benchmarks/batching.py's batching config, sized for 16 clients
OK_CHECKS = ("ok", "every 10th")


@dataclass(frozen=True)
class Goal:
    key: str
    text: str
    threshold: float


GOALS = (
    Goal("a", "mlp c=8, gRPC req/s >= {t}x the faster of MLServer (best setting) and KServe", 2.5),
    Goal("b", "mlp c=8, REST JSON req/s >= {t}x the faster of MLServer (best setting) and KServe", 3.0),
    Goal("c", "mlp c=8, p99 <= {t} of the better peer's p99, on each protocol", 0.5),
    Goal("d-rest", "mlp c=1, p50 <= the canned answer's p50 + {t} ms over REST", 0.15),
    Goal("d-grpc", "mlp c=1, p50 <= the canned answer's p50 + {t} ms over gRPC", 0.25),
    Goal("e", "heavy c=8, gRPC and REST binary req/s >= {t} of the in-process batch-1 limit", 0.8),
    Goal("f", "heavy c=8 with dynamic batching, req/s >= {t}x the in-process batch-1 limit", 1.5),
    Goal("g", "heavy c=16 over gRPC, batching on >= {t}x batching off", 2.5),
)
THRESHOLD = {goal.key: goal.threshold for goal in GOALS}


@dataclass(frozen=True)
class Verdict:
    goal: str
    subject: str
    met: bool | None  # None: not measured
    detail: str

    def line(self) -> str:
        state = {True: "met", False: "NOT met", None: "not measured"}[self.met]
        return f"- ({self.goal}) {self.subject}: {self.detail}: **{state}**"


def find(
    rows: Sequence[Row],
    target: str | None,
    protocol: str,
    concurrency: int,
    batch: int = 1,
    model: str = MODEL,
) -> Row | None:
    return next(
        (
            r
            for r in rows
            if (target is None or r.target == target)
            and r.protocol == protocol
            and r.concurrency == concurrency
            and r.batch == batch
            and r.model == model
        ),
        None,
    )


def _fault(*rows: Row) -> str | None:
    """Why a row cannot stand behind a verdict, or None."""
    for row in rows:
        if row.errors:
            return f"{row.target} {row.protocol} c={row.concurrency} had {row.errors} errors"
        if row.check not in OK_CHECKS:
            return f"{row.target} {row.protocol} c={row.concurrency}: check {row.check}"
    return None


def _missing(goal: str, subject: str, what: str) -> Verdict:
    return Verdict(goal, subject, None, f"no {what} row in this run")


def _at_least(goal: str, subject: str, value: float, bound: float, detail: str, *rows: Row) -> Verdict:
    fault = _fault(*rows)
    if fault is not None:
        return Verdict(goal, subject, False, f"{detail}; {fault}")
    return Verdict(goal, subject, not math.isnan(value) and value >= bound, detail)


def _subject(text: str, target: str) -> str:
    return text if target == MODELYARD else f"{text} [{target}]"


def _peer_throughput(rows: Sequence[Row], key: str, protocol: str, target: str = MODELYARD) -> Verdict:
    subject = _subject(f"mlp c=8 {protocol}", target)
    ours = find(rows, target, protocol, 8)
    peers = [row for name in PEERS if (row := find(rows, name, protocol, 8)) is not None]
    if ours is None or not peers:
        return _missing(key, subject, f"{target} or peer {protocol} c=8")
    best = max(peers, key=lambda row: row.req_per_s)
    speedup = ours.req_per_s / best.req_per_s if best.req_per_s else math.nan
    t = THRESHOLD[key]
    detail = (
        f"{target} {ours.req_per_s:.0f} req/s vs {best.target} {best.req_per_s:.0f} req/s "
        f"(the faster peer) = {speedup:.2f}x (goal >= {t:g}x)"
    )
    return _at_least(key, subject, speedup, t, detail, ours, best)


def _peer_p99(rows: Sequence[Row], protocol: str, target: str = MODELYARD) -> Verdict:
    subject = _subject(f"mlp c=8 {protocol} p99", target)
    ours = find(rows, target, protocol, 8)
    peers = [row for name in PEERS if (row := find(rows, name, protocol, 8)) is not None]
    if ours is None or not peers:
        return _missing("c", subject, f"{target} or peer {protocol} c=8")
    best = min(peers, key=lambda row: row.p99_ms)
    share = ours.p99_ms / best.p99_ms if best.p99_ms else math.nan
    t = THRESHOLD["c"]
    detail = (
        f"{target} {ours.p99_ms:.2f} ms vs {best.target} {best.p99_ms:.2f} ms (the better peer) "
        f"= {share:.2f} of it (goal <= {t:g})"
    )
    fault = _fault(ours, best)
    if fault is not None:
        return Verdict("c", subject, False, f"{detail}; {fault}")
    return Verdict("c", subject, not math.isnan(share) and share <= t, detail)


def floor_of(target: str, protocol: str) -> str:
    """The canned answer on the same stack as `target`'s rows of `protocol`."""
    return CANNED_NATIVE if target == MODELYARD and protocol == "gRPC" else CANNED


def _overhead(rows: Sequence[Row], key: str, protocol: str, target: str = MODELYARD) -> Verdict:
    subject = _subject(f"mlp c=1 {protocol} p50 over the canned answer", target)
    floor_target = floor_of(target, protocol)
    ours, floor = find(rows, target, protocol, 1), find(rows, floor_target, protocol, 1)
    if ours is None or floor is None:
        return _missing(key, subject, f"{target} or {floor_target} {protocol} c=1")
    added = ours.p50_ms - floor.p50_ms
    t = THRESHOLD[key]
    detail = (
        f"{target} {ours.p50_ms:.3f} ms vs {floor_target} {floor.p50_ms:.3f} ms = +{added:.3f} ms "
        f"(goal <= +{t:g} ms)"
    )
    fault = _fault(ours, floor)
    if fault is not None:
        return Verdict(key, subject, False, f"{detail}; {fault}")
    return Verdict(key, subject, added <= t, detail)


def batch1_limit(rows: Sequence[Row]) -> Row | None:
    """The heavy MLP's in-process batch-1 limit: its fastest in-process batch-1 row."""
    limits = [r for r in rows if r.target == INPROCESS and r.model == HEAVY and r.batch == 1]
    return max(limits, key=lambda r: r.req_per_s, default=None)


def _heavy(rows: Sequence[Row], key: str, model: str, protocol: str, target: str = MODELYARD) -> Verdict:
    batched = model != HEAVY
    subject = _subject(
        f"heavy c=8 {protocol}{' with batching' if batched else ''} vs the batch-1 limit", target
    )
    limit, ours = batch1_limit(rows), find(rows, target, protocol, 8, model=model)
    if limit is None or ours is None:
        return _missing(key, subject, f"in-process heavy or {target} {model} {protocol} c=8")
    share = ours.req_per_s / limit.req_per_s if limit.req_per_s else math.nan
    t = THRESHOLD[key]
    detail = (
        f"{ours.req_per_s:.0f} req/s vs in-process {limit.req_per_s:.0f} runs/s (c={limit.concurrency}) "
        f"= {share:.2f}{'x' if batched else ''} (goal >= {t:g}{'x' if batched else ''})"
    )
    if not batched and ours.compute_ms and limit.req_per_s:
        detail += (
            f"; what holds it: each run of the model inside the gateway took {ours.compute_ms:.3f} ms "
            f"against {1000 / limit.req_per_s:.3f} ms in-process alone, and runs took "
            f"{ours.req_per_s * ours.compute_ms / 1000:.0%} of the server core's time"
        )
    return _at_least(key, subject, share, t, detail, ours, limit)


def _batching_speedup(rows: Sequence[Row], target: str = MODELYARD) -> Verdict:
    subject = _subject("heavy c=16 gRPC, batching on vs off", target)
    on = find(rows, target, "gRPC", 16, model=HEAVY_BATCHED)
    off = find(rows, target, "gRPC", 16, model=HEAVY)
    if on is None or off is None:
        return _missing("g", subject, "heavy gRPC c=16 (batching on and off)")
    speedup = on.req_per_s / off.req_per_s if off.req_per_s else math.nan
    t = THRESHOLD["g"]
    detail = f"{on.req_per_s:.0f} vs {off.req_per_s:.0f} req/s = {speedup:.2f}x (goal >= {t:g}x)"
    return _at_least("g", subject, speedup, t, detail, on, off)


def verdicts(rows: Sequence[Row]) -> list[Verdict]:
    """Every goal's verdict on each protocol it covers, in the table's order."""
    return [
        _peer_throughput(rows, "a", "gRPC"),
        _peer_throughput(rows, "b", "REST JSON"),
        _peer_p99(rows, "gRPC"),
        _peer_p99(rows, "REST JSON"),
        _overhead(rows, "d-rest", "REST JSON"),
        _overhead(rows, "d-rest", "REST binary"),
        _overhead(rows, "d-grpc", "gRPC"),
        _heavy(rows, "e", HEAVY, "gRPC"),
        _heavy(rows, "e", HEAVY, "REST binary"),
        _heavy(rows, "f", HEAVY_BATCHED_C8, "gRPC"),
        _heavy(rows, "f", HEAVY_BATCHED_C8, "REST binary"),
        _batching_speedup(rows),
        *_grpcio_verdicts(rows),
    ]


def _grpcio_verdicts(rows: Sequence[Row]) -> list[Verdict]:
    """The gRPC goals again, for the rows of grpcio's gRPC server, where the run has them. Their
    overhead is measured against the canned answer on the same grpc.aio stack."""
    if not any(row.target == MODELYARD_GRPCIO for row in rows):
        return []
    return [
        _peer_throughput(rows, "a", "gRPC", MODELYARD_GRPCIO),
        _peer_p99(rows, "gRPC", MODELYARD_GRPCIO),
        _overhead(rows, "d-grpc", "gRPC", MODELYARD_GRPCIO),
        _heavy(rows, "e", HEAVY, "gRPC", MODELYARD_GRPCIO),
        _heavy(rows, "f", HEAVY_BATCHED_C8, "gRPC", MODELYARD_GRPCIO),
        _batching_speedup(rows, MODELYARD_GRPCIO),
    ]


def goal_table() -> list[str]:
    """The goals themselves, as a markdown table."""
    lines = ["| goal | what |", "|---|---|"]
    lines += [f"| ({goal.key}) | {goal.text.format(t=f'{goal.threshold:g}')} |" for goal in GOALS]
    return lines
