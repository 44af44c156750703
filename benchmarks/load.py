"""Load benchmark for the modelyard gateway over the Open Inference Protocol v2.

Drives one model through REST (JSON and binary tensor data), gRPC and, as the ceiling to compare
against, onnxruntime in-process, each at the same fixed concurrency for a fixed time. See README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import onnxruntime as ort
import orjson
from tritonclient.grpc import service_pb2, service_pb2_grpc

# The load generator itself is the gateway package's, which `modelyard bench` uses too.
from gateway.tools.lab.load import (
    INPUT_POOL_SIZE,
    RestClient,
    Row,
    RunConfig,
    SyncSend,
    Workload,
    grpc_send,
    measure_async,
    measure_threads,
    rest_binary_send,
    rest_json_send,
    tfserving_grpc_send,
    tfserving_rest_send,
)

MODES = ("inprocess", "rest-json", "rest-binary", "grpc", "tfserving-rest", "tfserving-grpc")
# TF Serving's API is opt-in: its gRPC mode needs the tensorflow extra.
DEFAULT_MODES = ("inprocess", "rest-json", "rest-binary", "grpc")
INPUT_SEED = 20240601
# ONNX element type -> (numpy dtype, v2 datatype); the benchmark generates float inputs only.
FLOAT_TYPES: dict[str, tuple[type[np.floating[Any]], str]] = {
    "tensor(float)": (np.float32, "FP32"),
    "tensor(double)": (np.float64, "FP64"),
    "tensor(float16)": (np.float16, "FP16"),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http", default="127.0.0.1:8000", help="REST host:port")
    parser.add_argument("--grpc", default="127.0.0.1:8001", help="gRPC host:port")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--version", default="", help="model version; empty lets the server choose")
    parser.add_argument("--onnx", type=Path, default=Path("model_repo/mlp/1/model.onnx"))
    parser.add_argument("--input-name", default="input")
    parser.add_argument("--output-name", default="logits")
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--duration", type=positive_float, default=10.0, help="seconds measured per mode")
    parser.add_argument("--concurrency", type=positive_int, default=8)
    parser.add_argument("--warmup", type=non_negative_float, default=2.0, help="seconds discarded per mode")
    parser.add_argument("--modes", type=mode_list, default=list(DEFAULT_MODES), help=",".join(MODES))
    parser.add_argument("--json-out", type=Path)
    return parser.parse_args(argv)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def mode_list(text: str) -> list[str]:
    modes = [mode.strip() for mode in text.split(",") if mode.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"choose from {','.join(MODES)}; got {text!r}")
    return modes


def machine_info() -> dict[str, str]:
    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "platform": platform.platform(),
    }


def make_session(onnx_path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # One thread per call, so that concurrency comes from the callers as it does behind a server.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def build_workload(args: argparse.Namespace, session: ort.InferenceSession) -> Workload:
    inputs_meta = {node.name: node for node in session.get_inputs()}
    if args.input_name not in inputs_meta:
        sys.exit(f"{args.onnx} has no input {args.input_name!r}; it has {sorted(inputs_meta)}")
    meta = inputs_meta[args.input_name]
    if meta.type not in FLOAT_TYPES:
        sys.exit(f"input {args.input_name!r} is {meta.type}; only {sorted(FLOAT_TYPES)} are supported")
    feature_dims = meta.shape[1:]
    if not all(isinstance(dim, int) and dim > 0 for dim in feature_dims):
        sys.exit(f"input {args.input_name!r} needs fixed dimensions after the batch one, has {meta.shape}")
    output_names = [node.name for node in session.get_outputs()]
    if args.output_name not in output_names:
        sys.exit(f"{args.onnx} has no output {args.output_name!r}; it has {sorted(output_names)}")
    dtype, datatype = FLOAT_TYPES[meta.type]
    rng = np.random.default_rng(INPUT_SEED)
    shape = (args.batch, *feature_dims)
    inputs = [rng.standard_normal(shape).astype(dtype) for _ in range(INPUT_POOL_SIZE)]
    expected = [session.run([args.output_name], {args.input_name: x})[0] for x in inputs]
    return Workload(args.model, args.version, args.input_name, args.output_name, datatype, inputs, expected)


def inprocess_send(session: ort.InferenceSession, workload: Workload) -> SyncSend:
    def send(item: int) -> np.ndarray:
        outputs: list[np.ndarray] = session.run(
            [workload.output_name], {workload.input_name: workload.inputs[item]}
        )
        return outputs[0]

    return send


async def ensure_ready(
    args: argparse.Namespace, client: RestClient, stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    """Fail fast, before any mode runs, when a gateway endpoint needed by the chosen modes is down."""
    if {"rest-json", "rest-binary", "tfserving-rest"} & set(args.modes):
        try:
            answer = await client.get("/v2/health/ready")
        except (aiohttp.ClientError, TimeoutError) as exc:
            sys.exit(f"REST endpoint {args.http} unreachable: {exc!r}")
        if answer.status != 200:
            sys.exit(f"REST endpoint {args.http} not ready: HTTP {answer.status}")
    if {"grpc", "tfserving-grpc"} & set(args.modes):
        try:
            ready = await stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=5.0)
        except grpc.aio.AioRpcError as exc:
            sys.exit(f"gRPC endpoint {args.grpc} unreachable: {exc.code().name} {exc.details()}")
        if not ready.ready:
            sys.exit(f"gRPC endpoint {args.grpc} not ready")


async def run_modes(args: argparse.Namespace, session: ort.InferenceSession, workload: Workload) -> list[Row]:
    config = RunConfig(args.concurrency, args.batch, args.duration, args.warmup)
    grpc_options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    async with (
        RestClient(f"http://{args.http}", args.concurrency) as client,
        grpc.aio.insecure_channel(args.grpc, options=grpc_options) as channel,
    ):
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        await ensure_ready(args, client, stub)
        rows = []
        for mode in args.modes:
            if mode == "inprocess":
                send = inprocess_send(session, workload)
                row = await asyncio.to_thread(measure_threads, mode, send, workload, config)
            elif mode == "rest-json":
                row = await measure_async(mode, rest_json_send(client, workload), workload, config)
            elif mode == "rest-binary":
                row = await measure_async(mode, rest_binary_send(client, workload), workload, config)
            elif mode == "tfserving-rest":
                row = await measure_async(mode, tfserving_rest_send(client, workload), workload, config)
            elif mode == "tfserving-grpc":
                row = await measure_async(mode, tfserving_grpc_send(channel, workload), workload, config)
            else:
                row = await measure_async(mode, grpc_send(stub, workload), workload, config)
            rows.append(row)
            print(f"{mode}: done", file=sys.stderr)
    return rows


def format_ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def render(machine: dict[str, str], args: argparse.Namespace, rows: list[Row]) -> str:
    lines = [
        f"# modelyard load benchmark: model {args.model!r}, {args.duration:g} s per mode "
        f"after {args.warmup:g} s warm-up",
        "",
        f"- CPU: {machine['cpu']} ({machine['cores']} cores)",
        f"- Python {machine['python']}, onnxruntime {machine['onnxruntime']}, {machine['platform']}",
        "",
        "| mode | concurrency | batch | requests | req/s | p50 ms | p90 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.mode} | {row.concurrency} | {row.batch} | {row.requests} | {row.req_per_s:.1f} "
            f"| {format_ms(row.p50_ms)} | {format_ms(row.p90_ms)} | {format_ms(row.p99_ms)} | {row.errors} |"
        )
    failures = [f"- {row.mode}: first error: {row.first_error}" for row in rows if row.first_error]
    if failures:
        lines += ["", *failures]
    return "\n".join(lines)


def write_json(path: Path, machine: dict[str, str], rows: list[Row]) -> None:
    # orjson writes the NaN percentiles of a mode without one successful request as null.
    records = [asdict(row) for row in rows]
    path.write_bytes(orjson.dumps({"machine": machine, "rows": records}, option=orjson.OPT_INDENT_2))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.onnx.is_file():
        sys.exit(f"no model file at {args.onnx}")
    session = make_session(args.onnx)
    workload = build_workload(args, session)
    rows = asyncio.run(run_modes(args, session, workload))
    machine = machine_info()
    print(render(machine, args, rows))
    if args.json_out:
        write_json(args.json_out, machine, rows)


if __name__ == "__main__":
    main()
