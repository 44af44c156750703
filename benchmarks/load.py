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
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import orjson
from tritonclient.grpc import service_pb2, service_pb2_grpc

MODES = ("inprocess", "rest-json", "rest-binary", "grpc", "tfserving-rest", "tfserving-grpc")
# TF Serving's API is opt-in: its gRPC mode needs the tensorflow extra.
DEFAULT_MODES = ("inprocess", "rest-json", "rest-binary", "grpc")
INPUT_SEED = 20240601
# Distinct inputs cycled through so that no layer can answer from a cache of one request.
INPUT_POOL_SIZE = 32
# Every Nth response of each worker is compared against the in-process reference.
CHECK_EVERY = 10
RTOL = 1e-4
ATOL = 1e-5
REQUEST_TIMEOUT_S = 30.0
HEADER_LENGTH = "Inference-Header-Content-Length"
# ONNX element type -> (numpy dtype, v2 datatype); the benchmark generates float inputs only.
FLOAT_TYPES: dict[str, tuple[type[np.floating[Any]], str]] = {
    "tensor(float)": (np.float32, "FP32"),
    "tensor(double)": (np.float64, "FP64"),
    "tensor(float16)": (np.float16, "FP16"),
}

AsyncSend = Callable[[int], Awaitable[np.ndarray]]
SyncSend = Callable[[int], np.ndarray]


class ProtocolError(Exception):
    """The server answered, but not in the shape the protocol prescribes."""


@dataclass(frozen=True)
class Workload:
    model: str
    version: str
    input_name: str
    output_name: str
    datatype: str
    inputs: list[np.ndarray]
    expected: list[np.ndarray]

    def mismatch(self, item: int, output: np.ndarray) -> str | None:
        """Why `output` is not onnxruntime's answer for input `item`, or None when it is."""
        want = self.expected[item]
        if output.shape != want.shape:
            return f"output shape {list(output.shape)} for input {item}, onnxruntime gives {list(want.shape)}"
        if not np.allclose(output, want, rtol=RTOL, atol=ATOL):
            diff = float(np.max(np.abs(output.astype(np.float64) - want)))
            return f"output for input {item} differs from onnxruntime by up to {diff:.3g}"
        return None


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None

    def fail(self, reason: str) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = reason

    def settle(
        self, workload: Workload, item: int, sequence: int, latency: float, output: np.ndarray
    ) -> None:
        reason = workload.mismatch(item, output) if sequence % CHECK_EVERY == 0 else None
        if reason:
            self.fail(reason)
        else:
            self.latencies.append(latency)


@dataclass(frozen=True)
class Row:
    mode: str
    concurrency: int
    batch: int
    requests: int
    req_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: int
    first_error: str | None


@dataclass(frozen=True)
class RunConfig:
    concurrency: int
    batch: int
    duration: float
    warmup: float


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


def summarize(mode: str, config: RunConfig, tallies: list[Tally], elapsed: float) -> Row:
    latencies = np.array([lat for tally in tallies for lat in tally.latencies]) * 1000.0
    errors = sum(tally.errors for tally in tallies)
    first_error = next((tally.first_error for tally in tallies if tally.first_error), None)
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99]) if latencies.size else (math.nan,) * 3
    return Row(
        mode=mode,
        concurrency=config.concurrency,
        batch=config.batch,
        requests=latencies.size + errors,
        req_per_s=latencies.size / elapsed,
        p50_ms=float(p50),
        p90_ms=float(p90),
        p99_ms=float(p99),
        errors=errors,
        first_error=first_error,
    )


def next_item(worker: int, sequence: int) -> int:
    return (worker + sequence) % INPUT_POOL_SIZE


async def async_worker(send: AsyncSend, workload: Workload, worker: int, deadline: float) -> Tally:
    tally = Tally()
    sequence = 0
    while time.perf_counter() < deadline:
        item = next_item(worker, sequence)
        started = time.perf_counter()
        try:
            output = await send(item)
        # Whatever makes one request fail is an error to count, not a reason to stop the run.
        except Exception as exc:
            tally.fail(f"{type(exc).__name__}: {exc}")
        else:
            tally.settle(workload, item, sequence, time.perf_counter() - started, output)
        sequence += 1
    return tally


def thread_worker(send: SyncSend, workload: Workload, worker: int, deadline: float) -> Tally:
    tally = Tally()
    sequence = 0
    while time.perf_counter() < deadline:
        item = next_item(worker, sequence)
        started = time.perf_counter()
        try:
            output = send(item)
        # Same policy as async_worker: a failed call is counted, the loop goes on.
        except Exception as exc:
            tally.fail(f"{type(exc).__name__}: {exc}")
        else:
            tally.settle(workload, item, sequence, time.perf_counter() - started, output)
        sequence += 1
    return tally


