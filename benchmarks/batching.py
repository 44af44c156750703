"""Dynamic batching on the heavy MLP (1024 -> 2048 -> 2048 -> 10): the same model served twice by
one gateway, batching off and on, under the same load from h2load: gRPC, then REST binary.
The model (25 MB) is built here from fixed seeds rather than committed.

Prints a markdown table (and writes it with --out): req/s, p50, p99, errors, the mean batch the
gateway's metrics saw, and its two goals: the speed-up, and p99 against max_queue_delay plus
one full batch's compute (measured here, in-process, on the server's CPU).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from drive import (
    H2LOAD,
    Endpoint,
    Row,
    binary_payload,
    check_v2_binary,
    gateway,
    grpc_row,
    rest_row,
    stop_servers_on_sigterm,
)
from memory import emit

from scripts.build_models import _save, build_mlp

SIZES = (1024, 2048, 2048, 10)
MAX_BATCH = 16
DELAY_US = 6000
PROTOCOLS = ("gRPC", "REST binary")
CONFIGS = {
    "heavy": "backend: onnxruntime\n",
    "heavy_batched": (
        "backend: onnxruntime\n"
        f"batching: {{max_batch_size: {MAX_BATCH}, max_queue_delay_us: {DELAY_US}, max_concurrent_batches: 1}}\n"
    ),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--out", type=Path)
    return parser.parse_args()


def batch_compute_ms(model: Path) -> float:
    """Median in-process run time of one full batch, single-threaded as the gateway runs it."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((MAX_BATCH, SIZES[0])).astype(np.float32)
    times = []
    for _ in range(20):
        started = time.perf_counter()
        session.run(None, {"input": x})
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


COMPUTE_HISTOGRAM = "modelyard_compute_duration_seconds"


def histogram_totals(base: str, model: str, histogram: str = "modelyard_batch_size") -> tuple[float, float]:
    """The (sum, count) of one of the gateway's histograms for one model, now (summed over the
    model's series: one per version and backend)."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as response:
        metrics = response.read().decode()

    def value(series: str) -> float:
        pattern = rf'^{histogram}_{series}{{[^}}]*model="{model}"[^}}]*}} (\S+)$'
        return sum(float(found.group(1)) for found in re.finditer(pattern, metrics, re.M))

    return value("sum"), value("count")


def build_repo(repo: Path, configs: dict[str, str]) -> Path:
    """The heavy MLP (fixed seeds) once per config in `repo`; the first copy's model.onnx path."""
    first = None
    for name, config in configs.items():
        path = repo / name / "1" / "model.onnx"
        _save(build_mlp(SIZES, seed=11, name=name), path)
        (repo / name / "config.yaml").write_text(config)
        first = first or path
    assert first is not None
    return first


def measure(
    name: str,
    protocol: str,
    args: argparse.Namespace,
    base: str,
    endpoint: Endpoint,
    work: Path,
    x: np.ndarray,
    expected: np.ndarray,
) -> tuple[Row, float]:
    """One row for one model over one protocol at `args.concurrency`, and the mean batch the
    gateway formed during it. The row's compute_ms is the mean time the gateway's backend call
    took per request during it (its modelyard_compute_duration_seconds)."""
    before = histogram_totals(base, name)
    computed_before = histogram_totals(base, name, COMPUTE_HISTOGRAM)
    if protocol == "gRPC":
        row = grpc_row("modelyard", endpoint, args.concurrency, args, work, name, x=x, expected=expected)
    else:
        payload = binary_payload(work / f"{name}.rest.bin", x)
        url = f"{base}/v2/models/{name}/infer"
        check = check_v2_binary(url, payload, expected)
        found = rest_row("modelyard", protocol, url, args.concurrency, args, payload, check, work, name)
        if found is None:
            raise SystemExit("batching.py's REST rows need h2load or hey (make bench-tools)")
        row = found
    after = histogram_totals(base, name)
    computed_after = histogram_totals(base, name, COMPUTE_HISTOGRAM)
    count = after[1] - before[1]
    computed = computed_after[1] - computed_before[1]
    if computed:
        row = replace(row, compute_ms=(computed_after[0] - computed_before[0]) * 1000 / computed)
    return row, (after[0] - before[0]) / count if count else 1.0


def main() -> None:
    args = parse_args()
    stop_servers_on_sigterm()
    if shutil.which(H2LOAD) is None:
        raise SystemExit("batching.py needs h2load: apt-get install nghttp2-client (make bench-tools)")
    results: dict[tuple[str, str], tuple[Row, float]] = {}
    with tempfile.TemporaryDirectory(prefix="modelyard-batching-") as tmp:
        work = Path(tmp)
        repo = work / "repo"
        onnx_path = build_repo(repo, CONFIGS)
        compute_ms = batch_compute_ms(onnx_path)
        x = np.random.default_rng(0).standard_normal((1, SIZES[0])).astype(np.float32)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        expected = ort.InferenceSession(str(onnx_path), options).run(None, {"input": x})[0]
        with gateway(repo, "/v2/health/ready") as (base, endpoint, _):
            for protocol in PROTOCOLS:
                for name in CONFIGS:
                    results[name, protocol] = measure(name, protocol, args, base, endpoint, work, x, expected)
    bound = DELAY_US / 1000 + compute_ms
    lines = [
        f"# Dynamic batching, heavy MLP {' -> '.join(map(str, SIZES))}, batch-1 requests, "
        f"concurrency {args.concurrency}",
        "",
        f"- {args.duration:g} s per row after {args.warmup:g} s warm-up; gRPC and REST binary (Triton's "
        f"binary extension) from h2load; one gateway on CPU 0, the generator on CPU 1; one full "
        f"batch ({MAX_BATCH} rows) computes in {compute_ms:.2f} ms in-process (median of 20)",
        "",
        "| protocol | model config | req/s | p50 ms | p99 ms | requests | errors | mean batch | check |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    verdicts = []
    for protocol in PROTOCOLS:
        for name, label in (
            ("heavy", "no batching"),
            ("heavy_batched", f"`{CONFIGS['heavy_batched'].splitlines()[1]}`"),
        ):
            row, batch = results[name, protocol]
            lines.append(
                f"| {protocol} | {label} | {row.req_per_s:.0f} | {row.p50_ms:.2f} | {row.p99_ms:.2f} | "
                f"{row.requests} | {row.errors} | {batch:.1f} | {row.check} |"
            )
        (off, _), (on, _) = results["heavy", protocol], results["heavy_batched", protocol]
        verdicts += [
            f"- {protocol}: throughput with batching {on.req_per_s / off.req_per_s:.2f}x without (goal >= 2.5x): "
            f"{'met' if on.req_per_s >= 2.5 * off.req_per_s else 'NOT met'}",
            f"- {protocol}: p99 with batching {on.p99_ms:.2f} ms vs max_queue_delay + one batch's compute = "
            f"{bound:.2f} ms: {'met' if on.p99_ms <= bound else 'NOT met'}",
        ]
    emit([*lines, "", *verdicts], args.out)


if __name__ == "__main__":
    main()
