"""A canned-answer v2 server on the gateway's own stack: the floor the peers bench measures against.

REST is a bare ASGI app on uvicorn with httptools, through the gateway's own connection protocol
(its connection guard, and one socket write per answer), gRPC is grpc.aio serving tritonclient's
generated `inference.GRPCInferenceService` with the gRPC core experiments the gateway sets, both in
one uvloop event loop, as `gateway/server.py` runs them. With `--grpc-server native` its gRPC side is
pygrpc-native instead, as the gateway's `MODELYARD_GRPC_SERVER=native` runs it: the floor of that stack.
Every infer request is read in full and answered with the same bytes, prepared before the server
starts: the v2 answer to the bench's fixed mlp input (JSON, or Triton's binary extension when the
request uses it) and the same answer as a ModelInferResponse. Nothing is decoded or computed per
request, so a row against this server is what the client, the HTTP or gRPC library and the event
loop cost by themselves.

    python benchmarks/canned.py --answers DIR --http-port P --grpc-port Q [--grpc-server grpcio|native]

DIR holds what `write_answers` puts there (benchmarks/peers.py calls it with onnxruntime's answer):
answer.json, answer.bin (with its JSON header's length in answer.bin.header) and answer.pb.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
from pathlib import Path
from typing import Any

# The gateway's package first: it sets the gRPC core experiments the gateway runs with as grpc is
# imported (gateway/__init__.py), so this floor runs the same gRPC stack.
import gateway  # noqa: F401

# isort: split
import grpc
import numpy as np
import uvicorn
import uvloop
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.grpc_native import native_server
from gateway.protocols.connections import ConnectionGuard, ConnectionLimits

BINARY_HEADER = b"inference-header-content-length"
READY = b'{"ready":true}'


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=Path, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument(
        "--grpc-server",
        choices=("grpcio", "native"),
        default="grpcio",
        help="the gRPC server library, as the gateway's MODELYARD_GRPC_SERVER picks it",
    )
    return parser.parse_args()


def write_answers(folder: Path, model: str, version: str, output: str, value: np.ndarray) -> None:
    """The answers `CannedRest` and `CannedGrpc` serve: one FP32 output `output` holding `value`."""
    folder.mkdir(parents=True, exist_ok=True)
    tensor = {"name": output, "datatype": "FP32", "shape": list(value.shape)}
    head = {"model_name": model, "model_version": version}
    as_json = {**head, "outputs": [{**tensor, "data": value.ravel().tolist()}]}
    (folder / "answer.json").write_bytes(json.dumps(as_json).encode())
    raw = value.astype("<f4").tobytes()
    header = json.dumps(
        {**head, "outputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}]}
    ).encode()
    (folder / "answer.bin").write_bytes(header + raw)
    (folder / "answer.bin.header").write_text(str(len(header)))
    message = service_pb2.ModelInferResponse(model_name=model, model_version=version)
    message.outputs.add(**tensor)
    message.raw_output_contents.append(raw)
    (folder / "answer.pb").write_bytes(message.SerializeToString())


def _start(status: int, content_type: bytes, length: int, extra: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    headers = [(b"content-type", content_type), (b"content-length", str(length).encode()), *extra]
    return {"type": "http.response.start", "status": status, "headers": headers}


class CannedRest:
    """POST .../infer: the canned answer; GET /v2/health/ready: ready; anything else: 404."""

    def __init__(self, answers: Path) -> None:
        self.json = (answers / "answer.json").read_bytes()
        self.binary = (answers / "answer.bin").read_bytes()
        header = (answers / "answer.bin.header").read_text().strip().encode()
        self.json_start = _start(200, b"application/json", len(self.json), [])
        self.binary_start = _start(
            200, b"application/octet-stream", len(self.binary), [(BINARY_HEADER, header)]
        )

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; nothing else reaches an HTTP-only app
        path = scope["path"]
        if scope["method"] == "POST" and path.endswith("/infer"):
            more = True
            while more:  # the whole body is read, as a real server must
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                more = message.get("more_body", False)
            binary = any(name == BINARY_HEADER for name, _ in scope["headers"])
            await send(self.binary_start if binary else self.json_start)
            await send({"type": "http.response.body", "body": self.binary if binary else self.json})
        elif path in ("/v2/health/ready", "/v2/health/live"):
            await send(_start(200, b"application/json", len(READY), []))
            await send({"type": "http.response.body", "body": READY})
        else:
            await send(_start(404, b"application/json", 2, []))
            await send({"type": "http.response.body", "body": b"{}"})


class CannedGrpc(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, answers: Path) -> None:
        self.answer = service_pb2.ModelInferResponse.FromString((answers / "answer.pb").read_bytes())

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerReadyResponse(ready=True)

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        return self.answer


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling, as the gateway runs it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


async def serve(args: argparse.Namespace) -> None:
    # The message limits the gateway sets by default (grpc_max_message_mb: 256).
    limit = 256 * 1024 * 1024
    options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
    grpc_server = native_server(options) if args.grpc_server == "native" else grpc.aio.server(options=options)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(CannedGrpc(args.answers), grpc_server)
    grpc_server.add_insecure_port(f"127.0.0.1:{args.grpc_port}")
    await grpc_server.start()
    config = uvicorn.Config(
        CannedRest(args.answers),
        host="127.0.0.1",
        port=args.http_port,
        access_log=False,
        proxy_headers=False,  # as the gateway runs uvicorn
        server_header=False,
        lifespan="off",
        loop="none",
        http=ConnectionGuard(ConnectionLimits()).protocol_class(),
        log_level="warning",
    )
    http_server = _Server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    http_task = asyncio.create_task(http_server.serve())
    await stop.wait()
    http_server.should_exit = True
    await grpc_server.stop(1.0)
    await http_task


def main() -> None:
    args = parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args))


if __name__ == "__main__":
    main()
