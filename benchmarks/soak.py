"""Soak: the gateway on the example repository under sustained load for minutes, good and hostile
requests together, with its RSS sampled throughout, to show whether memory grows. Not a test: run it
by hand (`make soak`).

    python benchmarks/soak.py [--minutes 5] [--segment 30] [--sample 5] [--concurrency 8]
        [--slowloris 100] [--big-headers 20] [--out FILE]

The good load is benchmarks/load.py on `mlp`, REST JSON, REST binary and gRPC in turn, in segments
of --segment seconds until --minutes have passed; every tenth answer is checked against onnxruntime.
Beside it, one client sends a fixed cycle of bad requests (malformed JSON, wrong shapes, a truncated
binary body, unknown models and versions, a body over the size limit) and counts the answers: each
must be a 4xx. And rounds of hostile connections: slowloris connections trickling a header byte
every 3 s and unfinished 8 MB headers, held past the header timeout; each slowloris connection must
be closed by the gateway and each big header answered 431. The report gives the RSS samples, the
growth between the first and the last minute, a least-squares slope, and the request and error
counts; the script exits 1 when a good request failed, a bad one was answered with anything but a
4xx, or a hostile connection was held.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil
from memory import ROOT, emit, free_port, rss_mib, wait_ready

from gateway.tools.hostile import HostileConnections

MIB = 2**20
TRUNCATED_HEADER = b'{"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "parameters": {"binary_data_size": 256}}]}'
# (path, body, headers), all POSTed: each is wrong in a different way, and each must be refused with a 4xx.
BAD_REQUESTS: tuple[tuple[str, bytes, dict[str, str]], ...] = (
    ("/v2/models/mlp/infer", b'{"inputs": [', {}),
    (
        "/v2/models/mlp/infer",
        b'{"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1, 2]}]}',
        {},
    ),
    (
        "/v2/models/mlp/infer",
        b'{"inputs": [{"name": "nope", "shape": [1, 64], "datatype": "FP32", "data": []}]}',
        {},
    ),
    (
        "/v2/models/mlp/infer",
        b'{"inputs": [{"name": "input", "shape": [1, 64], "datatype": "INT8", "data": [1]}]}',
        {},
    ),
    # A binary body whose tensor is cut short: 16 of the 256 bytes its header announces.
    (
        "/v2/models/mlp/infer",
        TRUNCATED_HEADER + b"\x00" * 16,
        {"Inference-Header-Content-Length": str(len(TRUNCATED_HEADER))},
    ),
    ("/v2/models/no_such_model/infer", b'{"inputs": []}', {}),
    ("/v2/models/mlp/versions/99/infer", b'{"inputs": []}', {}),
    ("/v2/models/..%2F..%2Fetc/infer", b'{"inputs": []}', {}),
    ("/v1/models/mlp:predict", b'{"instances": [[1, 2]]}', {}),
    ("/v2/models/mlp/infer", b"[" * 5000 + b"]" * 5000, {}),
)


class HostileClient(threading.Thread):
    """Sends BAD_REQUESTS in a cycle until stopped, and counts the answers by status."""

    def __init__(self, base: str, oversize: int) -> None:
        super().__init__(daemon=True)
        self.base = base
        self.oversize = oversize
        self.stop = threading.Event()
        self.codes: Counter[str] = Counter()

    def run(self) -> None:
        requests = [*BAD_REQUESTS, ("/v2/models/mlp/infer", b" " * self.oversize, {})]
        with httpx.Client(base_url=self.base, timeout=30) as client:
            while not self.stop.is_set():
                for path, body, headers in requests:
                    try:
                        code = str(client.post(path, content=body, headers=headers).status_code)
                    except httpx.TransportError as exc:
                        code = type(exc).__name__
                    self.codes[code] += 1
                self.stop.wait(0.05)


class ConnectionAttacker(threading.Thread):
    """Rounds of hostile connections until stopped: each round opens `slowloris` connections that
    trickle a header byte every 3 s and `big_headers` that start an 8 MB header and never end it,
    holds them past the gateway's header timeout, then counts what the gateway did with them."""

    def __init__(self, port: int, slowloris: int, big_headers: int, hold_s: float) -> None:
        super().__init__(daemon=True)
        self.port, self.slowloris, self.big_headers, self.hold_s = port, slowloris, big_headers, hold_s
        self.stop = threading.Event()
        self.rounds = 0
        self.totals: Counter[str] = Counter()

    def run(self) -> None:
        while not self.stop.is_set():
            with HostileConnections(self.port, self.slowloris, self.big_headers) as attack:
                if self.stop.wait(self.hold_s):
                    return  # cut short: not a round
                self.totals.update(attack.outcome())
            self.rounds += 1


