"""The live steps' parts that need no gateway: the config.yaml edits (comments kept, only the
migration's keys touched) and the figures read from a real Metrics registry's exposition."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from gateway.config import ModelConfig
from gateway.metrics import LATENCY_BUCKETS, Metrics
from gateway.status import histogram_quantile
from gateway.tools.migrate import config_edit
from gateway.tools.migrate import promote as promote_module
from gateway.tools.migrate.figures import (
    Side,
    Snapshot,
    bucket_quantile,
    highest_bucket,
    is_client,
    shadow_figures,
    side,
    window_buckets,
)
from gateway.tools.migrate.promote import PromoteOptions
from gateway.tools.migrate.shadow import FAIL, NOT_ENOUGH_DATA, PASS, Criteria, judge
from gateway.tools.migrate.state import MigrationError

SOURCE_CONFIG = """\
# The production MLP: keep it on one thread.
backend: onnxruntime   # in-process
onnxruntime: {intra_op_threads: 1}
labels:
  stable: 1  # what the dashboards call stable
shadow:
  - {version: 1, percent: 5}  # an A/B of its own
"""


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / "mlp").mkdir()
    (tmp_path / "mlp" / "config.yaml").write_text(SOURCE_CONFIG)
    return tmp_path


def test_the_shadow_entry_is_written_with_the_comments_and_other_keys_kept(repo: Path) -> None:
    path = config_edit.set_shadow(repo, "mlp", "mlp_onnx", 10, 1e-5, 1e-4)
    text = path.read_text()
    for comment in ("# The production MLP", "# in-process", "# what the dashboards call stable", "# an A/B"):
        assert comment in text
    written = yaml.safe_load(text)
    before = yaml.safe_load(SOURCE_CONFIG)
    assert {k: v for k, v in written.items() if k != "shadow"} == {
        k: v for k, v in before.items() if k != "shadow"
    }
    assert written["shadow"] == [
        *before["shadow"],
        {"model": "mlp_onnx", "percent": 10, "atol": 1e-5, "rtol": 1e-4},
    ]
    ModelConfig.model_validate(written)  # the gateway's schema takes it

    # Run again with another share: the one entry is rewritten, not doubled.
    config_edit.set_shadow(repo, "mlp", "mlp_onnx", 25.5, 1e-3, 0.0)
    entries = yaml.safe_load(path.read_text())["shadow"]
    assert entries == [before["shadow"][0], {"model": "mlp_onnx", "percent": 25.5, "atol": 1e-3, "rtol": 0.0}]
    assert config_edit.read_shadow(repo, "mlp", "mlp_onnx") == entries[1]

    assert config_edit.remove_shadow(repo, "mlp", "mlp_onnx")
    assert not config_edit.remove_shadow(repo, "mlp", "mlp_onnx")
    assert yaml.safe_load(path.read_text()) == before
    assert "# an A/B of its own" in path.read_text()


def test_the_split_is_set_moved_and_taken_away(repo: Path) -> None:
    path = repo / "mlp" / "config.yaml"
    config_edit.set_split(repo, "mlp", "mlp_onnx", 1)
    assert yaml.safe_load(path.read_text())["split"] == {"mlp_onnx": 1}
    config_edit.set_split(repo, "mlp", "mlp_onnx", 50)
    assert config_edit.read_split(repo, "mlp") == {"mlp_onnx": 50.0}
    ModelConfig.model_validate({k: v for k, v in yaml.safe_load(path.read_text()).items() if k != "split"})
    config_edit.set_split(repo, "mlp", "mlp_onnx", 0)
    assert "split" not in yaml.safe_load(path.read_text())
    assert "# The production MLP" in path.read_text()
    assert yaml.safe_load(path.read_text()) == yaml.safe_load(SOURCE_CONFIG)


def test_a_split_past_100_with_other_shares_is_refused(repo: Path) -> None:
    config_edit.set_split(repo, "mlp", "mlp_tf", 60)
    with pytest.raises(MigrationError, match="at most 40%"):
        config_edit.set_split(repo, "mlp", "mlp_onnx", 50)
    assert config_edit.read_split(repo, "mlp") == {"mlp_tf": 60.0}


def test_a_source_without_config_gets_one_and_a_missing_model_is_named(tmp_path: Path) -> None:
    (tmp_path / "mlp" / "1").mkdir(parents=True)
    config_edit.set_shadow(tmp_path, "mlp", "mlp_onnx", 10, 1e-5, 1e-4)
    assert yaml.safe_load((tmp_path / "mlp" / "config.yaml").read_text()) == {
        "shadow": [{"model": "mlp_onnx", "percent": 10, "atol": 1e-5, "rtol": 1e-4}]
    }
    with pytest.raises(MigrationError, match="model 'nope' has no folder"):
        config_edit.set_split(tmp_path, "nope", "mlp_onnx", 10)


def _snapshot(metrics: Metrics) -> Snapshot:
    return Snapshot.parse(metrics.render().decode(), time.time(), ["mlp", "mlp_onnx"])


def test_figures_count_since_the_baseline_from_a_real_registry() -> None:
    metrics = Metrics()
    source = metrics.series("mlp", "1", "onnxruntime", "rest")
    shadow_run = metrics.series("mlp_onnx", "1", "onnxruntime", "shadow")
    client_new = metrics.series("mlp_onnx", "1", "onnxruntime", "grpc")

    # Before the baseline: counted, then left out of the window.
    for _ in range(7):
        source.count("200")
        source.duration.observe(0.2)
        metrics.shadow_requests.labels("mlp", "mlp_onnx", "mismatch").inc()
        metrics.shadow_abs_diff.labels("mlp", "mlp_onnx").observe(5.0)
    baseline = _snapshot(metrics)

    source_latencies = [0.0003] * 90 + [0.004] * 10
    shadow_latencies = [0.0002] * 95 + [0.02] * 5
    diffs = [0.0] * 60 + [5e-6] * 37 + [0.05] * 3
    for seconds in source_latencies:
        source.count("200")
        source.duration.observe(seconds)
    for seconds in shadow_latencies:
        shadow_run.count("OK")
        shadow_run.duration.observe(seconds)
    for diff in diffs:
        metrics.shadow_abs_diff.labels("mlp", "mlp_onnx").observe(diff)
        metrics.shadow_requests.labels("mlp", "mlp_onnx", "match" if diff < 1e-4 else "mismatch").inc()
    metrics.shadow_requests.labels("mlp", "mlp_onnx", "error").inc(2)
    metrics.shadow_requests.labels("mlp", "mlp_onnx", "dropped").inc(4)
    client_new.count("UNAVAILABLE")
    client_new.count("OK")
    source.count("503")
    now = _snapshot(metrics)

    figures = shadow_figures(baseline, now, "mlp", "mlp_onnx")
    matches = sum(d < 1e-4 for d in diffs)
    assert (figures.matches, figures.mismatches) == (matches, len(diffs) - matches)
    assert figures.compared == len(diffs) + 2 and figures.dropped == 4
    assert figures.agreement == matches / len(diffs)
    assert (figures.shadow_errors, figures.new_errors, figures.errors) == (2, 1, 3)
    # Nothing set the worst-difference gauge: the histogram's highest filled bucket stands in.
    assert figures.max_abs_diff_from == "histogram"
    assert figures.max_abs_diff == min(b for b in (0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1) if b >= 0.05)
    assert figures.p99_abs_diff is not None and 1e-2 < figures.p99_abs_diff <= 0.1

    def expected(latencies: list[float], q: float) -> float | None:
        cumulative = [float(sum(s <= b for s in latencies)) for b in LATENCY_BUCKETS] + [
            float(len(latencies))
        ]
        return histogram_quantile(q, cumulative)

    assert figures.source.requests == len(source_latencies) + 1 and figures.source.errors == 1
    assert (figures.source.p50_ms, figures.source.p99_ms) == (
        expected(source_latencies, 0.5),
        expected(source_latencies, 0.99),
    )
    assert figures.new.requests == len(shadow_latencies) and figures.new.errors == 0
    assert figures.new.p99_ms == expected(shadow_latencies, 0.99)
    clients = side(baseline, now, "mlp_onnx", is_client)
    assert (clients.requests, clients.errors, clients.error_rate) == (2, 1, 0.5)

    # Kept in the state as JSON and read back, a snapshot gives the same figures.
    assert shadow_figures(Snapshot.from_json(baseline.as_json()), now, "mlp", "mlp_onnx") == figures


def test_the_worst_difference_gauge_is_preferred_when_the_gateway_has_it() -> None:
    metrics = Metrics()
    gauge = metrics.shadow_worst_abs_diff
    baseline = _snapshot(metrics)
    metrics.shadow_abs_diff.labels("mlp", "mlp_onnx:2").observe(3e-6)
    gauge.labels("mlp", "mlp_onnx:2").set(3e-6)
    figures = shadow_figures(baseline, _snapshot(metrics), "mlp", "mlp_onnx")
    assert (figures.max_abs_diff, figures.max_abs_diff_from) == (3e-6, "gauge")


def test_a_restarted_gateway_counts_from_zero() -> None:
    metrics = Metrics()
    series = metrics.series("mlp", "1", "onnxruntime", "rest")
    for _ in range(50):
        series.count("200")
    before = _snapshot(metrics)
    fresh = Metrics()
    for _ in range(3):
        fresh.series("mlp", "1", "onnxruntime", "rest").count("200")
    assert side(before, _snapshot(fresh), "mlp", is_client).requests == 3


def test_bucket_quantile_matches_the_status_page_on_latency_bounds() -> None:
    bounds = [*LATENCY_BUCKETS, float("inf")]
    for counts in ([0, 0, 3, 3, 10, 12, 12, 12, 20, 20, 20, 20, 20, 20, 20, 20, 21], [5] * 17):
        cumulative = [float(c) for c in counts]
        for q in (0.5, 0.9, 0.99):
            ours = bucket_quantile(q, list(zip(bounds, cumulative, strict=True)))
            theirs = histogram_quantile(q, cumulative)
            assert ours is not None and theirs is not None
            assert ours * 1000 == pytest.approx(theirs)
    assert bucket_quantile(0.99, [(1.0, 0.0), (float("inf"), 0.0)]) is None
    assert highest_bucket(window_buckets({}, {0.0: 2.0, 1.0: 2.0, float("inf"): 3.0})) == 1.0


def _figures(matches: int, mismatches: int, errors: int, source_p99: float, new_p99: float) -> object:
    from gateway.tools.migrate.figures import ShadowFigures

    return ShadowFigures(
        compared=matches + mismatches + errors, matches=matches, mismatches=mismatches,
        shadow_errors=errors, dropped=0, new_errors=0, max_abs_diff=0.0, max_abs_diff_from="gauge",
        p99_abs_diff=0.0, diff_buckets=[], source=Side(500, 0, 1.0, source_p99),
        new=Side(matches + mismatches, 0, 1.0, new_p99),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("case", "verdict", "reason"),
    [
        ((1000, 0, 0, 2.0, 2.1), PASS, None),
        ((1000, 0, 0, 2.0, 2.5), FAIL, "p99 latency"),
        ((990, 10, 0, 2.0, 2.0), FAIL, "agreement: 99.000%"),
        ((1000, 0, 1, 2.0, 2.0), FAIL, "errors: 1"),
        ((50, 0, 0, 2.0, 2.0), NOT_ENOUGH_DATA, "requests compared: 50 < 100"),
        ((10, 0, 2, 2.0, 2.0), FAIL, "errors: 2"),  # an error fails before there is enough data
        ((0, 2, 0, 2.0, 2.0), FAIL, "agreement: 0.000% of 2 judged"),  # past saving at 99.9% of 100
    ],
)
def test_the_verdict_names_the_criterion(
    case: tuple[int, int, int, float, float], verdict: str, reason: str | None
) -> None:
    found, reasons = judge(_figures(*case), Criteria())  # type: ignore[arg-type]
    assert found == verdict
    if reason is None:
        assert reasons == []
    else:
        assert len(reasons) == 1 and reasons[0].startswith(reason), reasons


@pytest.mark.parametrize("step", ["shadow", "status", "promote", "report"])
def test_a_live_step_that_cannot_run_says_what_to_do_and_exits_2(step: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from gateway.tools.migrate.cli import migrate

    ran = CliRunner().invoke(
        migrate, [step, "mlp", "--state-dir", str(tmp_path / "state"), "--model-repo", str(tmp_path)]
    )
    assert ran.exit_code == 2, ran.output
    assert "error: " in ran.output and "modelyard migrate convert mlp" in ran.output


def test_status_finds_the_gateway_through_its_environment_variable(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from gateway.net import free_port
    from gateway.tools.migrate.cli import migrate
    from gateway.tools.migrate.state import Migration, save

    migration = Migration(model="mlp", to="onnxruntime", deployment="mlp_onnx", model_repo=str(tmp_path))
    migration.steps["shadow"] = {"baseline": {"taken_at": 0.0, "samples": []}}
    save(tmp_path, migration)
    url = f"http://127.0.0.1:{free_port()}"
    ran = CliRunner().invoke(
        migrate, ["status", "mlp", "--state-dir", str(tmp_path)], env={"MODELYARD_GATEWAY_URL": url}
    )
    assert ran.exit_code == 2, ran.output
    assert f"error: the gateway at {url} did not answer /metrics" in ran.output


def test_finish_moves_nothing_before_promote_reached_100(tmp_path: Path) -> None:
    from gateway.tools.migrate.finish import FinishOptions, finish
    from gateway.tools.migrate.state import Migration, save

    repo = tmp_path / "repo"
    (repo / "mlp" / "1").mkdir(parents=True)
    (repo / "mlp_onnx" / "1").mkdir(parents=True)
    (repo / "mlp" / "config.yaml").write_text("backend: torchserve\nsplit: {mlp_onnx: 50}\n")
    save(tmp_path, Migration(model="mlp", to="onnxruntime", deployment="mlp_onnx", model_repo=str(repo)))
    with pytest.raises(MigrationError, match=r"answers 50% of 'mlp'.*promote mlp` to 100% first"):
        finish("mlp", repo, tmp_path, "http://127.0.0.1:1", FinishOptions())
    assert sorted(p.name for p in (repo / "mlp" / "1").iterdir()) == []  # nothing was copied


def test_the_backend_switch_is_one_write_that_keeps_comments(repo: Path) -> None:
    path = repo / "mlp" / "config.yaml"
    path.write_text(
        "# ours\nbackend: torchserve\nlabels: {stable: 1}\ntorchserve: {mode: managed, workers: 1}\n"
        "split: {mlp_onnx: 100}\nshadow:\n- {model: mlp_onnx, percent: 10}\n- {version: 2, percent: 5}\n"
    )
    section = config_edit.switch_backend(repo, "mlp", "torchserve", "onnxruntime", "mlp_onnx")
    assert section == {"mode": "managed", "workers": 1}
    text = path.read_text()
    assert text.startswith("# ours\n") and "# was torchserve, until modelyard migrate finish" in text
    assert yaml.safe_load(text) == {
        "backend": "onnxruntime",
        "labels": {"stable": 1},
        "shadow": [{"version": 2, "percent": 5}],
    }
    ModelConfig.model_validate(yaml.safe_load(text))


def test_status_after_promote_reached_100_keeps_the_shadow_verdict(tmp_path: Path) -> None:
    from gateway.tools.migrate.shadow import StatusOptions, status
    from gateway.tools.migrate.state import Migration, load, save

    migration = Migration(model="mlp", to="onnxruntime", deployment="mlp_onnx", model_repo=str(tmp_path))
    migration.steps["shadow"] = {"baseline": {"taken_at": 0.0, "samples": []}}
    migration.steps["status"] = {"verdict": PASS}
    migration.steps["promote"] = {"split": 100, "steps": [], "done": True}
    save(tmp_path, migration)
    with pytest.raises(MigrationError, match="ended when promote reached 100%"):
        status("mlp", tmp_path, tmp_path, "http://127.0.0.1:1", StatusOptions())
    assert load(tmp_path, "mlp").steps["status"] == {"verdict": PASS}


def test_a_step_of_few_answers_is_judged_by_its_p90_not_by_one_slow_answer() -> None:
    """In 30 answers the 99th percentile is the slowest one: one slow answer must not roll a good
    deployment back, while a slowdown of most answers still does."""
    options = PromoteOptions(max_p99_ratio=5, min_requests_per_step=20)
    source = Side(900, 0, 0.3, 0.5, 0.4)
    one_slow = Side(30, 0, 0.3, 3.0, 0.45)
    assert promote_module._regression(one_slow, source, options) is None
    slowed = Side(30, 0, 30.0, 31.0, 30.5)
    why = promote_module._regression(slowed, source, options)
    assert why is not None and why.startswith("p90 latency 30.500 ms vs the source's 0.400 ms")
    assert "fewer than 100" in why
    # With enough answers the p99 itself is judged.
    many = Side(500, 0, 0.3, 3.0, 0.45)
    why = promote_module._regression(many, source, options)
    assert why is not None and why.startswith("p99 latency 3.000 ms vs the source's 0.500 ms")
