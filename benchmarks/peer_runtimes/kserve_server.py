"""Minimal KServe model server for the peers benchmark: one ONNX model on onnxruntime, v2 REST.

Usage (inside KServe's venv, benchmarks/peers/kserve): python kserve_server.py MODEL.onnx NAME HTTP GRPC
"""

from __future__ import annotations

import sys
import uuid
from typing import Any

import numpy as np
import onnxruntime as ort
import uvicorn
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve.protocol.rest import server as rest_server


class LoopbackConfig(uvicorn.Config):
    """KServe 0.21 hard-codes host 0.0.0.0 for its REST server; the benchmark binds loopback only."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["host"] = "127.0.0.1"
        super().__init__(*args, **kwargs)


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
        return InferResponse(model_name=self.name, infer_outputs=outputs, response_id=response_id)


def main() -> None:
    path, name, http_port, grpc_port = sys.argv[1:5]
    model = OnnxModel(name, path)
    rest_server.uvicorn.Config = LoopbackConfig  # type: ignore[misc]
    # Its gRPC server listens on [::] with no host setting, so it stays off: REST only here.
    ModelServer(http_port=int(http_port), grpc_port=int(grpc_port), workers=1, enable_grpc=False).start(
        [model]
    )


if __name__ == "__main__":
    main()
