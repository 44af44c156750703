"""Hostile clients, measured: REST speed with the connection guard in place, memory per request
at the largest accepted body, and the gateway's RSS under slowloris and oversized headers. Not a
test: run it by hand.

    python benchmarks/hostile.py speed [--duration 10] [--rounds 3] [--baseline DIR]
    python benchmarks/hostile.py memory [--inflight 3]
    python benchmarks/hostile.py connections [--slowloris 500] [--big-headers 200] [--seconds 20]

`speed`: the gateway on model_repo pinned to CPU 0 (`taskset -c 0`), hey on CPU 1, mlp at c=8,
REST JSON and REST binary, --rounds rounds of --duration seconds each; it prints each round's
req/s and the gateway's CPU time per request, and their medians. With --baseline DIR, the same
against the gateway of another checkout (run from DIR), round for round.
`memory`: the gateway on a repository with one model whose work and answer are small (a sum of
each row), then --inflight requests at once with the largest body the default limits accept
(JSON with two-decimal numbers, then binary); it prints the peak RSS growth per in-flight request
as a multiple of the body.
`connections`: --slowloris connections that trickle one header byte every 3 s and --big-headers
connections that each start an 8 MB header and never finish it, while one client keeps calling
mlp; it prints the RSS before, the peak during, the normal requests' answers and how many hostile
connections the gateway still held at the end.
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
from pathlib import Path

import httpx
import numpy as np
import onnx
import psutil
from memory import ROOT, free_port, wait_ready
from onnx import helper
from peers import Payload, parse_hey, pinned, run_hey, v2_binary_body, v2_body

from gateway.tools.hostile import HostileConnections, PeakRss

MIB = 2**20


def start(
    repo: Path, env: dict[str, str] | None = None, cpu: int | None = None, tree: Path = ROOT
) -> tuple[subprocess.Popen[bytes], int]:
    """`modelyard serve` of the checkout `tree` (this one by default) on free ports."""
    http, grpc = free_port(), free_port()
    command = [
        sys.executable, "-m", "gateway", "serve", "--model-repo", str(repo), "--http-port", str(http),
        "--grpc-port", str(grpc), "--log-level", "warning",
    ]  # fmt: skip
    if cpu is not None:
        command = pinned(cpu, command)
    server = subprocess.Popen(
        command,
        cwd=tree,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_ready(f"http://127.0.0.1:{http}", server)
    return server, http


def stop(server: subprocess.Popen[bytes]) -> None:
    server.send_signal(signal.SIGTERM)
    server.wait(60)


def speed(args: argparse.Namespace) -> None:
    """hey against this checkout's gateway and, with --baseline, another checkout's, in alternate
    rounds so that both see the same machine; req/s and the gateway's CPU time per request."""
    x = np.random.default_rng(20240601).standard_normal((1, 64)).astype(np.float32)
    trees = {"this checkout": ROOT}
    if args.baseline is not None:
        trees["baseline"] = args.baseline.resolve()
    servers = {name: start(ROOT / "model_repo", cpu=0, tree=tree) for name, tree in trees.items()}
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    try:
        with tempfile.TemporaryDirectory() as work:
            json_file, binary_file = Path(work) / "body.json", Path(work) / "body.bin"
            json_file.write_bytes(v2_body(x))
            binary, length = v2_binary_body(x)
            binary_file.write_bytes(binary)
            payloads = {
                "REST JSON": Payload(json_file, "application/json"),
                "REST binary": Payload(
                    binary_file, "application/octet-stream", (f"Inference-Header-Content-Length: {length}",)
                ),
            }
            for _, port in servers.values():
                for payload in payloads.values():  # warm-up
                    run_hey(f"http://127.0.0.1:{port}/v2/models/mlp/infer", args.concurrency, 2, payload)
            for _ in range(args.rounds):
                for kind, payload in payloads.items():
                    for name, (server, port) in servers.items():
                        url = f"http://127.0.0.1:{port}/v2/models/mlp/infer"
                        process = psutil.Process(server.pid)
                        used = sum(process.cpu_times()[:2])
                        summary = run_hey(url, args.concurrency, args.duration, payload)
                        used = sum(process.cpu_times()[:2]) - used
                        ok, errors, total, _, _ = parse_hey(summary)
                        if errors:
                            raise SystemExit(f"{name} {kind}: {errors} errors")
                        # CPU time per request is steadier than req/s on a machine others share.
                        results.setdefault((kind, name), []).append((ok / total, used / ok * 1e6))
                        print(
                            f"{name} {kind}: {ok / total:.0f} req/s, {used / ok * 1e6:.0f} us CPU per request"
                        )
    finally:
        for server, _ in servers.values():
            stop(server)
    for (kind, name), rows in results.items():
        rates, cpu = [r for r, _ in rows], [c for _, c in rows]
        print(
            f"{kind}, {name} (c={args.concurrency}, {len(rows)} rounds of {args.duration:g} s): req/s median "
            f"{statistics.median(rates):.0f}, best {max(rates):.0f}; gateway CPU per request median "
            f"{statistics.median(cpu):.0f} us, best {min(cpu):.0f} us"
        )


