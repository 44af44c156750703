"""A/B of the gateway's hot path: server CPU time per request, variant against variant.

    python benchmarks/ab.py --variant base=. --variant candidate=/tmp/checkout [--canned canned=.] \
        [--protocol grpc|rest-json|rest-binary] [--model mlp|heavy] [--concurrency 8] \
        [--requests 20000] [--rounds 5]

Each variant is a checkout of this repository; its gateway (`python -m gateway serve` from that
checkout's root, so that its own code is imported) serves that checkout's model_repo/mlp alone
(`--model heavy`: the peers bench's heavy MLP, 1024 -> 2048 -> 2048 -> 10, built here by
benchmarks/batching.py and served with batching off), pinned to CPU 0. `--canned` adds a checkout's benchmarks/canned.py, the floor. The variants are all started first, then driven in turn,
round after round, by h2load pinned to CPU 1 with the same fixed number of requests, so that a
slow spell of the shared machine lands on every variant alike.

The figure is the server process's CPU time (all its threads, from the scheduler's schedstat) divided
by the requests it answered: what a request costs the server, which other processes on the same
core change less than they change latency and req/s. The table gives each variant's median over
the rounds, its spread, and its difference from the first variant paired round by round (median
and quartiles): many short rounds make that difference steady on a shared machine. A round in
which other processes used more than --max-other of the machine's CPUs (from /proc/stat, less
the server's and h2load's own time) is run again, after a pause, up to --retries times.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from batching import CONFIGS as HEAVY_CONFIGS
from batching import SIZES as HEAVY_SIZES
from batching import build_repo
from canned import write_answers
from drive import (
    H2LOAD,
    MODEL,
    ONNX_MODEL,
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
    stop_servers_on_sigterm,
    v2_body,
)
from goals import HEAVY

PROTOCOLS = ("grpc", "rest-json", "rest-binary")
MODELS = (MODEL, HEAVY)


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
    other: float  # the share of the machine's CPUs other processes used during the round
    switches_per_request: float  # the server's threads' context switches


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
    parser.add_argument("--model", choices=MODELS, default=MODEL, help="mlp, or the heavy MLP")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=20000, help="requests per variant per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--max-other",
        type=float,
        default=0.05,
        help="largest share of the CPUs other work may take in a round",
    )
    parser.add_argument("--retries", type=int, default=20, help="re-runs of a disturbed round, at most")
    parser.add_argument("--quiet-wait", type=float, default=2.0, help="seconds to wait before a re-run")
    args = parser.parse_args()
    if not args.variant and not args.canned:
        parser.error("give at least one --variant or --canned")
    return args


def cpu_seconds(pid: int) -> float:
    """CPU time all the process's threads have run, in ns precision: the scheduler's own sum
    (/proc/PID/task/*/schedstat), not the tick-sampled utime and stime, which over a round of a
    few seconds are off by several percent."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that just ended
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def context_switches(pid: int) -> int:
    """Voluntary and involuntary context switches of all the process's threads so far."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for line in (task / "status").read_text().splitlines():
                if "ctxt_switches:" in line:
                    total += int(line.split(":")[1])
    return total


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
        url = f"http://{target.http}/v2/models/{args.model}/infer"
    command = [H2LOAD, "-n", str(requests), "-c", str(args.concurrency), "-m", "1", "-d", str(request.body)]
    result = subprocess.run(
        pinned(1, [*command, *request.options, url]), capture_output=True, text=True, timeout=600, check=True
    )
    ok = re.search(r"status codes: (\d+) 2xx", result.stdout)
    rate = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", result.stdout)
    return (int(ok.group(1)) if ok else 0), (float(rate.group(1)) if rate else 0.0)


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has used so far (/proc/stat, all CPUs)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def sample(target: Target, args: argparse.Namespace, request: Request) -> Sample:
    """One round on one target; re-run (up to --retries times) while other work on the machine
    took more than --max-other of its CPUs during the round."""
    for _ in range(args.retries + 1):
        busy, children = machine_busy_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN)
        before, switches, started = cpu_seconds(target.pid), context_switches(target.pid), time.monotonic()
        answered, rate = h2load(target, args, request, args.requests)
        spent = cpu_seconds(target.pid) - before
        switched = context_switches(target.pid) - switches
        wall = time.monotonic() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        generator = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
        other = (machine_busy_seconds() - busy - spent - generator) / (wall * (os.cpu_count() or 1))
        if answered != args.requests:
            raise SystemExit(f"{target.name}: {answered} of {args.requests} requests answered 200")
        if other <= args.max_other:
            return Sample(spent * 1e6 / answered, rate, other, switched / answered)
        print(f"{target.name}: other work took {other:.0%} of the CPUs; round run again", file=sys.stderr)
        time.sleep(args.quiet_wait)
    return Sample(spent * 1e6 / answered, rate, other, switched / answered)


def model_input(model: str) -> np.ndarray:
    """The input every request carries: one row of the model's width."""
    return make_input(1, HEAVY_SIZES[0]) if model == HEAVY else make_input()


def write_request(work: Path, protocol: str, model: str) -> Request:
    x = model_input(model)
    if protocol == "grpc":
        body = work / "body.grpc"
        body.write_bytes(grpc_frame(grpc_infer_request(model, "", x)))
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
        # The heavy MLP is built once, here; each variant serves a copy of it.
        heavy = work / "heavy"
        onnx = build_repo(heavy, {HEAVY: HEAVY_CONFIGS[HEAVY]}) if args.model == HEAVY else ONNX_MODEL
        for name, source in checkouts(args.variant):
            # Each variant serves its own checkout's mlp, config.yaml included; or the heavy MLP.
            repo = work / f"repo-{name}"
            model_dir = heavy / HEAVY if args.model == HEAVY else source / "model_repo" / MODEL
            shutil.copytree(model_dir, repo / args.model)
            ready = f"/v2/models/{args.model}/ready"
            _, endpoint, running = stack.enter_context(gateway(repo, ready, source))
            assert endpoint.grpc is not None
            started.append(Target(name, running.pid, endpoint.http, endpoint.grpc, running.log))
        for name, source in checkouts(args.canned):
            answers = work / f"canned-{name}"
            write_answers(answers, args.model, "1", OUTPUT_NAME, reference(model_input(args.model), onnx))
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
    stop_servers_on_sigterm()
    if shutil.which(H2LOAD) is None:
        raise SystemExit("ab.py needs h2load: apt-get install nghttp2-client (make bench-tools)")
    with tempfile.TemporaryDirectory(prefix="modelyard-ab-") as tmp:
        work = Path(tmp)
        request = write_request(work, args.protocol, args.model)
        with targets(args, work) as started:
            for target in started:  # warm-up: a quarter round each, not counted
                h2load(target, args, request, max(1, args.requests // 4))
            samples: dict[str, list[Sample]] = {t.name: [] for t in started}
            for round_number in range(args.rounds):
                for target in started:
                    samples[target.name].append(sample(target, args, request))
                print(f"round {round_number + 1}/{args.rounds} done", file=sys.stderr)
    print(
        f"{args.model}, {args.protocol}, c={args.concurrency}, {args.requests} requests x {args.rounds} rounds per target "
        f"(server on CPU 0, h2load on CPU 1), rounds with other work over {args.max_other:.0%} run again\n"
    )
    print(
        "| target | CPU µs/request (median) | min | max | vs first, paired (median) | its quartiles | "
        "req/s (median) | context switches/request (median) | other work (max) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    first = next(iter(samples.values()))
    for name, values in samples.items():
        cpu = [s.cpu_us_per_request for s in values]
        # Each round's difference from the first variant in the same round: a slow spell of the
        # machine moves both, so the paired difference is steadier than the difference of medians.
        paired = [s.cpu_us_per_request - f.cpu_us_per_request for s, f in zip(values, first, strict=True)]
        low, _, high = statistics.quantiles(paired, n=4) if len(paired) > 1 else (paired[0],) * 3
        rate = statistics.median(s.req_per_s for s in values)
        print(
            f"| {name} | {statistics.median(cpu):.0f} | {min(cpu):.0f} | {max(cpu):.0f} | "
            f"{statistics.median(paired):+.0f} | {low:+.0f} .. {high:+.0f} | {rate:.0f} | "
            f"{statistics.median(s.switches_per_request for s in values):.2f} | {max(s.other for s in values):.0%} |"
        )


if __name__ == "__main__":
    main()
