"""The gateway's memory: RSS with the example repository loaded, idle, then after each of two load
runs, to show whether it grows. Not a test: run it by hand or through `make bench`.

    python benchmarks/memory.py [--duration 60] [--concurrency 8] [--repo model_repo]

RSS counts the gateway process and its children (TorchServe's Java frontend and workers are
children of a gateway that manages them); the table shows both.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil

from gateway import net
from gateway.net import free_port

ROOT = Path(__file__).resolve().parent.parent


READY_TIMEOUT_S = 180.0


def wait_ready(base: str, server: subprocess.Popen[bytes]) -> None:
    try:
        net.wait_ready(base, READY_TIMEOUT_S, process=server, interval_s=0.2)
    except net.NotReady as exc:
        raise SystemExit(f"the gateway: {exc}") from None


def emit(lines: list[str], out: Path | None) -> None:
    """Print a report, and write it to `out` where given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)


def rss_mib(process: psutil.Process) -> tuple[float, float]:
    """(the gateway's own RSS, the RSS of the gateway and all its children), in MiB."""
    own = process.memory_info().rss
    children = 0
    for child in process.children(recursive=True):
        try:
            children += child.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return own / 2**20, (own + children) / 2**20


def load(http: int, grpc: int, duration: int, concurrency: int) -> None:
    command = [
        sys.executable, str(ROOT / "benchmarks" / "load.py"), "--http", f"127.0.0.1:{http}",
        "--grpc", f"127.0.0.1:{grpc}", "--modes", "rest-json,grpc", "--duration", str(duration // 2),
        "--concurrency", str(concurrency), "--warmup", "1",
    ]  # fmt: skip
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repo", type=Path, default=ROOT / "model_repo")
    parser.add_argument("--duration", type=int, default=60, help="seconds of load in each run")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()

    http, grpc = free_port(), free_port()
    command = [
        sys.executable, "-m", "gateway", "serve", "--model-repo", str(args.repo), "--http-port", str(http),
        "--grpc-port", str(grpc), "--log-level", "warning",
    ]  # fmt: skip
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{http}", server)
        process = psutil.Process(server.pid)
        time.sleep(2)
        rows = [("idle, repository loaded", *rss_mib(process))]
        for run in (1, 2):
            load(http, grpc, args.duration, args.concurrency)
            time.sleep(2)
            rows.append(
                (f"after load run {run} ({args.duration} s, c={args.concurrency})", *rss_mib(process))
            )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)

    growth = rows[2][1] - rows[1][1]
    lines = [
        f"# gateway memory: {args.repo.name}, {os.cpu_count()} CPUs, load = benchmarks/load.py rest-json + grpc on mlp",
        "",
        f"- {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, `{' '.join(['benchmarks/memory.py', *sys.argv[1:]])}`",
        "",
        "| when | gateway RSS MiB | with children MiB |",
        "|---|---:|---:|",
        *(f"| {label} | {own:.0f} | {total:.0f} |" for label, own, total in rows),
        "",
        f"growth of the gateway's RSS between the two load runs: {growth:+.1f} MiB",
    ]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