async def measure_async(mode: str, send: AsyncSend, workload: Workload, config: RunConfig) -> Row:
    async def run_for(seconds: float) -> tuple[list[Tally], float]:
        started = time.perf_counter()
        deadline = started + seconds
        workers = [async_worker(send, workload, worker, deadline) for worker in range(config.concurrency)]
        tallies = await asyncio.gather(*workers)
        return list(tallies), time.perf_counter() - started

    await run_for(config.warmup)
    tallies, elapsed = await run_for(config.duration)
    return summarize(mode, config, tallies, elapsed)


def measure_threads(mode: str, send: SyncSend, workload: Workload, config: RunConfig) -> Row:
    with ThreadPoolExecutor(max_workers=config.concurrency) as pool:

        def run_for(seconds: float) -> tuple[list[Tally], float]:
            started = time.perf_counter()
            deadline = started + seconds
            futures = [
                pool.submit(thread_worker, send, workload, worker, deadline)
                for worker in range(config.concurrency)
            ]
            tallies = [future.result() for future in futures]
            return tallies, time.perf_counter() - started

        run_for(config.warmup)
        tallies, elapsed = run_for(config.duration)
    return summarize(mode, config, tallies, elapsed)


def inprocess_send(session: ort.InferenceSession, workload: Workload) -> SyncSend:
    def send(item: int) -> np.ndarray:
        outputs: list[np.ndarray] = session.run(
            [workload.output_name], {workload.input_name: workload.inputs[item]}
        )
        return outputs[0]

    return send


def infer_path(workload: Workload) -> str:
    if workload.version:
        return f"/v2/models/{workload.model}/versions/{workload.version}/infer"
    return f"/v2/models/{workload.model}/infer"


def find_output(outputs: list[dict[str, Any]], name: str) -> tuple[int, dict[str, Any]]:
    for index, output in enumerate(outputs):
        if output.get("name") == name:
            return index, output
    raise ProtocolError(f"no output {name!r} in response, got {[o.get('name') for o in outputs]}")


def expect_ok(response: httpx.Response) -> None:
    if response.status_code != 200:
        raise ProtocolError(f"HTTP {response.status_code}: {response.text[:200]}")


def rest_json_send(client: httpx.AsyncClient, workload: Workload) -> AsyncSend:
    # Bodies are encoded up front so that the load generator spends its CPU on the exchange itself.
    bodies = [
        orjson.dumps(
            {
                "inputs": [
                    {
                        "name": workload.input_name,
                        "shape": list(x.shape),
                        "datatype": workload.datatype,
                        "data": x.ravel(),
                    }
                ],
                "outputs": [{"name": workload.output_name}],
            },
            option=orjson.OPT_SERIALIZE_NUMPY,
        )
        for x in workload.inputs
    ]
    dtype = workload.expected[0].dtype
    headers = {"Content-Type": "application/json"}
    path = infer_path(workload)

    async def send(item: int) -> np.ndarray:
        response = await client.post(path, content=bodies[item], headers=headers)
        expect_ok(response)
        _, output = find_output(orjson.loads(response.content)["outputs"], workload.output_name)
        return np.asarray(output["data"], dtype=dtype).reshape(output["shape"])

    return send


def binary_request(workload: Workload, x: np.ndarray) -> tuple[bytes, int]:
    raw = x.astype(x.dtype.newbyteorder("<"), copy=False).tobytes()
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": workload.input_name,
                    "shape": list(x.shape),
                    "datatype": workload.datatype,
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": workload.output_name, "parameters": {"binary_data": True}}],
        }
    )
    return header + raw, len(header)


def parse_binary_response(response: httpx.Response, name: str, dtype: np.dtype) -> np.ndarray:
    if HEADER_LENGTH not in response.headers:
        raise ProtocolError(f"binary response lacks the {HEADER_LENGTH} header")
    body = response.content
    header_length = int(response.headers[HEADER_LENGTH])
    outputs = orjson.loads(body[:header_length])["outputs"]
    index, output = find_output(outputs, name)
    # Binary outputs follow the JSON header back to back, in the order the header lists them.
    offset = header_length + sum(o.get("parameters", {}).get("binary_data_size", 0) for o in outputs[:index])
    size = output.get("parameters", {}).get("binary_data_size")
    if size is None:
        raise ProtocolError(f"output {name!r} came back without binary_data_size: {output}")
    if offset + size > len(body):
        raise ProtocolError(f"body is {len(body)} bytes, output {name!r} needs {offset + size}")
    data = np.frombuffer(body, dtype=dtype.newbyteorder("<"), count=size // dtype.itemsize, offset=offset)
    return data.reshape(output["shape"])


def rest_binary_send(client: httpx.AsyncClient, workload: Workload) -> AsyncSend:
    requests = [binary_request(workload, x) for x in workload.inputs]
    dtype = workload.expected[0].dtype
    path = infer_path(workload)

    async def send(item: int) -> np.ndarray:
        body, header_length = requests[item]
        headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(header_length)}
        response = await client.post(path, content=body, headers=headers)
        expect_ok(response)
        return parse_binary_response(response, workload.output_name, dtype)

    return send


