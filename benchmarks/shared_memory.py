"""System shared memory against raw gRPC contents: the heavy MLP (1024 -> 2048 -> 2048 -> 10,
built here from fixed seeds, as benchmarks/batching.py builds it) through `ModelInfer` with its
input in `raw_input_contents` and its output in `raw_output_contents` (`raw`), and with both in
POSIX shared memory regions registered with the gateway (`shm`), at the same concurrency.

The gateway is started here (pinned to CPU 0, the client to CPU 1) with
MODELYARD_ALLOW_CLIENT_SHM=true. In `shm` mode each in-flight request has its own input and output
region; the client copies the input into its region before the call and the output out of its
region after it, as a client that holds its data elsewhere would. Every 10th answer of each
worker is checked against onnxruntime run directly.

    .venv/bin/python benchmarks/shared_memory.py --batch 32 --concurrency 4 --duration 4
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import service_pb2, service_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ab import cpu_seconds
from batching import SIZES
from drive import gateway

from gateway.tools.lab.load import (
    INPUT_POOL_SIZE,
    REQUEST_TIMEOUT_S,
    Array,
    Row,
    RunConfig,
    Workload,
    grpc_send,
    measure_async,
)
from gateway.tools.lab.machine import cpu_model
from scripts.build_models import _save, build_mlp

MODEL = "heavy"
# The layer sizes of each model --model names; both take and give the same tensors.
MODELS = {"heavy": SIZES, "thin": (SIZES[0], SIZES[-1])}
INPUT_SEED = 20240601


class SharedMemorySend:
    """ModelInfer with the input and output in shared memory: one pair of regions per in-flight
    request (a slot), registered before the clock starts."""

    def __init__(
        self, stub: service_pb2_grpc.GRPCInferenceServiceStub, workload: Workload, slots: int
    ) -> None:
        self.stub = stub
        self.workload = workload
        x, y = workload.inputs[0], workload.expected[0]
        self.in_bytes, self.out_bytes = x.nbytes, y.nbytes
        self.out_shape, self.out_dtype = y.shape, y.dtype
        self.handles: list[Any] = []
        self.free: asyncio.Queue[int] = asyncio.Queue()
        self.requests: list[Any] = []
        for slot in range(slots):
            self.free.put_nowait(slot)
            request = service_pb2.ModelInferRequest(model_name=workload.model)
            tensor = request.inputs.add(
                name=workload.input_name, datatype=workload.datatype, shape=list(x.shape)
            )
            tensor.parameters["shared_memory_region"].string_param = f"in{slot}"
            tensor.parameters["shared_memory_byte_size"].int64_param = self.in_bytes
            output = request.outputs.add(name=workload.output_name)
            output.parameters["shared_memory_region"].string_param = f"out{slot}"
            output.parameters["shared_memory_byte_size"].int64_param = self.out_bytes
            self.requests.append(request)

    async def register(self) -> None:
        await self.stub.SystemSharedMemoryUnregister(service_pb2.SystemSharedMemoryUnregisterRequest())
        for slot in range(len(self.requests)):
            for name, size in ((f"in{slot}", self.in_bytes), (f"out{slot}", self.out_bytes)):
                key = f"/modelyard_bench_{os.getpid()}_{name}"
                self.handles.append(shm.create_shared_memory_region(name, key, size))
                await self.stub.SystemSharedMemoryRegister(
                    service_pb2.SystemSharedMemoryRegisterRequest(
                        name=name, key=key, offset=0, byte_size=size
                    )
                )

    async def send(self, item: int) -> Array:
        slot = await self.free.get()
        try:
            shm.set_shared_memory_region(self.handles[2 * slot], [self.workload.inputs[item]])
            response = await self.stub.ModelInfer(self.requests[slot], timeout=REQUEST_TIMEOUT_S)
            if response.outputs[0].name != self.workload.output_name:
                raise RuntimeError(f"unexpected output {response.outputs[0].name!r}")
            out = shm.get_contents_as_numpy(self.handles[2 * slot + 1], self.out_dtype, list(self.out_shape))
            return np.array(out, copy=True)
        finally:
            self.free.put_nowait(slot)

    async def close(self) -> None:
        await self.stub.SystemSharedMemoryUnregister(service_pb2.SystemSharedMemoryUnregisterRequest())
        for handle in self.handles:
            shm.destroy_shared_memory_region(handle)


def build_workload(model: Path, batch: int) -> Workload:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(INPUT_SEED)
    inputs = [rng.standard_normal((batch, SIZES[0])).astype(np.float32) for _ in range(INPUT_POOL_SIZE)]
    expected = [session.run(["logits"], {"input": x})[0] for x in inputs]
    return Workload(MODEL, "", "input", "logits", "FP32", inputs, expected)


def counted(send: Any) -> tuple[Any, list[int]]:
    """`send`, counting the calls it answered (warm-up ones too: the CPU figure covers them)."""
    count = [0]

    async def call(item: int) -> Array:
        answer = await send(item)
        count[0] += 1
        return answer

    return call, count


async def run(
    address: str, workload: Workload, config: RunConfig, modes: list[str], server_pid: int
) -> list[tuple[Row, float]]:
    """Each mode's row and the gateway's CPU µs per answered request (all its threads)."""
    options = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
    rows = []
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        shared = SharedMemorySend(stub, workload, config.concurrency)
        await shared.register()
        try:
            for mode in modes:
                send, count = counted(grpc_send(stub, workload) if mode == "raw" else shared.send)
                before = cpu_seconds(server_pid)
                row = await measure_async(mode, send, workload, config)
                rows.append((row, (cpu_seconds(server_pid) - before) * 1e6 / max(count[0], 1)))
        finally:
            await shared.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--modes", default="raw,shm,raw,shm", help="run in this order")
    parser.add_argument(
        "--model",
        choices=sorted(MODELS),
        default="heavy",
        help="thin: the same tensors as heavy's through one 1024 -> 10 layer, so the transport's share shows",
    )
    args = parser.parse_args()
    modes = args.modes.split(",")
    if set(modes) - {"raw", "shm"}:
        sys.exit("modes are raw and shm")
    os.environ["MODELYARD_ALLOW_CLIENT_SHM"] = "true"
    with tempfile.TemporaryDirectory() as folder:
        repo = Path(folder) / "repo"
        model = repo / MODEL / "1" / "model.onnx"
        sizes = MODELS[args.model]
        _save(build_mlp(sizes, seed=11, name=MODEL), model)
        workload = build_workload(model, args.batch)
        with gateway(repo, "/v2/health/ready") as (_, endpoint, running):
            if (os.cpu_count() or 1) >= 2:
                os.sched_setaffinity(0, {1})
            config = RunConfig(args.concurrency, args.batch, args.duration, args.warmup)
            rows = asyncio.run(run(endpoint.grpc, workload, config, modes, running.pid))
    cpu = cpu_model()
    print(f"machine: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(
        f"{args.model} MLP {' -> '.join(map(str, sizes))}, batch {args.batch} ({workload.inputs[0].nbytes} bytes in), "
        f"concurrency {args.concurrency}, {args.duration:g} s per run"
    )
    print(
        f"{'mode':<6} {'requests':>9} {'req/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'errors':>7} "
        f"{'gateway CPU µs/request':>23}"
    )
    for row, cpu_us in rows:
        print(
            f"{row.mode:<6} {row.requests:>9} {row.req_per_s:>9.1f} {row.p50_ms:>8.3f} {row.p90_ms:>8.3f} "
            f"{row.p99_ms:>8.3f} {row.errors:>7} {cpu_us:>23.0f}"
        )
        if row.first_error:
            print(f"  first error: {row.first_error}")


if __name__ == "__main__":
    main()
