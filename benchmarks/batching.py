"""Dynamic batching on the heavy MLP (1024 -> 2048 -> 2048 -> 10): the same model served twice by
one gateway, batching off and on, under the same gRPC load from h2load (load.py where h2load is
missing). The model (25 MB) is built here from fixed seeds rather than committed.

Prints a markdown table (and writes it with --out): req/s, p50, p99, errors, the mean batch the
gateway's metrics saw, and issue 6's two checks: the speed-up, and p99 against max_queue_delay plus
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

from peers import (
    H2LOAD,
    Row,
    check_grpc,
    gateway,
    grpc_frame,
    grpc_infer_request,
    h2load_row,
)

from scripts.build_models import _save, build_mlp

SIZES = (1024, 2048, 2048, 10)
MAX_BATCH = 16
DELAY_US = 6000
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


def mean_batch(metrics: str, model: str) -> float:
    def value(series: str) -> float:
        found = re.search(
            rf'^modelyard_batch_size_{series}{{[^}}]*model="{model}"[^}}]*}} (\S+)$', metrics, re.M
        )
        return float(found.group(1)) if found else 0.0

    count = value("count")
    return value("sum") / count if count else 1.0


def main() -> None:
    args = parse_args()
    if shutil.which(H2LOAD) is None:
        raise SystemExit("batching.py needs h2load: apt-get install nghttp2-client (make bench-tools)")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="modelyard-batching-") as tmp:
        work = Path(tmp)
        repo = work / "repo"
        for name, config in CONFIGS.items():
            _save(build_mlp(SIZES, seed=11, name=name), repo / name / "1" / "model.onnx")
            (repo / name / "config.yaml").write_text(config)
        onnx_path = repo / "heavy" / "1" / "model.onnx"
        compute_ms = batch_compute_ms(onnx_path)
        x = np.random.default_rng(0).standard_normal((1, SIZES[0])).astype(np.float32)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        expected = ort.InferenceSession(str(onnx_path), options).run(None, {"input": x})[0]
        with gateway(repo, "/v2/health/ready") as (base, endpoint, _):
            assert endpoint.grpc is not None
            for name in CONFIGS:
                request = grpc_infer_request(name, "", x)
                check, frame_size = check_grpc(endpoint.grpc, request, expected)
                body = work / f"{name}.bin"
                body.write_bytes(grpc_frame(request))
                url = f"http://{endpoint.grpc}/inference.GRPCInferenceService/ModelInfer"
                row = h2load_row(name, url, args.concurrency, args, body, frame_size, work)
                rows.append(replace(row, check=check))
            with urllib.request.urlopen(f"{base}/metrics", timeout=30) as response:
                metrics = response.read().decode()
    off, on = rows
    batch = mean_batch(metrics, "heavy_batched")
    bound = DELAY_US / 1000 + compute_ms
    lines = [
        f"# Dynamic batching, heavy MLP {' -> '.join(map(str, SIZES))}, gRPC batch-1 requests, "
        f"concurrency {args.concurrency}",
        "",
        f"- {args.duration:g} s per row after {args.warmup:g} s warm-up, generator `{off.generator}`; "
        f"one full batch ({MAX_BATCH} rows) computes in {compute_ms:.2f} ms in-process (median of 20)",
        "",
        "| model config | req/s | p50 ms | p99 ms | requests | errors | mean batch | check |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
        f"| no batching | {off.req_per_s:.0f} | {off.p50_ms:.2f} | {off.p99_ms:.2f} | {off.requests} | "
        f"{off.errors} | 1 | {off.check} |",
        f"| `{CONFIGS['heavy_batched'].splitlines()[1]}` | {on.req_per_s:.0f} | {on.p50_ms:.2f} | "
        f"{on.p99_ms:.2f} | {on.requests} | {on.errors} | {batch:.1f} | {on.check} |",
        "",
        f"- throughput with batching: {on.req_per_s / off.req_per_s:.2f}x without (goal >= 2.5x): "
        f"{'met' if on.req_per_s >= 2.5 * off.req_per_s else 'NOT met'}",
        f"- p99 with batching {on.p99_ms:.2f} ms vs max_queue_delay + one batch's compute = {bound:.2f} ms: "
        f"{'met' if on.p99_ms <= bound else 'NOT met'}",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
