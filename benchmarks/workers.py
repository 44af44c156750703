"""`modelyard serve --workers N` against one worker: the example mlp (ONNX, 64 -> 256 -> 256 -> 10),
batch-1 requests from h2load over REST JSON and gRPC, and each worker's memory.

    python benchmarks/workers.py [--workers 1,2] [--concurrency 16] [--duration 10] [--warmup 2] [--memory-only] [--out FILE]

The gateway may use every core (it is not pinned); h2load is pinned to CPU 1, as in the other
benchmarks. On a 2-vCPU machine the load generator therefore shares a core with the workers, and the ratio says less
than a machine with cores to spare would show. Memory: each worker's RSS as the gateway's
/status reports it, and the supervisor's, for an ONNX-only repository (the example's ONNX models)
and for the example repository without mlp_torch (its managed TorchServe is refused with workers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from drive import (
    H2LOAD,
    READY_TIMEOUT_S,
    Endpoint,
    Payload,
    Row,
    check_rest,
    free_port,
    grpc_row,
    make_input,
    reference,
    rest_row,
    server,
    stop_servers_on_sigterm,
    v2_body,
)
from memory import emit

ROOT = Path(__file__).resolve().parent.parent
ONNX_MODELS = ("mlp", "affine", "text_normalizer")
# The example repository's models that run in the gateway's own processes.
IN_PROCESS_MODELS = (*ONNX_MODELS, "affine_tf", "affine_keras", "affine_litert", "mlp_tf")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2", help="worker counts to compare, first is the base")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--no-memory", action="store_true", help="skip the example repository's memory row")
    parser.add_argument("--memory-only", action="store_true", help="measure memory only, no load rows")
    parser.add_argument("--out", type=Path)
    return parser.parse_args()


def build_repo(repo: Path, models: tuple[str, ...]) -> Path:
    for model in models:
        shutil.copytree(ROOT / "model_repo" / model, repo / model)
    return repo


def status(base: str) -> dict[str, object]:
    with urllib.request.urlopen(f"{base}/status", timeout=10) as response:
        answer: dict[str, object] = json.load(response)
        return answer


@contextmanager
def workers_gateway(repo: Path, workers: int) -> Iterator[tuple[str, Endpoint, list[dict[str, int]], int]]:
    """The gateway with `workers` workers on every core; yields (base URL, endpoint, the status's
    workers once all serve, the RSS of the supervisor or 0 without one)."""
    http_port, grpc_port = free_port(), free_port()
    command = [sys.executable, "-m", "gateway", "serve", "--model-repo", str(repo), "--host", "127.0.0.1"]
    command += ["--http-port", str(http_port), "--grpc-port", str(grpc_port), "--workers", str(workers)]
    base = f"http://127.0.0.1:{http_port}"
    endpoint = Endpoint("modelyard", f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}")
    with server("modelyard", command, f"{base}/v2/health/ready", ROOT, dict(os.environ)) as running:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            rows = status(base)["workers"]
            assert isinstance(rows, list)
            if len(rows) == workers and all(row["ready"] for row in rows):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the workers did not all serve: {rows}")
            time.sleep(0.2)
        supervisor = psutil.Process(running.pid).memory_info().rss if workers > 1 else 0
        yield base, endpoint, rows, supervisor


def cpu_seconds(pids: list[int]) -> list[float]:
    times = [psutil.Process(pid).cpu_times() for pid in pids]
    return [t.user + t.system for t in times]


def measured(pids: list[int], run: Callable[[], Row | None]) -> tuple[Row, str]:
    """A row, and the CPU seconds each worker spent on it: how evenly the kernel spread the
    connections, and how busy each worker was."""
    before = cpu_seconds(pids)
    row = run()
    assert row is not None
    spent = [after - first for after, first in zip(cpu_seconds(pids), before, strict=True)]
    return row, " / ".join(f"{value:.1f}" for value in spent)


def mib(value: float) -> str:
    return f"{value / 2**20:.0f}"


def memory_line(name: str, workers: int, rows: list[dict[str, int]], supervisor: int) -> str:
    each = ", ".join(mib(row["rss_bytes"]) for row in rows)
    total = sum(row["rss_bytes"] for row in rows) + supervisor
    return f"| {name} | {workers} | {each} | {mib(supervisor) if supervisor else '-'} | {mib(total)} |"


def main() -> None:
    args = parse_args()
    stop_servers_on_sigterm()
    if shutil.which(H2LOAD) is None and not args.memory_only:
        raise SystemExit("workers.py needs h2load: apt-get install nghttp2-client (make bench-tools)")
    counts = [int(n) for n in args.workers.split(",")]
    load_before = " ".join(f"{value:.1f}" for value in os.getloadavg())
    x = make_input()
    expected = reference(x)
    rows: dict[tuple[int, str], tuple[Row, str]] = {}
    memory: list[str] = []
    with tempfile.TemporaryDirectory(prefix="modelyard-workers-bench-") as tmp:
        work = Path(tmp)
        onnx_repo = build_repo(work / "onnx", ONNX_MODELS)
        payload = Payload(work / "body.json", "application/json")
        payload.file.write_bytes(v2_body(x))
        for count in counts:
            with workers_gateway(onnx_repo, count) as (base, endpoint, workers, supervisor):
                memory.append(
                    memory_line("ONNX only (" + ", ".join(ONNX_MODELS) + ")", count, workers, supervisor)
                )
                if args.memory_only:
                    continue
                url = f"{base}/v2/models/mlp/infer"
                check = check_rest(url, payload.file.read_bytes(), expected)
                pids = [worker["pid"] for worker in workers]
                name = f"workers={count}"
                rest = partial(rest_row, name, "REST JSON", url, args.concurrency, args, payload, check, work)
                rows[count, "REST JSON"] = measured(pids, rest)
                rows[count, "gRPC"] = measured(
                    pids, partial(grpc_row, name, endpoint, args.concurrency, args, work)
                )
        if not args.no_memory:
            example = build_repo(work / "example", IN_PROCESS_MODELS)
            for count in sorted({1, max(counts)}):
                with workers_gateway(example, count) as (_, _, workers, supervisor):
                    memory.append(memory_line("example without mlp_torch", count, workers, supervisor))
    lines = [] if args.memory_only else load_table(args, counts, rows)
    lines += [
        f"- load average before the run: {load_before}; the machine is shared, so compare runs, not rows",
        "",
        "## Memory (RSS, MiB, after loading, before load)",
        "",
        "| repository | workers | each worker | supervisor | total |",
        "|---|---:|---|---:|---:|",
        *memory,
    ]
    emit(lines, args.out)


def load_table(
    args: argparse.Namespace, counts: list[int], rows: dict[tuple[int, str], tuple[Row, str]]
) -> list[str]:
    base_count = counts[0]
    lines = [
        f"# --workers, mlp (ONNX), batch-1 requests, concurrency {args.concurrency}",
        "",
        f"- {args.duration:g} s per row after {args.warmup:g} s warm-up, h2load (REST over HTTP/1.1); the "
        f"gateway on all {os.cpu_count()} CPUs, h2load pinned to CPU 1, so the generator shares "
        "a core with the gateway",
        "",
        "| workers | protocol | req/s | p50 ms | p99 ms | requests | errors | vs first | CPU s per worker | check |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for count in counts:
        for protocol in ("REST JSON", "gRPC"):
            (row, cpu), (first, _) = rows[count, protocol], rows[base_count, protocol]
            lines.append(
                f"| {count} | {protocol} | {row.req_per_s:.0f} | {row.p50_ms:.2f} | {row.p99_ms:.2f} | "
                f"{row.requests} | {row.errors} | {row.req_per_s / first.req_per_s:.2f}x | {cpu} | {row.check} |"
            )
    return [*lines, ""]


if __name__ == "__main__":
    main()
