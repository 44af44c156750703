"""First-request latency with and without warmup, for ONNX Runtime and TensorFlow models. Not a
test: run it by hand or through `make bench-warmup`.

    python benchmarks/warmup.py [--trials 5] [--runs 5] [--out benchmarks/results/warmup.md]

The models: `mlp` (64 -> 256 -> 256 -> 10) on ONNX Runtime and its TensorFlow twin `mlp_tf`, from
model_repo/; and `cnn`, four 3x3 convolutions over a 224x224 RGB image on ONNX Runtime, made at
each run in a temporary folder (its first runs allocate the activations that `mlp` never needs).

For each model and each setting (no warmup; `warmup: {runs: N}`, inputs generated from the
signature), a fresh gateway serves a repository of that model, loaded at start. Once it answers
ready, one keep-alive HTTP connection sends a health request (so the connection is open), then the
first inference request, then 50 more. The first-request penalty is the first request's latency
over the median of the other 50; the warmup's share of it is 1 - penalty with / penalty without,
from the medians over the trials.

Part of a first request's penalty is the gateway's own: its request path running for the first
time in the process (Python's interpreter specializes code as it runs, buffers and series are made
on first use), which no model's warmup touches. So each setting also runs on gateways where another
model (`affine`) has answered one request first, which leaves the model's own first-run penalty.
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

import httpx
import numpy as np
import psutil
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
OPENER = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}


def trial(model: str, config: str, opened: bool) -> tuple[float, float]:
    """(first request's latency, median of the next ones), in ms, on a fresh gateway; `opened`: after
    one request to another model."""
    with tempfile.TemporaryDirectory(prefix="modelyard-warmup-") as folder:
        repo = Path(folder)
        if model == "cnn":
            build_cnn(repo / model / "1" / "model.onnx")
        else:
            shutil.copytree(ROOT / "model_repo" / model / "1", repo / model / "1")
        (repo / model / "config.yaml").write_text(config)
        if opened:
            shutil.copytree(ROOT / "model_repo" / "affine" / "1", repo / "affine" / "1")
        http, grpc = free_port(), free_port()
        command = [
            sys.executable, "-m", "gateway", "serve", "--model-repo", str(repo), "--http-port", str(http),
            "--grpc-port", str(grpc), "--log-level", "warning",
        ]  # fmt: skip
        server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{http}"
        try:
            wait_ready(url, server)
            with httpx.Client(base_url=url, timeout=120) as client:
                meta = client.get(f"/v2/models/{model}").json()
                (spec,) = meta["inputs"]
                shape = [1 if d == -1 else d for d in spec["shape"]]
                data = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
                body = {
                    "inputs": [
                        {
                            "name": spec["name"],
                            "datatype": "FP32",
                            "shape": shape,
                            "data": data.ravel().tolist(),
                        }
                    ]
                }
                client.get("/v2/health/ready").raise_for_status()
                if opened:
                    client.post("/v2/models/affine/infer", json=OPENER).raise_for_status()
                latencies = []
                for _ in range(1 + STEADY_REQUESTS):
                    started = time.perf_counter()
                    client.post(f"/v2/models/{model}/infer", json=body).raise_for_status()
                    latencies.append((time.perf_counter() - started) * 1000)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    return latencies[0], statistics.median(latencies[1:])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--runs", type=int, default=5, help="warmup runs")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    rows = []
    for model, config in MODELS.items():
        for opened in (False, True):
            results: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
            for _ in range(args.trials):  # alternated, so drift on a shared machine hits both alike
                results["off"].append(trial(model, config, opened))
                results["on"].append(trial(model, config + f"warmup: {{runs: {args.runs}}}\n", opened))
            first = {k: statistics.median(f for f, _ in v) for k, v in results.items()}
            steady = {k: statistics.median(s for _, s in v) for k, v in results.items()}
            penalty = {k: statistics.median(f - s for f, s in v) for k, v in results.items()}
            removed = 1 - penalty["on"] / penalty["off"] if penalty["off"] > 0 else float("nan")
            gateway = "after another model's request" if opened else "the gateway's first request"
            rows.append(
                f"| {model} ({config.split()[1]}) | {gateway} | {first['off']:.1f} | {steady['off']:.2f} "
                f"| {penalty['off']:.1f} | {first['on']:.1f} | {steady['on']:.2f} | {penalty['on']:.1f} "
                f"| {removed * 100:.0f} % |"
            )
            print(rows[-1], flush=True)
    lines = [
        "# warmup: first-request latency with and without warmup",
        "",
        f"- {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, `{' '.join(['benchmarks/warmup.py', *sys.argv[1:]])}`",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}",
        f"- {args.trials} fresh gateways per model and setting; REST JSON, batch 1; warmup: "
        f"`{{runs: {args.runs}}}` on generated inputs. Medians over the trials, ms.",
        "",
        "| model | first request | first, no warmup | steady | penalty | first, warmup | steady | penalty "
        "| penalty removed |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