def memory(args: argparse.Namespace) -> None:
    from gateway.settings import Settings

    defaults = Settings.model_fields
    json_limit = int(defaults["max_json_body_mb"].default * MIB)
    binary_limit = int(defaults["max_request_body_mb"].default * MIB)
    with tempfile.TemporaryDirectory() as work:
        repo = Path(work) / "repo"
        # A model named mlp that sums each row of 64: its work and its answer are small beside the
        # body, so what is measured is the gateway's own memory.
        (repo / "mlp" / "1").mkdir(parents=True)
        onnx.save(row_sum_model(), str(repo / "mlp" / "1" / "model.onnx"))
        server, port = start(repo)
        url = f"http://127.0.0.1:{port}/v2/models/mlp/infer"
        try:
            for kind, limit in (("JSON", json_limit), ("binary", binary_limit)):
                body, headers = largest_body(kind, limit)
                # No warm-up: memory the first large body leaves with the allocator counts too.
                time.sleep(1)
                before = psutil.Process(server.pid).memory_info().rss
                with PeakRss(server.pid) as peak:
                    codes = send_together(url, body, headers, args.inflight)
                growth = (peak.peak - before) / args.inflight
                print(
                    f"{kind}: body {len(body) / MIB:.1f} MiB (limit {limit / MIB:.0f} MiB), {args.inflight} in flight, "
                    f"answers {dict(Counter(codes))}; RSS {before / MIB:.0f} -> peak {peak.peak / MIB:.0f} MiB: "
                    f"{growth / MIB:.1f} MiB per request = {growth / len(body):.2f}x its body"
                )
        finally:
            stop(server)


def row_sum_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["input", "axes"], ["sum"], keepdims=0)],
        "row_sum",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("sum", onnx.TensorProto.FLOAT, ["batch"])],
        initializer=[helper.make_tensor("axes", onnx.TensorProto.INT64, [1], [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what every onnxruntime here reads
    return model


def largest_body(kind: str, limit: int) -> tuple[bytes, dict[str, str]]:
    """The largest request under `limit`: binary float32 data, or JSON with short numbers (two
    decimals, which a parser making an object per number inflates the most)."""
    rng = np.random.default_rng(7)
    if kind == "binary":
        x = rng.standard_normal(((limit - 4096) // (64 * 4), 64)).astype(np.float32)
        tensor = {
            "name": "input",
            "shape": list(x.shape),
            "datatype": "FP32",
            "parameters": {"binary_data_size": x.nbytes},
        }
        header = json.dumps({"inputs": [tensor]}).encode()
        return header + x.tobytes(), {
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
        }

    def json_body(rows: int) -> bytes:
        data = np.round(rng.standard_normal(rows * 64), 2).tolist()
        return json.dumps(
            {"inputs": [{"name": "input", "shape": [rows, 64], "datatype": "FP32", "data": data}]}
        ).encode()

    rows = int(1000 * (limit - 4096) / len(json_body(1000)))
    body = json_body(rows)
    while len(body) > limit:
        rows = int(rows * 0.99)
        body = json_body(rows)
    return body, {"Content-Type": "application/json"}


def send_together(url: str, body: bytes, headers: dict[str, str], count: int) -> list[int]:
    codes: list[int] = []
    barrier = threading.Barrier(count)

    def one() -> None:
        with httpx.Client(timeout=300) as client:
            barrier.wait()
            codes.append(client.post(url, content=body, headers=headers).status_code)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    return codes


def connections(args: argparse.Namespace) -> None:
    server, port = start(ROOT / "model_repo")
    url = f"http://127.0.0.1:{port}/v2/models/mlp/infer"
    body = v2_body(np.zeros((1, 64), np.float32))
    process = psutil.Process(server.pid)
    try:
        time.sleep(1)
        before = process.memory_info().rss
        attack = HostileConnections(port, args.slowloris, args.big_headers)
        codes: Counter[str] = Counter()
        with PeakRss(server.pid) as peak, attack, httpx.Client(timeout=30) as client:
            until = time.monotonic() + args.seconds
            while time.monotonic() < until:
                try:
                    codes[str(client.post(url, content=body).status_code)] += 1
                except httpx.TransportError as exc:
                    codes[type(exc).__name__] += 1
                time.sleep(0.05)
            outcome = attack.outcome()
        print(
            f"{args.slowloris} slowloris + {args.big_headers} unfinished 8 MB headers for {args.seconds:g} s: "
            f"normal requests {dict(codes)}; RSS {before / MIB:.0f} -> peak {peak.peak / MIB:.0f} MiB "
            f"({(peak.peak - before) / MIB:+.1f} MiB); at the end: {outcome}"
        )
    finally:
        stop(server)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("speed")
    run.add_argument("--duration", type=float, default=10)
    run.add_argument("--rounds", type=int, default=3)
    run.add_argument("--concurrency", type=int, default=8)
    run.add_argument("--baseline", type=Path, help="another checkout (git archive of main, say) to compare")
    run = commands.add_parser("memory")
    run.add_argument("--inflight", type=int, default=3)
    run = commands.add_parser("connections")
    run.add_argument("--slowloris", type=int, default=500)
    run.add_argument("--big-headers", type=int, default=200)
    run.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    {"speed": speed, "memory": memory, "connections": connections}[args.command](args)


if __name__ == "__main__":
    main()
