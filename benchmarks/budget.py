"""The memory budget's figure: a repository of 12 ONNX models of about 100 MB each, served on demand
under a budget for 4 of them, with round-robin traffic over all 12. Not a test: run it by hand or
through `make bench-budget`.

    python benchmarks/budget.py [--models 12] [--mib 100] [--fit 4] [--rounds 3] [--clients 2]
                                [--out benchmarks/results/budget.md]

The models are made at each run in a temporary folder (never committed): y = x @ W with W of
--mib MiB of FP32 and its own seed per model. A budget "for N" is N times one model's weights plus
4 MiB each. A tiny probe model is served first, so ONNX Runtime is imported and started before the
gateway's base is taken.

Every answer is checked against x @ W, computed when the model is made. Round-robin over more models
than fit unloads, before each load, the least recently used: every request then waits for a load
(these are the slow first requests, counted from the gateway's modelyard_load_waits_total).
RSS (the gateway's process, sampled every 5 ms throughout) must stay within the base plus the
budget.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import psutil
import tritonclient.http as triton_http
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory import emit, wait_ready

from gateway.net import free_port
from scripts.build_models import _save, build_affine, build_matmul, matmul_weights

ROOT = Path(__file__).resolve().parent.parent
SEED = 11


def build(repo: Path, models: int, mib: float) -> tuple[int, np.ndarray, dict[str, np.ndarray]]:
    """The repository; the side of W; the request's input; each model's expected answer."""
    side = int((mib * 2**20 / 4) ** 0.5)
    x = np.random.default_rng(SEED).standard_normal((1, side)).astype(np.float32)
    answers: dict[str, np.ndarray] = {}
    for seed in range(models):
        name = f"m{seed:02d}"
        _save(build_matmul(side, side, seed), repo / name / "1" / "model.onnx")
        answers[name] = x @ matmul_weights(side, side, seed)
    _save(build_affine(1), repo / "probe" / "1" / "model.onnx")
    return side, x, answers


class Sampler:
    """The highest RSS of a process, sampled every 5 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def counter(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def traffic(
    http: str, names: list[str], x: np.ndarray, answers: dict[str, np.ndarray], rounds: int, clients: int
) -> tuple[list[float], list[str]]:
    """Each client round-robins over every model, `rounds` times, starting at its own offset."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        offset = index * len(names) // clients
        order = names[offset:] + names[:offset]
        with triton_http.InferenceServerClient(http, network_timeout=600) as triton:
            for name in order * rounds:
                tensor = triton_http.InferInput("x", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x, binary_data=True)
                started = time.perf_counter()
                try:
                    result = triton.infer(name, [tensor])
                    took = time.perf_counter() - started
                    if not np.allclose(result.as_numpy("y"), answers[name], rtol=1e-3, atol=1e-1):
                        raise ValueError(f"{name} answered something else")
                except Exception as exc:  # every failure is counted and shown, none stops the run
                    with lock:
                        failures.append(f"{name}: {exc}")
                    continue
                with lock:
                    latencies.append(took)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, failures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=int, default=12)
    parser.add_argument("--mib", type=float, default=100.0, help="MiB of weights per model")
    parser.add_argument("--fit", type=int, default=4, help="the budget holds this many models")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    budget_mib = args.fit * (args.mib + 4)
    with tempfile.TemporaryDirectory(prefix="modelyard-budget-") as folder:
        repo = Path(folder)
        made = time.monotonic()
        side, x, answers = build(repo, args.models, args.mib)
        print(f"made {args.models} models of {side}x{side} FP32 in {time.monotonic() - made:.0f} s")
        http, grpc = free_port(), free_port()
        command = [
            sys.executable, "-m", "gateway", "serve", "--model-repo", str(repo), "--http-port", str(http),
            "--grpc-port", str(grpc), "--log-level", "warning", "--load-mode", "on_demand",
            "--model-memory-budget", f"{budget_mib:g}MiB",
        ]  # fmt: skip
        server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{http}"
        try:
            wait_ready(url, server)
            process = psutil.Process(server.pid)
            at_start = process.memory_info().rss
            probe = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
            httpx.post(f"{url}/v2/models/probe/infer", json=probe, timeout=60).raise_for_status()
            time.sleep(0.5)
            base = process.memory_info().rss
            waits = counter(url, "modelyard_load_waits_total")
            started = time.monotonic()
            with Sampler(server.pid) as rss:
                latencies, failures = traffic(
                    f"127.0.0.1:{http}", sorted(answers), x, answers, args.rounds, args.clients
                )
            elapsed = time.monotonic() - started
            status = httpx.get(f"{url}/status", timeout=30).json()["memory"]
            slow = counter(url, "modelyard_load_waits_total") - waits
            loads = counter(url, "modelyard_model_loads_total")
            evictions = counter(url, "modelyard_model_evictions_total")
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)

    requests = len(latencies) + len(failures)
    over = (rss.peak - base) / 2**20
    ms = sorted(t * 1000 for t in latencies)
    lines = [
        f"# memory budget: {args.models} ONNX models of {args.mib:g} MiB, a budget for {args.fit}",
        "",
        f"- {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, `{' '.join(['benchmarks/budget.py', *sys.argv[1:]])}`",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}",
        f"- traffic: {args.clients} clients, each round-robin over all {args.models} models "
        f"{args.rounds} times (tritonclient HTTP, binary tensors)",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| requests | {requests} |",
        f"| failed requests | {len(failures)} |",
        f"| requests that waited for a load (slow first requests) | {slow:.0f} |",
        f"| loads / evictions | {loads:.0f} / {evictions:.0f} |",
        f"| latency p50 / p99 / max, ms | {statistics.median(ms):.0f} / {ms[int(0.99 * (len(ms) - 1))]:.0f} / {ms[-1]:.0f} |"
        if ms
        else "| latency | - |",
        f"| run time, s | {elapsed:.1f} |",
        f"| budget, MiB | {budget_mib:g} |",
        f"| gateway RSS at start / base (runtime started, probe loaded), MiB | {at_start / 2**20:.0f} / {base / 2**20:.0f} |",
        f"| highest RSS, MiB (sampled every 5 ms) | {rss.peak / 2**20:.0f} |",
        f"| highest RSS over the base, MiB | {over:.0f} ({'within' if over <= budget_mib else 'OVER'} the budget) |",
        f"| retained by unloads / kept by the runtime, MiB | {status['retained_bytes'] / 2**20:.1f} / {status['runtime_bytes'] / 2**20:.1f} |",
    ]
    if failures:
        lines += ["", "First failures:", "", *(f"- {f}" for f in failures[:5])]
    emit(lines, args.out)
    if failures or over > budget_mib:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