def grpc_request(workload: Workload, x: np.ndarray) -> service_pb2.ModelInferRequest:
    return service_pb2.ModelInferRequest(
        model_name=workload.model,
        model_version=workload.version,
        inputs=[
            service_pb2.ModelInferRequest.InferInputTensor(
                name=workload.input_name, datatype=workload.datatype, shape=list(x.shape)
            )
        ],
        outputs=[service_pb2.ModelInferRequest.InferRequestedOutputTensor(name=workload.output_name)],
        raw_input_contents=[x.astype(x.dtype.newbyteorder("<"), copy=False).tobytes()],
    )


def parse_grpc_response(response: service_pb2.ModelInferResponse, name: str, dtype: np.dtype) -> np.ndarray:
    names = [output.name for output in response.outputs]
    if name not in names:
        raise ProtocolError(f"no output {name!r} in response, got {names}")
    index = names.index(name)
    if len(response.raw_output_contents) != len(response.outputs):
        raise ProtocolError(
            f"{len(response.outputs)} outputs but {len(response.raw_output_contents)} raw_output_contents"
        )
    data = np.frombuffer(response.raw_output_contents[index], dtype=dtype.newbyteorder("<"))
    return data.reshape(list(response.outputs[index].shape))


def grpc_send(stub: service_pb2_grpc.GRPCInferenceServiceStub, workload: Workload) -> AsyncSend:
    requests = [grpc_request(workload, x) for x in workload.inputs]
    dtype = workload.expected[0].dtype

    async def send(item: int) -> np.ndarray:
        response = await stub.ModelInfer(requests[item], timeout=REQUEST_TIMEOUT_S)
        return parse_grpc_response(response, workload.output_name, dtype)

    return send


def tfserving_path(workload: Workload) -> str:
    version = f"/versions/{workload.version}" if workload.version else ""
    return f"/v1/models/{workload.model}{version}:predict"


def tfserving_rest_send(client: httpx.AsyncClient, workload: Workload) -> AsyncSend:
    """TF Serving's REST predict, columnar: {"inputs": {name: nested list}} -> {"outputs": ...}."""
    bodies = [
        orjson.dumps({"inputs": {workload.input_name: x}}, option=orjson.OPT_SERIALIZE_NUMPY)
        for x in workload.inputs
    ]
    dtype = workload.expected[0].dtype
    headers = {"Content-Type": "application/json"}
    path = tfserving_path(workload)

    async def send(item: int) -> np.ndarray:
        response = await client.post(path, content=bodies[item], headers=headers)
        expect_ok(response)
        outputs = orjson.loads(response.content)["outputs"]
        # A model with one output answers its value alone, not an object keyed by name.
        value = outputs[workload.output_name] if isinstance(outputs, dict) else outputs
        return np.asarray(value, dtype=dtype)

    return send


def tfserving_grpc_send(channel: grpc.aio.Channel, workload: Workload) -> AsyncSend:
    """TF Serving's gRPC PredictionService.Predict with the official protos (the tensorflow extra)."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    requests = []
    for x in workload.inputs:
        request = predict_pb2.PredictRequest(output_filter=[workload.output_name])
        request.model_spec.name = workload.model
        if workload.version:
            request.model_spec.version.value = int(workload.version)
        request.inputs[workload.input_name].CopyFrom(tf.make_tensor_proto(x))
        requests.append(request)

    async def send(item: int) -> np.ndarray:
        response = await stub.Predict(requests[item], timeout=REQUEST_TIMEOUT_S)
        if workload.output_name not in response.outputs:
            raise ProtocolError(
                f"no output {workload.output_name!r} in response, got {list(response.outputs)}"
            )
        return tf.make_ndarray(response.outputs[workload.output_name])

    return send


async def ensure_ready(
    args: argparse.Namespace, client: httpx.AsyncClient, stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    """Fail fast, before any mode runs, when a gateway endpoint needed by the chosen modes is down."""
    if {"rest-json", "rest-binary", "tfserving-rest"} & set(args.modes):
        try:
            response = await client.get("/v2/health/ready")
        except httpx.HTTPError as exc:
            sys.exit(f"REST endpoint {args.http} unreachable: {exc!r}")
        if response.status_code != 200:
            sys.exit(f"REST endpoint {args.http} not ready: HTTP {response.status_code}")
    if {"grpc", "tfserving-grpc"} & set(args.modes):
        try:
            ready = await stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=5.0)
        except grpc.aio.AioRpcError as exc:
            sys.exit(f"gRPC endpoint {args.grpc} unreachable: {exc.code().name} {exc.details()}")
        if not ready.ready:
            sys.exit(f"gRPC endpoint {args.grpc} not ready")


async def run_modes(args: argparse.Namespace, session: ort.InferenceSession, workload: Workload) -> list[Row]:
    config = RunConfig(args.concurrency, args.batch, args.duration, args.warmup)
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    grpc_options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    async with (
        httpx.AsyncClient(base_url=f"http://{args.http}", limits=limits, timeout=REQUEST_TIMEOUT_S) as client,
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
