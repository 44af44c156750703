"""The peers bench's goal verdicts: computed from a run's rows, met or not with the numbers, and
never met from a row that had errors or failed its check."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import goals
from drive import Row


def row(
    target: str,
    protocol: str,
    c: int,
    rate: float,
    p50: float = 1.0,
    p99: float = 2.0,
    model: str = "mlp",
    check: str = "ok",
) -> Row:
    return Row(target, protocol, "h2load", c, rate, p50, p99, 1000, 0, check, model=model)


def passing_run() -> list[Row]:
    """Rows that meet every goal by a margin."""
    return [
        row(goals.MODELYARD, "gRPC", 8, 3000, p99=2.0),
        row(goals.MODELYARD, "REST JSON", 8, 4000, p99=2.0),
        row(goals.MLSERVER, "gRPC", 8, 1000, p99=8.0),
        row(goals.KSERVE, "gRPC", 8, 1100, p99=6.0),
        row(goals.MLSERVER, "REST JSON", 8, 1200, p99=7.0),
        row(goals.KSERVE, "REST JSON", 8, 1000, p99=9.0),
        # MLServer's default setting is slower and never the peer the goals compare with.
        row("MLServer (default: parallel_workers 1)", "gRPC", 8, 300, p99=40.0),
        row(goals.MODELYARD, "REST JSON", 1, 800, p50=0.30),
        row(goals.CANNED, "REST JSON", 1, 3000, p50=0.20),
        row(goals.MODELYARD, "REST binary", 1, 800, p50=0.30),
        row(goals.CANNED, "REST binary", 1, 3000, p50=0.20),
        row(goals.MODELYARD, "gRPC", 1, 800, p50=0.60),
        # The default gateway's gRPC runs on the native server: its floor is the canned answer there.
        row(goals.CANNED_NATIVE, "gRPC", 1, 2000, p50=0.40),
        row(goals.INPROCESS, "in-process", 1, 900, model=goals.HEAVY, check="every 10th"),
        row(goals.INPROCESS, "in-process", 8, 850, model=goals.HEAVY, check="every 10th"),
        row(goals.MODELYARD, "gRPC", 8, 800, model=goals.HEAVY),
        row(goals.MODELYARD, "REST binary", 8, 820, model=goals.HEAVY),
        row(goals.MODELYARD, "gRPC", 8, 1500, model=goals.HEAVY_BATCHED_C8),
        row(goals.MODELYARD, "REST binary", 8, 1400, model=goals.HEAVY_BATCHED_C8),
        row(goals.MODELYARD, "gRPC", 16, 500, model=goals.HEAVY),
        row(goals.MODELYARD, "gRPC", 16, 1300, model=goals.HEAVY_BATCHED),
    ]


def by_subject(rows: list[Row]) -> dict[str, goals.Verdict]:
    return {v.subject: v for v in goals.verdicts(rows)}


def test_every_goal_met_by_a_run_that_meets_it() -> None:
    verdicts = goals.verdicts(passing_run())
    assert {v.goal for v in verdicts} == {g.key for g in goals.GOALS}
    assert [v for v in verdicts if v.met is not True] == []


def test_the_faster_peer_is_the_bar_and_the_verdict_gives_the_numbers() -> None:
    rows = [
        r
        for r in passing_run()
        if not (r.target == goals.MODELYARD and r.protocol == "gRPC" and r.concurrency == 8)
    ]
    rows.append(row(goals.MODELYARD, "gRPC", 8, 2640, p99=2.0))  # 2.4x KServe's 1100, 2.64x MLServer's
    verdict = by_subject(rows)["mlp c=8 gRPC"]
    assert verdict.met is False
    assert "KServe 1100 req/s" in verdict.detail and "2.40x" in verdict.detail
    assert "NOT met" in verdict.line()


def test_p99_is_held_to_the_better_peer() -> None:
    rows = passing_run()
    rows = [
        replace(r, p99_ms=3.5) if r.target == goals.MODELYARD and r.protocol == "gRPC" else r for r in rows
    ]
    assert by_subject(rows)["mlp c=8 gRPC p99"].met is False  # KServe's 6.0 ms: at most 3.0


def test_overhead_is_measured_against_the_canned_floor() -> None:
    rows = [
        replace(r, p50_ms=0.70)
        if r.target == goals.MODELYARD and r.concurrency == 1 and r.protocol == "gRPC"
        else r
        for r in passing_run()
    ]
    verdict = by_subject(rows)["mlp c=1 gRPC p50 over the canned answer"]
    assert verdict.met is False and "+0.300 ms" in verdict.detail


def test_the_batch1_limit_is_the_fastest_in_process_row() -> None:
    rows = [r for r in passing_run() if r.model != goals.HEAVY_BATCHED_C8]
    rows += [
        row(goals.MODELYARD, "gRPC", 8, 1349, model=goals.HEAVY_BATCHED_C8),  # 1.499x of 900
        row(goals.MODELYARD, "REST binary", 8, 1351, model=goals.HEAVY_BATCHED_C8),
    ]
    subjects = by_subject(rows)
    assert subjects["heavy c=8 gRPC with batching vs the batch-1 limit"].met is False
    assert subjects["heavy c=8 REST binary with batching vs the batch-1 limit"].met is True


def test_an_unbatched_heavy_verdict_says_how_long_the_model_ran_inside_the_gateway() -> None:
    rows = [r for r in passing_run() if not (r.model == goals.HEAVY and r.concurrency == 8)]
    rows += [
        replace(row(goals.MODELYARD, "gRPC", 8, 500, model=goals.HEAVY), compute_ms=1.6),
        row(goals.MODELYARD, "REST binary", 8, 820, model=goals.HEAVY),
    ]
    subjects = by_subject(rows)
    grpc = subjects["heavy c=8 gRPC vs the batch-1 limit"]
    assert grpc.met is False
    # 900 runs/s in-process is 1.111 ms a run; 500 req/s of 1.6 ms runs kept the core 80% busy.
    assert "took 1.600 ms against 1.111 ms in-process alone" in grpc.detail
    assert "runs took 80% of the server core's time" in grpc.detail
    assert "what holds it" not in subjects["heavy c=8 REST binary vs the batch-1 limit"].detail


@pytest.mark.parametrize("fault", [{"errors": 3}, {"check": "failed: output differs from onnxruntime"}])
def test_a_faulty_row_never_meets_a_goal(fault: dict[str, object]) -> None:
    rows = [
        replace(r, **fault) if r.target == goals.KSERVE and r.protocol == "gRPC" else r for r in passing_run()
    ]  # type: ignore[arg-type]
    verdict = by_subject(rows)["mlp c=8 gRPC"]
    assert verdict.met is False and "KServe gRPC c=8" in verdict.detail


def test_a_missing_row_is_not_measured() -> None:
    rows = [r for r in passing_run() if r.model != goals.HEAVY_BATCHED]
    verdict = by_subject(rows)["heavy c=16 gRPC, batching on vs off"]
    assert verdict.met is None and "not measured" in verdict.line()


def test_the_grpcio_rows_get_verdicts_of_their_own() -> None:
    assert not any(goals.MODELYARD_GRPCIO in v.subject for v in goals.verdicts(passing_run()))
    rows = [
        *passing_run(),
        row(goals.MODELYARD_GRPCIO, "gRPC", 8, 2000, p99=2.0),  # 1.82x KServe's 1100: not met
        row(goals.MODELYARD_GRPCIO, "gRPC", 1, 2500, p50=0.55),
        row(goals.CANNED, "gRPC", 1, 3000, p50=0.35),
    ]
    found = by_subject(rows)
    grpcio = found[f"mlp c=8 gRPC [{goals.MODELYARD_GRPCIO}]"]
    assert grpcio.met is False and "2000 req/s" in grpcio.detail and "1.82x" in grpcio.detail
    assert found[f"mlp c=8 gRPC p99 [{goals.MODELYARD_GRPCIO}]"].met is True
    assert found[f"mlp c=1 gRPC p50 over the canned answer [{goals.MODELYARD_GRPCIO}]"].met is True
    # The default gateway's rows keep their own verdicts.
    assert found["mlp c=8 gRPC"].met is True


def test_each_grpc_server_is_measured_against_the_canned_answer_on_its_own_stack() -> None:
    """The default gateway's c=1 gRPC p50 is compared with the canned answer on the native stack,
    grpcio's with the one on grpc.aio; without its floor's row a verdict is not measured."""
    default = "mlp c=1 gRPC p50 over the canned answer"
    grpcio = f"{default} [{goals.MODELYARD_GRPCIO}]"
    rows = [*passing_run(), row(goals.MODELYARD_GRPCIO, "gRPC", 8, 3000)]
    rows.append(row(goals.MODELYARD_GRPCIO, "gRPC", 1, 2500, p50=0.55))
    # grpc.aio's canned answer at 0.20 ms gives +0.35; the native floor (0.40 ms) would pass it.
    found = by_subject([*rows, row(goals.CANNED, "gRPC", 1, 9000, p50=0.20)])
    assert found[grpcio].met is False and "+0.350 ms" in found[grpcio].detail
    assert goals.CANNED in found[grpcio].detail and goals.CANNED_NATIVE not in found[grpcio].detail
    # The default's +0.20 ms over the native floor is met, with grpc.aio's floor at 0.20 ms beside it.
    assert found[default].met is True and goals.CANNED_NATIVE in found[default].detail
    missing = by_subject(rows)[grpcio]
    assert missing.met is None and goals.CANNED in missing.detail
    no_native_floor = [r for r in passing_run() if r.target != goals.CANNED_NATIVE]
    assert by_subject(no_native_floor)[default].met is None
