"""Streaming against unary gRPC: the same model and inputs through `ModelInfer` calls and through
one `ModelStreamInfer` stream, at the same concurrency.

- `unary`: `--concurrency` workers on one grpc.aio channel, each a `ModelInfer` call after another
  (what benchmarks/load.py's `grpc` mode does);
- `stream`: the same workers sharing one bidirectional stream, so up to `--concurrency` requests
  are in flight on it; each answer is matched to its request by the request's `id`.

Every 10th answer of each worker is checked against onnxruntime run directly. Start a gateway
first (see benchmarks/results/stream.md), then:

    .venv/bin/python benchmarks/stream.py --grpc 127.0.0.1:8001 --duration 10 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.tools.lab.load import (
    INPUT_POOL_SIZE,
    REQUEST_TIMEOUT_S,
    Array,
    AsyncSend,
    Row,
    RunConfig,
    Workload,
    grpc_request,
    grpc_send,
    measure_async,
    parse_grpc_response,
)
from gateway.tools.lab.machine import cpu_model

INPUT_SEED = 20240601
ROOT = Path(__file__).resolve().parent.parent


class StreamClient:
    """One ModelStreamInfer stream shared by every worker. Each in-flight request holds a slot,
    whose number is its id; its requests are built before the clock starts, one per slot and input."""

    def __init__(
        self, stub: service_pb2_grpc.GRPCInferenceServiceStub, workload: Workload, slots: int
    ) -> None:
        self.call = stub.ModelStreamInfer(timeout=None)
        self.dtype = workload.expected[0].dtype
        self.output_name = workload.output_name
        self.requests: list[list[Any]] = []
        for slot in range(slots):
            row = []
            for x in workload.inputs:
                request = grpc_request(workload, x)
                request.id = str(slot)
                row.append(request)
            self.requests.append(row)
        self.free: asyncio.Queue[int] = asyncio.Queue()
        for slot in range(slots):
            self.free.put_nowait(slot)
        self.waiting: dict[str, asyncio.Future[Any]] = {}
        self.writing = asyncio.Lock()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            answer = await self.call.read()
            if answer is grpc.aio.EOF:
                return
            future = self.waiting.pop(answer.infer_response.id, None)
            if future is not None and not future.done():
                future.set_result(answer)

    async def send(self, item: int) -> Array:
        slot = await self.free.get()
        try:
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self.waiting[str(slot)] = future
            async with self.writing:
                await self.call.write(self.requests[slot][item])
            answer = await asyncio.wait_for(future, REQUEST_TIMEOUT_S)
        finally:
            self.free.put_nowait(slot)
        if answer.error_message:
            raise RuntimeError(answer.error_message)
        return parse_grpc_response(answer.infer_response, self.output_name, self.dtype)

    async def close(self) -> None:
        await self.call.done_writing()
        await self.reader


def build_workload(args: argparse.Namespace) -> Workload:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(args.onnx), options, providers=["CPUExecutionProvider"])
    meta = next(node for node in session.get_inputs() if node.name == args.input_name)
    rng = np.random.default_rng(INPUT_SEED)
    shape = (args.batch, *meta.shape[1:])
    inputs = [rng.standard_normal(shape).astype(np.float32) for _ in range(INPUT_POOL_SIZE)]
    expected = [session.run([args.output_name], {args.input_name: x})[0] for x in inputs]
    return Workload(args.model, "", args.input_name, args.output_name, "FP32", inputs, expected)


async def run(args: argparse.Namespace, workload: Workload) -> list[Row]:
    config = RunConfig(args.concurrency, args.batch, args.duration, args.warmup)
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    rows = []
    async with grpc.aio.insecure_channel(args.grpc, options=options) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        ready = await stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=10)
        if not ready.ready:
            sys.exit(f"the gateway at {args.grpc} is not ready")
        for mode in args.modes.split(","):
            if mode == "unary":
                rows.append(await measure_async("unary", grpc_send(stub, workload), workload, config))
            elif mode == "stream":
                client = StreamClient(stub, workload, args.concurrency)
                send: AsyncSend = client.send
                rows.append(await measure_async("stream", send, workload, config))
                await client.close()
            else:
                sys.exit(f"unknown mode {mode!r}: unary or stream")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grpc", default="127.0.0.1:8001")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--onnx", type=Path, default=ROOT / "model_repo" / "mlp" / "1" / "model.onnx")
    parser.add_argument("--input-name", default="input")
    parser.add_argument("--output-name", default="logits")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--modes", default="unary,stream,unary,stream", help="run in this order")
    args = parser.parse_args()
    rows = asyncio.run(run(args, build_workload(args)))
    cpu = cpu_model()
    print(f"machine: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(
        f"model {args.model}, batch {args.batch}, concurrency {args.concurrency}, {args.duration:g} s per run"
    )
    print(f"{'mode':<8} {'requests':>9} {'req/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for row in rows:
        print(
            f"{row.mode:<8} {row.requests:>9} {row.req_per_s:>9.1f} {row.p50_ms:>8.3f} {row.p90_ms:>8.3f} "
            f"{row.p99_ms:>8.3f} {row.errors:>7}"
        )
        if row.first_error:
            print(f"  first error: {row.first_error}")


if __name__ == "__main__":
    main()
