"""`modelyard bench`: resolving deployments, the verdicts, and short real runs through a gateway."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from gateway.tools.lab.bench import (
    BenchError,
    BenchPlan,
    BenchResult,
    Scenario,
    Target,
    parse_duration,
    parse_ints,
    resolve_targets,
    verdicts,
)
from tests.support import ROOT, RunningGateway


def modelyard(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )


def model(
    name: str, backend: str, twin_of: str | None = None, versions: tuple[int, ...] = (1,)
) -> dict[str, Any]:
    return {
        "name": name,
        "backend": backend,
        "twin_of": twin_of,
        "default_version": versions[0],
        "versions": [{"version": v, "state": "READY", "backend": backend} for v in versions],
    }


STATUS = {
    "models": [
        model("mlp", "onnxruntime"),
        model("mlp_torch", "torchserve", "mlp", (1, 2)),
        model("mlp_tf", "tensorflow", "mlp"),
        model("other_onnx", "onnxruntime"),
        model("affine", "onnxruntime"),
        model("affine_litert", "litert", "affine"),
        model("affine_keras", "keras", "affine"),
    ]
}


def test_backend_kinds_resolve_to_the_model_and_its_twins() -> None:
    targets = resolve_targets("mlp", "onnx,torchserve,tensorflow", None, STATUS)
    assert targets == [
        Target("onnxruntime", "mlp", 1),
        Target("torchserve", "mlp_torch", 1),
        Target("tensorflow", "mlp_tf", 1),
    ]
    # Default: MODEL, then its twins by name.
    assert resolve_targets("mlp", None, None, STATUS) == [targets[0], targets[2], targets[1]]


def test_the_litert_and_keras_twins_resolve_by_kind() -> None:
    assert resolve_targets("affine", "onnx,tflite,keras", None, STATUS) == [
        Target("onnxruntime", "affine", 1),
        Target("litert", "affine_litert", 1),
        Target("keras", "affine_keras", 1),
    ]


def test_model_names_and_versions_are_accepted_too() -> None:
    assert resolve_targets("mlp", "mlp,mlp_torch:2,other_onnx", None, STATUS) == [
        Target("onnxruntime", "mlp", 1),
        Target("torchserve", "mlp_torch", 2),
        Target("onnxruntime", "other_onnx", 1),
    ]
    assert resolve_targets("mlp_torch", None, "1,2", STATUS) == [
        Target("torchserve", "mlp_torch", 1),
        Target("torchserve", "mlp_torch", 2),
    ]


@pytest.mark.parametrize(
    ("model_name", "deployments", "versions", "message"),
    [
        (
            "mlp",
            "tfserving",
            None,
            r"no deployment of 'mlp' on tfserving: its deployments are mlp \(onnxruntime\)",
        ),
        ("nope", None, None, "the gateway has no model 'nope' loaded"),
        ("mlp", "onnx,mlp", None, "a deployment is named twice"),
        ("mlp", "mlp_torch:3", None, r"model 'mlp_torch' version 3 is not ready \(ready versions: 1, 2\)"),
        ("mlp", "gpu", None, "'gpu' is neither a backend"),
        ("mlp", "onnx", "1", "give --deployments or --versions, not both"),
    ],
)
def test_bad_deployments_are_clear_errors(
    model_name: str, deployments: str | None, versions: str | None, message: str
) -> None:
    with pytest.raises(BenchError, match=message):
        resolve_targets(model_name, deployments, versions, STATUS)


def test_flags_parse_or_say_why() -> None:
    assert parse_ints("1,4,16", "--concurrency") == (1, 4, 16)
    assert parse_duration("500ms") == pytest.approx(0.5)
    assert parse_duration("2") == 2.0
    assert parse_duration("0s", allow_zero=True) == 0.0
    for bad in ("0,4", "x", ""):
        with pytest.raises(BenchError, match="--concurrency takes positive integers"):
            parse_ints(bad, "--concurrency")
    for bad in ("ten", "0s", "-1s"):
        with pytest.raises(BenchError, match="--duration"):
            parse_duration(bad)


def read_report(folder: Path) -> dict[str, Any]:
    results: dict[str, Any] = json.loads((folder / "results.json").read_text())
    return results


def test_bench_against_a_running_gateway_writes_the_report(gateway: RunningGateway, tmp_path: Path) -> None:
    out = tmp_path / "report"
    run = modelyard(
        "bench", "affine", "--deployments", "onnx,tensorflow", "--url", gateway.url, "--grpc", gateway.grpc,
        "--protocol", "grpc", "--concurrency", "1,2", "--duration", "1s", "--warmup", "0.2s",
        "--out", str(out),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    results = read_report(out)
    rows = results["scenarios"]
    assert [(r["deployment"], r["concurrency"]) for r in rows] == [
        ("onnxruntime affine:1", 1),
        ("onnxruntime affine:1", 2),
        ("tensorflow affine_tf:1", 1),
        ("tensorflow affine_tf:1", 2),
    ]
    for row in rows:
        assert row["requests"] > 0 and row["errors"] == 0, row
        assert row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        # Both are in-process: the memory is the gateway's own, as /status reports it.
        assert row["rss_process"] == "gateway" and row["rss_mib"] > 0
        assert len(row["latency_quantiles_ms"]) == 200
        # The gateway's own split of the row's time: its backend call sits inside what the client saw.
        phases = row["phases_ms"]
        assert {"decode", "queue", "backend", "encode"} <= set(phases), phases
        assert 0 < phases["backend"] <= row["p99_ms"], phases
    assert results["generator_ceiling"]["requests"] > 0
    assert results["generator_ceiling"]["phases_ms"] == {}  # the no-op row is no deployment
    (parity,) = results["parity"]
    assert parity["deployment"] == "tensorflow affine_tf:1" and parity["within"]
    assert results["machine"]["cores"] and "onnxruntime" in results["machine"]
    # The bottom line, two verdicts on the generator, one per (batch, concurrency) naming the fastest.
    assert len(results["verdicts"]) == 5
    assert results["verdicts"][0].startswith("Bottom line: most throughput at c=")
    assert "no-op endpoint" in results["verdicts"][1] and "of a core busy" in results["verdicts"][2]
    assert all("affine" in line and "c=" in line for line in results["verdicts"][3:])
    assert all(row["generator_cpu"] > 0 for row in [*rows, results["generator_ceiling"]])
    with (out / "results.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(rows) + 1  # and the ceiling's row
    html = (out / "report.html").read_text()
    assert "Where the gateway's time went" in html
    assert html.count('src="data:image/png;base64,') == 3
    assert "http://" not in html.replace(gateway.url, "") and "https://" not in html  # nothing to fetch
    for png in ("latency_cdf.png", "throughput_vs_concurrency.png", "p99_vs_throughput.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")
    assert "onnxruntime affine:1" in run.stdout and "report:" in run.stdout


def test_bench_starts_a_gateway_when_given_no_url(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "model_repo" / "affine", repo / "affine")
    out = tmp_path / "report"
    rows = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)
    np.savez(tmp_path / "inputs.npz", x=rows)
    run = modelyard(
        "bench", "affine", "--versions", "1,2", "--model-repo", str(repo), "--concurrency", "1",
        "--duration", "1s", "--warmup", "0s", "--protocol", "rest-json", "--out", str(out),
        "--inputs", str(tmp_path / "inputs.npz"),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    results = read_report(out)
    assert [r["deployment"] for r in results["scenarios"]] == ["onnxruntime affine:1", "onnxruntime affine:2"]
    # Version 2 has other weights: the check counts its answers as errors, and parity says how far off.
    assert results["scenarios"][0]["errors"] == 0
    assert results["scenarios"][1]["errors"] > 0
    assert "differs" in results["scenarios"][1]["first_error"]
    # The parity rows ran on the file's rows: the largest difference is onnxruntime's own.
    outputs = [onnx_run(repo / "affine" / v / "model.onnx", rows) for v in ("1", "2")]
    assert not results["parity"][0]["within"]
    assert results["parity"][0]["max_abs"] == pytest.approx(np.abs(outputs[1] - outputs[0]).max(), rel=1e-6)
    assert (out / "gateway.log").exists()


def onnx_run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    output: np.ndarray = session.run(None, {"x": x})[0]
    return output.astype(np.float64)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--protocol", "carrier-pigeon"], "--protocol must be one of rest-json, rest-binary, grpc"),
        (["--concurrency", "0"], "--concurrency takes positive integers"),
        (["--url", "http://127.0.0.1:9"], "no gateway at http://127.0.0.1:9"),
    ],
)
def test_usage_errors_exit_2_without_a_traceback(args: list[str], message: str, tmp_path: Path) -> None:
    run = modelyard("bench", "affine", "--out", str(tmp_path / "r"), *args, timeout=60)
    assert run.returncode == 2, run.stderr
    assert message in run.stderr and "Traceback" not in run.stderr


def scenario(deployment: str, clients: int, req_per_s: float, p99_ms: float, cpu: float = 0.3) -> Scenario:
    return Scenario(
        deployment, "onnxruntime", deployment, 1, "grpc", 1, clients, int(req_per_s), req_per_s,
        p99_ms / 2, p99_ms / 1.5, p99_ms, 0, None, None, None, cpu, [],
    )  # fmt: skip


def test_verdicts_are_computed_from_the_rows() -> None:
    plan = BenchPlan("m", "grpc", (1, 16), (1,), 1.0, 0.0)
    rows = [
        scenario("fast", 1, 900.0, 2.0),
        scenario("slow", 1, 300.0, 6.0),
        scenario("fast", 16, 1000.0, 30.0),
        scenario("slow", 16, 0.0, float("nan")),
    ]
    ceilings = [scenario("no-op", 16, 4000.0, 5.0, cpu=0.9), scenario("no-op", 16, 3000.0, 5.0, cpu=0.9)]
    result = BenchResult(plan, "http://x", {}, ceilings[0], rows, [], ceilings)
    lines = verdicts(result)
    assert lines[0] == (
        "Bottom line: most throughput at c=16: fast (1000 req/s); lowest latency at c=1: fast "
        f"(p50 {rows[0].p50_ms:.2f} ms); errors from slow."
    )
    assert "takes 4000 req/s at c=16 (runs before and after: 4000 and 3000)" in lines[1]
    assert lines[1].endswith("reached 25% of it: the backends, not request handling, set the pace.")
    # The no-op row saturates the generator by design; the others are what count.
    assert "at most 0.30 of a core busy (fast, c=1)" in lines[2] and lines[2].endswith("it had headroom.")
    assert lines[3] == (
        f"c=1, batch 1: fast is fastest, 900 req/s at p99 2.00 ms: {900 / 300:.1f}x slow (a p99 {6 / 2:.1f}x lower)."
    )
    assert lines[4] == "c=16, batch 1: fast is fastest, 1000 req/s at p99 30.00 ms. No answers from slow."


def test_a_disturbed_ceiling_is_called_noise() -> None:
    plan = BenchPlan("m", "grpc", (16,), (1,), 1.0, 0.0)
    slow = scenario("no-op", 16, 80.0, 900.0)
    result = BenchResult(plan, "http://x", {}, slow, [scenario("fast", 16, 160.0, 70.0)], [], [slow])
    assert "the no-op runs were disturbed" in verdicts(result)[1]


def without_matplotlib(tmp_path: Path) -> dict[str, str]:
    """An environment whose `import matplotlib` fails as it does where the package is missing."""
    shim = tmp_path / "shim" / "matplotlib"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'matplotlib'\")\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "shim"), str(ROOT)])}


def test_bench_without_matplotlib_stops_before_measuring(gateway: RunningGateway, tmp_path: Path) -> None:
    out = tmp_path / "report"
    run = subprocess.run(
        [sys.executable, "-m", "gateway", "bench", "affine", "--deployments", "onnx", "--url", gateway.url,
         "--grpc", gateway.grpc, "--duration", "1s", "--warmup", "0s", "--concurrency", "1", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=120, env=without_matplotlib(tmp_path),
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "need matplotlib" in run.stderr and "pip install" in run.stderr and "'lab'" in run.stderr
    assert "Traceback" not in run.stderr
    # Nothing was measured: no report folder was made, no row printed.
    assert not out.exists()
    assert "modelyard bench affine" not in run.stdout


def test_a_report_without_matplotlib_keeps_the_measurements(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.tools.lab.report import ReportError, write_report

    plan = BenchPlan("m", "grpc", (1,), (1,), 1.0, 0.0)
    ceiling = scenario("no-op", 1, 4000.0, 5.0)
    result = BenchResult(plan, "http://x", {}, ceiling, [scenario("fast", 1, 900.0, 2.0)], [], [ceiling])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with pytest.raises(ReportError, match="need matplotlib") as raised:
        write_report(result, tmp_path / "report")
    assert str(tmp_path / "report" / "results.json") in str(raised.value)
    rows = list(csv.DictReader((tmp_path / "report" / "results.csv").read_text().splitlines()))
    assert [row["deployment"] for row in rows] == ["fast", "no-op"]
    assert (
        json.loads((tmp_path / "report" / "results.json").read_text())["scenarios"][0]["req_per_s"] == 900.0
    )
