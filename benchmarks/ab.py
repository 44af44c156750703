"""A/B of the gateway's hot path: server CPU time per request, variant against variant.

    python benchmarks/ab.py --variant base=. --variant candidate=/tmp/checkout [--canned canned=.] \
        [--protocol grpc|rest-json|rest-binary] [--concurrency 8] [--requests 20000] [--rounds 5]

Each variant is a checkout of this repository; its gateway (`python -m gateway serve` from that
checkout's root, so that its own code is imported) serves that checkout's model_repo/mlp alone,
pinned to CPU 0. `--canned` adds a checkout's benchmarks/canned.py, the floor. The variants are all started first, then driven in turn,
round after round, by h2load pinned to CPU 1 with the same fixed number of requests, so that a
slow spell of the shared machine lands on every variant alike.

The figure is the server process's CPU time (user + system, all its threads, from /proc) divided
by the requests it answered: what a request costs the server, which other processes on the same
core do not change the way they change latency and req/s. The table gives each variant's median
over the rounds, its spread, and the difference from the first variant.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
from canned import write_answers
from drive import (
    H2LOAD,
    MODEL,
    OUTPUT_NAME,
    binary_payload,
    free_port,
    gateway,
    grpc_frame,
    grpc_infer_request,
    make_input,
    pinned,
    reference,
    server,
    v2_body,
)

PROTOCOLS = ("grpc", "rest-json", "rest-binary")


@dataclass(frozen=True)
class Target:
    name: str
    pid: int
    http: str
    grpc: str
    log: Path


@dataclass(frozen=True)
class Sample:
    cpu_us_per_request: float
    req_per_s: float


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", default=[], help="NAME=CHECKOUT; repeat")
    parser.add_argument(
        "--canned",
        action="append",
        default=[],
        help="NAME=CHECKOUT: that checkout's benchmarks/canned.py; repeat",
    )
    parser.add_argument("--protocol", choices=PROTOCOLS, default="grpc")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=20000, help="requests per variant per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not args.variant and not args.canned:
        parser.error("give at least one --variant or --canned")
    return args


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


@dataclass(frozen=True)
class Request:
    """The body h2load posts, and its options (headers, --h1 for REST)."""

    body: Path
    options: tuple[str, ...]


def h2load(target: Target, args: argparse.Namespace, request: Request, requests: int) -> tuple[int, float]:
    """(requests answered with 200, req/s) for one fixed-size h2load run."""
    if args.protocol == "grpc":
        url = f"http://{target.grpc}/inference.GRPCInferenceService/ModelInfer"
    else:
        url = f"http://{target.http}/v2/models/{MODEL}/infer"
    command = [H2LOAD, "-n", str(requests), "-c", str(args.concurrency), "-m", "1", "-d", str(request.body)]
    result = subprocess.run(
        pinned(1, [*command, *request.options, url]), capture_output=True, text=True, timeout=600, check=True
    )
    ok = re.search(r"status codes: (\d+) 2xx", result.stdout)
    rate = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", result.stdout)
    return (int(ok.group(1)) if ok else 0), (float(rate.group(1)) if rate else 0.0)


def sample(target: Target, args: argparse.Namespace, request: Request) -> Sample:
    before = cpu_seconds(target.pid)
    answered, rate = h2load(target, args, request, args.requests)
    spent = cpu_seconds(target.pid) - before
    if answered != args.requests:
        raise SystemExit(f"{target.name}: {answered} of {args.requests} requests answered 200")
    return Sample(spent * 1e6 / answered, rate)


def write_request(work: Path, protocol: str) -> Request:
    x = make_input()
    if protocol == "grpc":
        body = work / "body.grpc"
        body.write_bytes(grpc_frame(grpc_infer_request(MODEL, "", x)))
        return Request(body, ("-H", "content-type: application/grpc", "-H", "te: trailers"))
    if protocol == "rest-json":
        body = work / "body.json"
        body.write_bytes(v2_body(x))
        return Request(body, ("--h1", "-H", "content-type: application/json"))
    payload = binary_payload(work / "body.bin", x)
    return Request(
        payload.file, ("--h1", "-H", f"content-type: {payload.content_type}", "-H", payload.headers[0])
    )


def checkouts(specs: list[str]) -> list[tuple[str, Path]]:
    pairs = []
    for spec in specs:
        name, _, checkout = spec.partition("=")
        pairs.append((name, Path(checkout or ".").resolve()))
    return pairs


@contextlib.contextmanager
def targets(args: argparse.Namespace, work: Path) -> Iterator[list[Target]]:
    with contextlib.ExitStack() as stack:
        started = []
        for name, source in checkouts(args.variant):
            # Each variant serves its own checkout's mlp, config.yaml included.
            repo = work / f"repo-{name}"
            shutil.copytree(source / "model_repo" / MODEL, repo / MODEL)
            _, endpoint, running = stack.enter_context(gateway(repo, f"/v2/models/{MODEL}/ready", source))
            assert endpoint.grpc is not None
            started.append(Target(name, running.pid, endpoint.http, endpoint.grpc, running.log))
        for name, source in checkouts(args.canned):
            answers = work / f"canned-{name}"
            write_answers(answers, MODEL, "1", OUTPUT_NAME, reference(make_input()))
            http_port, grpc_port = free_port(), free_port()
            command = [sys.executable, str(source / "benchmarks" / "canned.py"), "--answers", str(answers)]
            command += ["--http-port", str(http_port), "--grpc-port", str(grpc_port)]
            ready = f"http://127.0.0.1:{http_port}/v2/health/ready"
            running = stack.enter_context(server(name, pinned(0, command), ready, source, dict(os.environ)))
            started.append(
                Target(name, running.pid, f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", running.log)
            )
        yield started
        for target in started:  # what a variant logged about itself while it was measured
            for line in target.log.read_text(errors="replace").splitlines():
                if "WARNING modelyard" in line:
                    print(f"{target.name}: {line}", file=sys.stderr)


def main() -> None:
    args = parse_args()
    if shutil.which(H2LOAD) is None:
        raise SystemExit("ab.py needs h2load: apt-get install nghttp2-client (make bench-tools)")
    with tempfile.TemporaryDirectory(prefix="modelyard-ab-") as tmp:
        work = Path(tmp)
        request = write_request(work, args.protocol)
        with targets(args, work) as started:
            for target in started:  # warm-up: a quarter round each, not counted
                h2load(target, args, request, max(1, args.requests // 4))
            samples: dict[str, list[Sample]] = {t.name: [] for t in started}
            for round_number in range(args.rounds):
                for target in started:
                    samples[target.name].append(sample(target, args, request))
                print(f"round {round_number + 1}/{args.rounds} done", file=sys.stderr)
    print(
        f"# {args.protocol}, c={args.concurrency}, {args.requests} requests x {args.rounds} rounds per target "
        "(server on CPU 0, h2load on CPU 1)\n"
    )
    print("| target | CPU µs/request (median) | min | max | vs first | req/s (median) |")
    print("|---|---:|---:|---:|---:|---:|")
    first = None
    for name, values in samples.items():
        cpu = [s.cpu_us_per_request for s in values]
        median = statistics.median(cpu)
        first = median if first is None else first
        rate = statistics.median(s.req_per_s for s in values)
        print(
            f"| {name} | {median:.0f} | {min(cpu):.0f} | {max(cpu):.0f} | {median - first:+.0f} | {rate:.0f} |"
        )


if __name__ == "__main__":
    main()