def slope_mib_per_min(samples: list[tuple[float, float]]) -> float:
    """The least-squares slope of RSS (MiB) over time (minutes)."""
    if len(samples) < 2:
        return 0.0
    return statistics.linear_regression([t / 60 for t, _ in samples], [rss for _, rss in samples]).slope


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repo", type=Path, default=ROOT / "model_repo")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--segment", type=int, default=30, help="seconds per load.py mode")
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--max-body-mib",
        type=int,
        default=8,
        help="the body limit the gateway gets here, for the oversize request",
    )
    parser.add_argument("--slowloris", type=int, default=100, help="slowloris connections per round")
    parser.add_argument("--big-headers", type=int, default=20, help="unfinished 8 MB headers per round")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    http, grpc = free_port(), free_port()
    base = f"http://127.0.0.1:{http}"
    command = [
        sys.executable, "-m", "gateway", "serve", "--model-repo", str(args.repo), "--host", "127.0.0.1",
        "--http-port", str(http), "--grpc-port", str(grpc), "--log-level", "warning",
    ]  # fmt: skip
    env = {**os.environ, "MODELYARD_MAX_REQUEST_BODY_MB": str(args.max_body_mib)}
    server = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    samples: list[tuple[float, float, float]] = []  # (seconds since start, own MiB, with children MiB)
    totals: Counter[str] = Counter()
    hostile = HostileClient(base, (args.max_body_mib + 1) * MIB)
    # Held past the gateway's default 10 s header timeout, so every round sees it close them.
    attacker = ConnectionAttacker(http, args.slowloris, args.big_headers, hold_s=13)
    try:
        wait_ready(base, server)
        process = psutil.Process(server.pid)
        started = time.monotonic()
        samples.append((0.0, *rss_mib(process)))
        hostile.start()
        attacker.start()
        with tempfile.TemporaryDirectory(prefix="modelyard-soak-") as tmp:
            segment = 0
            while time.monotonic() - started < args.minutes * 60:
                mode = ("rest-json", "rest-binary", "grpc")[segment % 3]
                out = Path(tmp) / f"{segment}.json"
                load = subprocess.Popen(
                    [
                        sys.executable,
                        str(ROOT / "benchmarks" / "load.py"),
                        "--http",
                        f"127.0.0.1:{http}",
                        "--grpc",
                        f"127.0.0.1:{grpc}",
                        "--modes",
                        mode,
                        "--duration",
                        str(args.segment),
                        "--concurrency",
                        str(args.concurrency),
                        "--warmup",
                        "0",
                        "--json-out",
                        str(out),
                    ],
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                )
                while load.poll() is None:
                    time.sleep(args.sample)
                    samples.append((time.monotonic() - started, *rss_mib(process)))
                if load.returncode != 0:
                    raise SystemExit(f"load.py exited with {load.returncode} in segment {segment}")
                for row in json.loads(out.read_text())["rows"]:
                    totals[f"{row['mode']} requests"] += row["requests"]
                    totals[f"{row['mode']} errors"] += row["errors"]
                segment += 1
                if server.poll() is not None:
                    raise SystemExit(f"the gateway exited with {server.returncode} during the soak")
    finally:
        hostile.stop.set()
        attacker.stop.set()
        hostile.join(60)
        attacker.join(60)
        server.send_signal(signal.SIGTERM)
        server.wait(60)

    elapsed = samples[-1][0]
    first = [own for t, own, _ in samples if t <= 60]
    last = [own for t, own, _ in samples if t >= elapsed - 60]
    growth = statistics.mean(last) - statistics.mean(first)
    slope = slope_mib_per_min([(t, own) for t, own, _ in samples])
    bad_5xx = sum(n for code, n in hostile.codes.items() if not code.startswith("4"))
    lines = [
        f"# Soak: {args.repo.name}, {elapsed / 60:.1f} min, load.py on mlp at c={args.concurrency} plus hostile requests",
        "",
        f"- {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, `{' '.join(['benchmarks/soak.py', *sys.argv[1:]])}`",
        f"- good requests: {', '.join(f'{k}: {v}' for k, v in sorted(totals.items()))}",
        f"- hostile requests by answer: {', '.join(f'{k}: {v}' for k, v in sorted(hostile.codes.items()))}"
        f" ({bad_5xx} not a 4xx)",
        f"- hostile connections: {attacker.rounds} rounds of {args.slowloris} slowloris + {args.big_headers} "
        f"unfinished 8 MB headers; slowloris still held after 13 s: {attacker.totals['slowloris still held']} "
        f"of {attacker.rounds * args.slowloris}; big headers answered 431: "
        f"{attacker.totals['big headers answered 431']} of {attacker.rounds * args.big_headers}",
        f"- gateway RSS: first minute {statistics.mean(first):.1f} MiB, last minute {statistics.mean(last):.1f} MiB, "
        f"growth {growth:+.1f} MiB; least-squares slope {slope:+.2f} MiB/min over {len(samples)} samples",
        "",
        "| t (s) | gateway RSS MiB | with children MiB |",
        "|---:|---:|---:|",
        *(
            f"| {t:.0f} | {own:.1f} | {total:.1f} |"
            for t, own, total in samples[:: max(1, len(samples) // 20)]
        ),
    ]
    emit(lines, args.out)
    good_errors = sum(n for key, n in totals.items() if key.endswith("errors"))
    connections_held = attacker.totals["slowloris still held"]
    headers_missed = attacker.rounds * args.big_headers - attacker.totals["big headers answered 431"]
    if bad_5xx or good_errors or connections_held or headers_missed:
        raise SystemExit(
            f"soak failed: {good_errors} good requests in error, {bad_5xx} bad ones not refused with a 4xx, "
            f"{connections_held} slowloris connections held, {headers_missed} big headers not answered 431"
        )


if __name__ == "__main__":
    main()
