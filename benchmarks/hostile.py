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
`memory`: the gateway on a repository with one model whose output is small, then --inflight
requests at once with the largest body the limits accept (JSON, then binary); it prints the peak
RSS growth per in-flight request as a multiple of the body.
`connections`: --slowloris connections that trickle one header byte every 3 s and --big-headers
connections that each start an 8 MB header and never finish it, while one client keeps calling
mlp; it prints the RSS before, the peak during, the normal requests' answers and how many hostile
connections the gateway still held at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import socket
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


class PeakRss(threading.Thread):
    """Samples a process' RSS every few milliseconds until stopped; keeps the highest."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self.halt.wait(0.005)

    def __enter__(self) -> PeakRss:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.halt.set()
        self.join()


def memory(args: argparse.Namespace) -> None:
    from gateway.settings import Settings

    defaults = Settings.model_fields
    json_limit = int(defaults["max_json_body_mb"].default * MIB)
    binary_limit = int(defaults["max_request_body_mb"].default * MIB)
    with tempfile.TemporaryDirectory() as work:
        repo = Path(work) / "repo"
        # mlp alone (64 inputs -> 10 outputs): the answer is small beside the body.
        (repo / "mlp" / "1").mkdir(parents=True)
        (repo / "mlp" / "1" / "model.onnx").write_bytes(
            (ROOT / "model_repo" / "mlp" / "1" / "model.onnx").read_bytes()
        )
        server, port = start(repo)
        url = f"http://127.0.0.1:{port}/v2/models/mlp/infer"
        try:
            for kind, limit in (("JSON", json_limit), ("binary", binary_limit)):
                body, headers = largest_body(kind, limit)
                with httpx.Client(timeout=300) as client:
                    assert client.post(url, content=body, headers=headers).status_code == 200  # warm-up
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
    """The largest mlp request under `limit`: float32 values as tritonclient writes them."""
    rng = np.random.default_rng(7)
    if kind == "binary":
        rows = (limit - 4096) // (64 * 4)
        body, length = v2_binary_body(rng.standard_normal((rows, 64)).astype(np.float32))
        return body, {
            "Inference-Header-Content-Length": str(length),
            "Content-Type": "application/octet-stream",
        }
    sample = v2_body(rng.standard_normal((1000, 64)).astype(np.float32))
    rows = int(1000 * (limit - 4096) / len(sample))
    body = v2_body(rng.standard_normal((rows, 64)).astype(np.float32))
    while len(body) > limit:
        rows = int(rows * 0.99)
        body = v2_body(rng.standard_normal((rows, 64)).astype(np.float32))
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


class HostileConnections:
    """`slowloris` connections that trickle a header byte every `trickle_s` and `big_headers`
    connections that each send an 8 MB header that never ends, all driven by one thread with
    non-blocking sockets; `outcome()` says what the gateway did with them."""

    def __init__(self, port: int, slowloris: int, big_headers: int, trickle_s: float = 3.0) -> None:
        self.port = port
        self.counts = (slowloris, big_headers)
        self.trickle_s = trickle_s
        self.slow: list[socket.socket] = []
        self.big: dict[socket.socket, int] = {}
        self.halt = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HostileConnections:
        slowloris, big = self.counts
        for _ in range(slowloris):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            sock.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\n")
            self.slow.append(sock)
        for _ in range(big):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nX-Big: ")
            sock.setblocking(False)
            self.big[sock] = 0
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.halt.set()
        self.thread.join(30)
        for sock in [*self.slow, *self.big]:
            sock.close()

    def _run(self) -> None:
        chunk = b"a" * 65536
        trickled = time.monotonic()
        while not self.halt.is_set():
            sending = [sock for sock, sent in self.big.items() if 0 <= sent < 8 * MIB]
            if sending:
                _, writable, _ = select.select([], sending, [], 0.05)
                for sock in writable:
                    try:
                        self.big[sock] += sock.send(chunk)
                    except OSError:
                        self.big[sock] = -1  # the gateway closed it
            else:
                self.halt.wait(0.05)
            if time.monotonic() - trickled >= self.trickle_s:
                trickled = time.monotonic()
                for sock in self.slow:
                    with contextlib.suppress(OSError):
                        sock.send(b"a")

    def outcome(self) -> dict[str, int]:
        """How many slowloris connections the gateway still holds, and how many big headers it
        answered 431. Call it once, after the gateway had time to act."""
        held = 0
        for sock in self.slow:
            sock.setblocking(False)
            try:
                while sock.recv(65536):
                    pass
            except BlockingIOError:
                held += 1
            except OSError:
                continue
        answered = 0
        for sock in self.big:
            sock.setblocking(True)
            sock.settimeout(5)
            answer = b""
            with contextlib.suppress(OSError):
                while chunk := sock.recv(65536):
                    answer += chunk
            answered += answer.startswith(b"HTTP/1.1 431")
        return {"slowloris still held": held, "big headers answered 431": answered}


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
