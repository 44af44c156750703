"""The figures a migration is judged on, from two snapshots of the gateway's /metrics: what the
shadow compared, and each deployment's requests, errors and latency between them.

A snapshot keeps only the counters that matter (requests, latency buckets, shadow outcomes and
differences), as plain JSON, so a step can keep it in the migration's state and a later step can
count from it. Counters only grow; a gateway restarted in between shows counts below the
snapshot's, which is read as counting from zero again.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gateway.status import histogram_quantile

REQUESTS = "modelyard_requests_total"
DURATION = "modelyard_request_duration_seconds_bucket"
SHADOW_REQUESTS = "modelyard_shadow_requests_total"
SHADOW_DIFF = "modelyard_shadow_max_abs_diff_bucket"
SHADOW_WORST = "modelyard_shadow_worst_abs_diff"
KEPT = (REQUESTS, DURATION, SHADOW_REQUESTS, SHADOW_DIFF, SHADOW_WORST)
# The protocol label of a shadow copy's run; every other value is a client's protocol.
SHADOW_PROTOCOL = "shadow"
# The code label of an answered request: its HTTP status over REST, its gRPC code over gRPC.
SUCCESS_CODES = frozenset({"200", "OK"})

Sample = tuple[str, dict[str, str], float]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The kept samples of one read of /metrics, and when it was taken (unix seconds)."""

    taken_at: float
    samples: tuple[Sample, ...]

    @classmethod
    def parse(cls, text: str, taken_at: float, models: Iterable[str]) -> Snapshot:
        """The samples of the Prometheus text `text` about `models` (label model)."""
        from prometheus_client.parser import text_string_to_metric_families

        wanted = set(models)
        kept: list[Sample] = []
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in KEPT and sample.labels.get("model") in wanted:
                    kept.append((sample.name, dict(sample.labels), float(sample.value)))
        return cls(taken_at, tuple(kept))

    def as_json(self) -> dict[str, Any]:
        return {"taken_at": self.taken_at, "samples": [list(s) for s in self.samples]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Snapshot:
        return cls(
            float(data["taken_at"]),
            tuple(
                (str(n), {str(k): str(v) for k, v in labels.items()}, float(v))
                for n, labels, v in data["samples"]
            ),
        )

    def total(self, name: str, **match: Any) -> float:
        """The sum of `name`'s samples whose labels match: a value, or a predicate on the label."""
        return sum(v for n, labels, v in self.samples if n == name and _matches(labels, match))

    def buckets(self, name: str, **match: Any) -> dict[float, float]:
        """Cumulative counts by upper bound, summed over the matching series."""
        found: dict[float, float] = {}
        for n, labels, v in self.samples:
            if n == name and _matches(labels, match):
                bound = float(labels["le"])
                found[bound] = found.get(bound, 0.0) + v
        return found

    def largest(self, name: str, **match: Any) -> float | None:
        values = [v for n, labels, v in self.samples if n == name and _matches(labels, match)]
        return max(values) if values else None


def _matches(labels: dict[str, str], match: dict[str, Any]) -> bool:
    for key, wanted in match.items():
        value = labels.get(key)
        if callable(wanted):
            if not wanted(value):
                return False
        elif value != wanted:
            return False
    return True


def _since(after: float, before: float) -> float:
    # A counter below its earlier value: the gateway restarted and counts from zero again.
    return after - before if after >= before else after


def is_client(protocol: str | None) -> bool:
    return protocol != SHADOW_PROTOCOL


def is_shadow(protocol: str | None) -> bool:
    return protocol == SHADOW_PROTOCOL


def targets(deployment: str) -> Any:
    """The shadow target labels of a deployment: NAME, or NAME:VERSION."""
    return lambda target: target == deployment or (target or "").startswith(f"{deployment}:")


@dataclass(frozen=True, slots=True)
class Side:
    """One deployment's answered requests over a window, for one kind of caller (clients or shadow)."""

    requests: int
    errors: int
    p50_ms: float | None
    p99_ms: float | None
    # The tail that a window of fewer than P99_MIN_ANSWERS answers is judged by (gateway.tools.migrate.promote).
    p90_ms: float | None = None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


def side(before: Snapshot, after: Snapshot, model: str, protocol: Any) -> Side:
    """`model`'s requests between the snapshots whose protocol label passes `protocol`."""
    requests = _since(after.total(REQUESTS, model=model, protocol=protocol),
                      before.total(REQUESTS, model=model, protocol=protocol))  # fmt: skip
    ok = _since(
        after.total(REQUESTS, model=model, protocol=protocol, code=SUCCESS_CODES.__contains__),
        before.total(REQUESTS, model=model, protocol=protocol, code=SUCCESS_CODES.__contains__),
    )
    cumulative = window_buckets(before.buckets(DURATION, model=model, protocol=protocol),
                                after.buckets(DURATION, model=model, protocol=protocol))  # fmt: skip
    counts = [count for _, count in cumulative]
    # The latency histogram's bounds are the gateway's LATENCY_BUCKETS, the ones status.py reads.
    p50 = histogram_quantile(0.50, counts) if counts else None
    p99 = histogram_quantile(0.99, counts) if counts else None
    p90 = histogram_quantile(0.90, counts) if counts else None
    return Side(int(requests), int(requests - ok), p50, p99, p90)


def window_buckets(before: dict[float, float], after: dict[float, float]) -> list[tuple[float, float]]:
    """Cumulative counts by bound, between two reads of one histogram, in bound order."""
    return [(bound, _since(after[bound], before.get(bound, 0.0))) for bound in sorted(after)]


def bucket_quantile(q: float, cumulative: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over any bounds (status.py's, for the difference histogram):
    linear within the bucket; past the last finite bound, that bound; None without observations."""
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    rank = q * cumulative[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in cumulative:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count <= lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def highest_bucket(cumulative: list[tuple[float, float]]) -> float | None:
    """The upper bound of the highest bucket with an observation (the last finite one for +Inf)."""
    previous_count, previous_bound, highest = 0.0, 0.0, None
    for bound, count in cumulative:
        if count > previous_count:
            highest = previous_bound if math.isinf(bound) else bound
        previous_count, previous_bound = count, bound
    return highest


@dataclass(frozen=True, slots=True)
class ShadowFigures:
    """What the shadow compared between two snapshots, and each side's latency."""

    compared: int
    matches: int
    mismatches: int
    shadow_errors: int
    dropped: int
    # Non-OK answers of the new deployment to clients (a split) and to shadow copies.
    new_errors: int
    max_abs_diff: float | None
    # "gauge": the gateway's worst difference since it started (which may predate the window);
    # "histogram": the highest bucket bound with an observation in the window, an upper bound.
    max_abs_diff_from: str
    p99_abs_diff: float | None
    diff_buckets: list[tuple[float, float]]
    source: Side
    new: Side

    @property
    def agreement(self) -> float | None:
        judged = self.matches + self.mismatches
        return self.matches / judged if judged else None

    @property
    def errors(self) -> int:
        return self.shadow_errors + self.new_errors


def shadow_figures(before: Snapshot, after: Snapshot, model: str, deployment: str) -> ShadowFigures:
    def outcome(name: str) -> int:
        now = after.total(SHADOW_REQUESTS, model=model, target=targets(deployment), outcome=name)
        then = before.total(SHADOW_REQUESTS, model=model, target=targets(deployment), outcome=name)
        return int(_since(now, then))

    matches, mismatches, errors, dropped = (outcome(o) for o in ("match", "mismatch", "error", "dropped"))
    diffs = window_buckets(before.buckets(SHADOW_DIFF, model=model, target=targets(deployment)),
                           after.buckets(SHADOW_DIFF, model=model, target=targets(deployment)))  # fmt: skip
    worst = after.largest(SHADOW_WORST, model=model, target=targets(deployment))
    p99 = bucket_quantile(0.99, diffs)
    if p99 is not None and worst is not None:
        p99 = min(p99, worst)  # interpolated within a bucket, it can pass the largest seen
    new_client = side(before, after, deployment, is_client)
    return ShadowFigures(
        compared=matches + mismatches + errors,
        matches=matches,
        mismatches=mismatches,
        shadow_errors=errors,
        dropped=dropped,
        new_errors=new_client.errors,
        max_abs_diff=worst if worst is not None else highest_bucket(diffs),
        max_abs_diff_from="gauge" if worst is not None else "histogram",
        p99_abs_diff=p99,
        diff_buckets=diffs,
        source=side(before, after, model, is_client),
        new=side(before, after, deployment, is_shadow),
    )
