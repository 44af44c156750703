"""Minimal KServe model server for the peers benchmark: one ONNX model on onnxruntime, v2 REST and gRPC.

Usage (inside KServe's venv, benchmarks/peers/kserve): python kserve_server.py MODEL.onnx NAME HTTP GRPC

KServe's own servers serve it, in the setting its docs give for one core: one uvicorn worker
(`workers=1`, its default), which runs REST and KServe's gRPC server (its `GRPCServer`, servicer
and interceptors) in the same event loop, and no log line per request (`enable_latency_logging`
off, and its loggers at WARNING through a log config, as `--log_config_file` takes).

KServe 0.21 hard-codes the addresses it listens on: 0.0.0.0 for REST and `[::]` for gRPC. These
benchmarks listen on loopback only, so the two servers are built with 127.0.0.1 instead: uvicorn's
Config gets host 127.0.0.1, and the `aio.server` that KServe's `GRPCServer.start` builds is one
whose `add_insecure_port` replaces `[::]` with 127.0.0.1. Nothing else in KServe's code changes.
"""

from __future__ import annotations

import copy
import sys
import uuid
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnxruntime as ort
import uvicorn
from grpc import aio
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve import logging as kserve_logging
from kserve.protocol.grpc import server as grpc_server
from kserve.protocol.rest import server as rest_server

LOOPBACK = "127.0.0.1"
# The loggers that write a line per request at INFO: latency, gRPC method, uvicorn's access log.
QUIET_LOGGERS = ("kserve", "kserve.trace", "uvicorn.access")


class LoopbackConfig(uvicorn.Config):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["host"] = LOOPBACK
        super().__init__(*args, **kwargs)


def loopback_aio_server(*args: Any, **kwargs: Any) -> aio.Server:
    """grpc.aio.server, whose `add_insecure_port("[::]:PORT")` listens on 127.0.0.1:PORT instead."""
    server = aio.server(*args, **kwargs)
    add_port = server.add_insecure_port

    def add_loopback_port(address: str) -> int:
        return add_port(address.replace("[::]", LOOPBACK, 1))

    server.add_insecure_port = add_loopback_port
    return server


class OnnxModel(Model):
    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path
        self.load()

    def load(self) -> bool:
        options = ort.SessionOptions()
        # Same threading as the gateway's onnxruntime adapter and load.py's in-process mode.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [node.name for node in self.session.get_outputs()]
        self.ready = True
        return self.ready

    async def predict(
        self, payload: InferRequest, headers: dict[str, str] | None = None, response_headers: Any = None
    ) -> InferResponse:
        x = payload.inputs[0].as_numpy().astype(np.float32, copy=False)
        results = self.session.run(self.output_names, {self.input_name: x})
        outputs = []
        for name, value in zip(self.output_names, results, strict=True):
            output = InferOutput(name=name, shape=list(value.shape), datatype="FP32")
            output.set_data_from_numpy(value, binary_data=False)
            outputs.append(output)
        # The v2 response id is a required string; KServe's own runtimes make one when the request has none.
        response_id = payload.id or str(uuid.uuid4())
        # KServe's rule: a gRPC request with raw inputs gets raw outputs back.
        return InferResponse(
            model_name=self.name,
            infer_outputs=outputs,
            response_id=response_id,
            use_binary_outputs=payload.use_binary_outputs,
        )


def quiet_log_config() -> dict[str, Any]:
    config = copy.deepcopy(kserve_logging.KSERVE_LOG_CONFIG)
    for name in QUIET_LOGGERS:
        config["loggers"][name]["level"] = "WARNING"
    return config


def main() -> None:
    path, name, http_port, grpc_port = sys.argv[1:5]
    kserve_logging.configure_logging(quiet_log_config())
    model = OnnxModel(name, path)
    rest_server.uvicorn.Config = LoopbackConfig  # type: ignore[misc]
    grpc_server.aio = SimpleNamespace(server=loopback_aio_server)  # type: ignore[assignment]
    ModelServer(
        http_port=int(http_port),
        grpc_port=int(grpc_port),
        workers=1,
        enable_grpc=True,
        enable_latency_logging=False,
    ).start([model])


if __name__ == "__main__":
    main()
