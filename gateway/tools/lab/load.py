"""The load generator behind `modelyard bench` and benchmarks/load.py: closed-loop workers that each
send one request at a time over REST JSON, REST binary, gRPC or TF Serving's APIs, check a sample of
answers against expected outputs, and summarize latency percentiles and throughput.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import numpy as np
import orjson
from tritonclient.grpc import service_pb2, service_pb2_grpc

# Distinct inputs cycled through so that no layer can answer from a cache of one request.
INPUT_POOL_SIZE = 32
# Every Nth response of each worker is compared against the in-process reference.
CHECK_EVERY = 10
RTOL = 1e-4
ATOL = 1e-5
REQUEST_TIMEOUT_S = 30.0
HEADER_LENGTH = "Inference-Header-Content-Length"

Array = np.ndarray[Any, Any]
AsyncSend = Callable[[int], Awaitable[Array]]
SyncSend = Callable[[int], Array]


class ProtocolError(Exception):
    """The server answered, but not in the shape the protocol prescribes."""


@dataclass(frozen=True)
class Workload:
    model: str
    version: str
    input_name: str
    output_name: str
    datatype: str
    inputs: list[Array]
    expected: list[Array]

    def mismatch(self, item: int, output: Array) -> str | None:
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

    def settle(self, workload: Workload, item: int, sequence: int, latency: float, output: Array) -> None:
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


async def run_async(send: AsyncSend, workload: Workload, config: RunConfig) -> tuple[list[Tally], float]:
    """Warm up, then run `config.concurrency` workers for `config.duration`: their tallies and the
    measured seconds."""

    async def run_for(seconds: float) -> tuple[list[Tally], float]:
        started = time.perf_counter()
        deadline = started + seconds
        workers = [async_worker(send, workload, worker, deadline) for worker in range(config.concurrency)]
        tallies = await asyncio.gather(*workers)
        return list(tallies), time.perf_counter() - started

    await run_for(config.warmup)
    return await run_for(config.duration)


async def measure_async(mode: str, send: AsyncSend, workload: Workload, config: RunConfig) -> Row:
    tallies, elapsed = await run_async(send, workload, config)
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


def infer_path(workload: Workload) -> str:
    if workload.version:
        return f"/v2/models/{workload.model}/versions/{workload.version}/infer"
    return f"/v2/models/{workload.model}/infer"


def find_output(outputs: list[dict[str, Any]], name: str) -> tuple[int, dict[str, Any]]:
    for index, output in enumerate(outputs):
        if output.get("name") == name:
            return index, output
    raise ProtocolError(f"no output {name!r} in response, got {[o.get('name') for o in outputs]}")


@dataclass(frozen=True)
class Answer:
    """One REST answer, read whole."""

    status: int
    body: bytes
    headers: Mapping[str, str]


class RestClient:
    """The load's REST requests, over one keep-alive aiohttp session to a gateway's HTTP port.

    aiohttp rather than httpx: on the 2-core VM httpx took about 3.8 ms of client CPU per request and
    aiohttp about 0.35 ms (measured side by side on the same gateway), so one generator core keeps up
    with the gateway instead of being the bound.
    """

    def __init__(self, base_url: str, connections: int) -> None:
        self.base_url = base_url.rstrip("/")
        self.connections = connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> RestClient:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.connections),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self, method: str, path: str, body: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> Answer:
        assert self._session is not None, "use RestClient as an async context manager"
        async with self._session.request(
            method, self.base_url + path, data=body, headers=headers
        ) as response:
            return Answer(response.status, await response.read(), response.headers)

    async def post(self, path: str, body: bytes, headers: Mapping[str, str]) -> Answer:
        return await self.request("POST", path, body, headers)

    async def get(self, path: str) -> Answer:
        return await self.request("GET", path)


def expect_ok(answer: Answer) -> None:
    if answer.status != 200:
        raise ProtocolError(f"HTTP {answer.status}: {answer.body[:200].decode(errors='replace')}")


def rest_json_send(client: RestClient, workload: Workload) -> AsyncSend:
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

    async def send(item: int) -> Array:
        answer = await client.post(path, bodies[item], headers)
        expect_ok(answer)
        _, output = find_output(orjson.loads(answer.body)["outputs"], workload.output_name)
        return np.asarray(output["data"], dtype=dtype).reshape(output["shape"])

    return send


def binary_request(workload: Workload, x: Array) -> tuple[bytes, int]:
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


def parse_binary_response(answer: Answer, name: str, dtype: np.dtype[Any]) -> Array:
    if HEADER_LENGTH not in answer.headers:
        raise ProtocolError(f"binary response lacks the {HEADER_LENGTH} header")
    body = answer.body
    header_length = int(answer.headers[HEADER_LENGTH])
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


def rest_binary_send(client: RestClient, workload: Workload) -> AsyncSend:
    requests = [binary_request(workload, x) for x in workload.inputs]
    dtype = workload.expected[0].dtype
    path = infer_path(workload)

    async def send(item: int) -> Array:
        body, header_length = requests[item]
        headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(header_length)}
        answer = await client.post(path, body, headers)
        expect_ok(answer)
        return parse_binary_response(answer, workload.output_name, dtype)

    return send


def grpc_request(workload: Workload, x: Array) -> service_pb2.ModelInferRequest:
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


def parse_grpc_response(response: service_pb2.ModelInferResponse, name: str, dtype: np.dtype[Any]) -> Array:
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

    async def send(item: int) -> Array:
        response = await stub.ModelInfer(requests[item], timeout=REQUEST_TIMEOUT_S)
        return parse_grpc_response(response, workload.output_name, dtype)

    return send


def tfserving_path(workload: Workload) -> str:
    version = f"/versions/{workload.version}" if workload.version else ""
    return f"/v1/models/{workload.model}{version}:predict"


def tfserving_rest_send(client: RestClient, workload: Workload) -> AsyncSend:
    """TF Serving's REST predict, columnar: {"inputs": {name: nested list}} -> {"outputs": ...}."""
    bodies = [
        orjson.dumps({"inputs": {workload.input_name: x}}, option=orjson.OPT_SERIALIZE_NUMPY)
        for x in workload.inputs
    ]
    dtype = workload.expected[0].dtype
    headers = {"Content-Type": "application/json"}
    path = tfserving_path(workload)

    async def send(item: int) -> Array:
        answer = await client.post(path, bodies[item], headers)
        expect_ok(answer)
        outputs = orjson.loads(answer.body)["outputs"]
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

    async def send(item: int) -> Array:
        response = await stub.Predict(requests[item], timeout=REQUEST_TIMEOUT_S)
        if workload.output_name not in response.outputs:
            raise ProtocolError(
                f"no output {workload.output_name!r} in response, got {list(response.outputs)}"
            )
        output: Array = tf.make_ndarray(response.outputs[workload.output_name])
        return output

    return send
