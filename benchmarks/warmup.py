"""First-request latency with and without warmup, for ONNX Runtime and TensorFlow models. Not a
test: run it by hand or through `make bench-warmup`.

    python benchmarks/warmup.py [--trials 5] [--runs 20] [--out benchmarks/results/warmup.md]

The models: `mlp` (64 -> 256 -> 256 -> 10) on ONNX Runtime and its TensorFlow twin `mlp_tf`, from
model_repo/; and `cnn`, four 3x3 convolutions over a 224x224 RGB image on ONNX Runtime, made at
each run in a temporary folder (its first runs allocate the activations that `mlp` never needs).

For each model and each setting (no warmup; `warmup: {runs: N}`, inputs generated from the
signature), a fresh gateway serves a repository of that model, loaded at start. Once it answers
ready, one tritonclient HTTP connection (binary tensors) asks for readiness (so the connection is
open), then sends the first inference request, then 50 more. The first-request penalty is the first request's latency
over the median of the other 50; the warmup's share of it is 1 - penalty with / penalty without,
from the medians over the trials.

Part of a first request's end-to-end penalty is the gateway's own: its request path running for the
first time in the process (Python's interpreter specializes code as it runs; buffers and metric
series are made on first use), which no model's warmup touches. So the table also gives the
backend's own share: the compute time of the first request and of the next ones, from the gateway's
statistics (`compute_infer`, the time the adapter's call took).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psutil
import tritonclient.http as triton_http
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory import emit, wait_ready

from gateway.net import free_port
from scripts.build_models import _model, _save

ROOT = Path(__file__).resolve().parent.parent
ONNX = "backend: onnxruntime\nonnxruntime: {intra_op_threads: 1}\n"
# model -> its config.yaml without warmup
MODELS = {
    "mlp": ONNX,
    "cnn": ONNX,
    "mlp_tf": "backend: tensorflow\ntensorflow: {signature: serving_default, intra_op_threads: 1, inter_op_threads: 1}\n",
}


def build_cnn(path: Path) -> None:
    """Four 3x3 convolutions with ReLU (3 -> 32 -> 64 -> 64 -> 128 channels, the last three with
    stride 2) over FP32 [-1, 3, 224, 224], then global average pooling: [-1, 128]."""
    rng = np.random.default_rng(0)
    nodes, weights, previous, channels = [], [], "x", 3
    for index, width in enumerate((32, 64, 64, 128)):
        weight = (rng.standard_normal((width, channels, 3, 3)) * 0.1).astype(np.float32)
        weights.append(numpy_helper.from_array(weight, f"w{index}"))
        stride = [2, 2] if index else [1, 1]
        nodes.append(
            helper.make_node(
                "Conv", [previous, f"w{index}"], [f"c{index}"], pads=[1, 1, 1, 1], strides=stride
            )
        )
        nodes.append(helper.make_node("Relu", [f"c{index}"], [f"r{index}"]))
        previous, channels = f"r{index}", width
    nodes += [
        helper.make_node("GlobalAveragePool", [previous], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 128])],
        initializer=weights,
    )
    _save(_model(graph), path)


STEADY_REQUESTS = 50
# After the steady requests: this many more, each after an idle pause and a readiness call, as the
# first one came: what any request costs after the process sat idle, first or not.
PAUSED_REQUESTS = 5
PAUSE_S = 0.5

# first, steady, first's compute, steady's compute, after a pause, its compute (ms)
Trial = tuple[float, float, float, float, float, float]


def trial(model: str, config: str) -> Trial:
    """On a fresh gateway, in ms: the first request's latency and the median of the next ones; the
    first request's compute and the mean of the next ones' (from the gateway's statistics)."""
    with tempfile.TemporaryDirectory(prefix="modelyard-warmup-") as folder:
        repo = Path(folder)
        if model == "cnn":
            build_cnn(repo / model / "1" / "model.onnx")
        else:
            shutil.copytree(ROOT / "model_repo" / model / "1", repo / model / "1")
        (repo / model / "config.yaml").write_text(config)
        http, grpc = free_port(), free_port()
        command = [
            sys.executable, "-m", "gateway", "serve", "--model-repo", str(repo), "--http-port", str(http),
            "--grpc-port", str(grpc), "--log-level", "warning",
        ]  # fmt: skip
        server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(f"http://127.0.0.1:{http}", server)
            with triton_http.InferenceServerClient(f"127.0.0.1:{http}", network_timeout=120) as client:
                (spec,) = client.get_model_metadata(model)["inputs"]
                shape = [1 if d == -1 else d for d in spec["shape"]]
                tensor = triton_http.InferInput(spec["name"], shape, "FP32")
                tensor.set_data_from_numpy(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
                assert client.is_server_ready()  # the connection is open before the clock starts
                latencies: list[float] = []
                computes: list[float] = []
                for _ in range(1 + STEADY_REQUESTS):
                    started = time.perf_counter()
                    client.infer(model, [tensor])
                    latencies.append((time.perf_counter() - started) * 1000)
                    if len(computes) < 2:  # after the first request, and after all of them
                        computes.append(compute_ms(client, model))
                computes[1] = compute_ms(client, model)
                paused: list[float] = []
                paused_computes: list[float] = []
                for _ in range(PAUSED_REQUESTS):
                    before = compute_ms(client, model)
                    time.sleep(PAUSE_S)
                    assert client.is_server_ready()
                    started = time.perf_counter()
                    client.infer(model, [tensor])
                    paused.append((time.perf_counter() - started) * 1000)
                    paused_computes.append(compute_ms(client, model) - before)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    first_compute = computes[0]
    return (
        latencies[0],
        statistics.median(latencies[1:]),
        first_compute,
        (computes[1] - first_compute) / STEADY_REQUESTS,
        statistics.median(paused),
        statistics.median(paused_computes),
    )


def compute_ms(client: triton_http.InferenceServerClient, model: str) -> float:
    (row,) = client.get_inference_statistics(model)["model_stats"]
    return float(row["inference_stats"]["compute_infer"]["ns"]) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--runs", type=int, default=20, help="warmup runs")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    rows, paused_rows = [], []
    for model, config in MODELS.items():
        results: dict[str, list[Trial]] = {"off": [], "on": []}
        for _ in range(args.trials):  # alternated, so drift on a shared machine hits both alike
            results["off"].append(trial(model, config))
            results["on"].append(trial(model, config + f"warmup: {{runs: {args.runs}}}\n"))
        cells = []
        for first, steady in ((0, 1), (2, 3)):  # end to end; the backend's compute
            med = {
                k: (statistics.median(t[first] for t in v), statistics.median(t[steady] for t in v))
                for k, v in results.items()
            }
            penalty = {k: statistics.median(t[first] - t[steady] for t in v) for k, v in results.items()}
            removed = 1 - penalty["on"] / penalty["off"] if penalty["off"] > 0 else float("nan")
            cells += [
                f"{med['off'][0]:.1f} / {med['off'][1]:.1f}",
                f"{penalty['off']:.1f}",
                f"{med['on'][0]:.1f} / {med['on'][1]:.1f}",
                f"{penalty['on']:.1f}",
                f"{removed * 100:.0f} %",
            ]
        rows.append(f"| {model} ({config.split()[1]}) | {' | '.join(cells)} |")
        print(rows[-1], flush=True)
        cells = []
        for first, paused in ((0, 4), (2, 5)):  # against a request after the same kind of pause
            penalty = {k: statistics.median(t[first] - t[paused] for t in v) for k, v in results.items()}
            removed = 1 - penalty["on"] / penalty["off"] if penalty["off"] > 0 else float("nan")
            after = {k: statistics.median(t[paused] for t in v) for k, v in results.items()}
            cells += [
                f"{after['off']:.1f} / {after['on']:.1f}",
                f"{penalty['off']:.1f}",
                f"{penalty['on']:.1f}",
                f"{removed * 100:.0f} %",
            ]
        paused_rows.append(f"| {model} ({config.split()[1]}) | {' | '.join(cells)} |")
        print(paused_rows[-1], flush=True)
    lines = [
        "# warmup: first-request latency with and without warmup",
        "",
        f"- {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, `{' '.join(['benchmarks/warmup.py', *sys.argv[1:]])}`",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}",
        f"- {args.trials} fresh gateways per model and setting; tritonclient HTTP, binary tensors, batch 1; "
        f"warmup: `{{runs: {args.runs}}}` on generated inputs. Medians over the trials, ms; first / steady, "
        "and the penalty (first minus steady).",
        "",
        "| model | end to end, no warmup | penalty | with warmup | penalty | removed "
        "| compute, no warmup | penalty | with warmup | penalty | removed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"The steady requests above run back to back. Any request that comes after the process sat idle "
        f"costs more than those, first or not: below, each trial's first request is set against "
        f"{PAUSED_REQUESTS} requests made after it, each after a {PAUSE_S:g} s pause and a readiness call "
        "(as the first one came), in the same gateway. That penalty is what being first costs, and the "
        "share of it that warmup removes.",
        "",
        "| model | end to end after a pause, no warmup / warmup | first's penalty, no warmup | with warmup "
        "| removed | compute after a pause | first's penalty, no warmup | with warmup | removed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *paused_rows,
    ]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
