"""Minimal MLServer runtime for the peers benchmark: one ONNX model on onnxruntime, v2 in and out.

benchmarks/peers.py copies this file next to MLServer's settings and starts `mlserver start` on it;
it runs inside MLServer's own venv (benchmarks/peers/mlserver), not the gateway's.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntime(MLModel):
    async def load(self) -> bool:
        uri = await get_model_uri(self._settings)
        options = ort.SessionOptions()
        # Same threading as the gateway's onnxruntime adapter and load.py's in-process mode.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(uri, options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._outputs = [node.name for node in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        results = self._session.run(self._outputs, {self._input: x})
        outputs = [
            NumpyCodec.encode_output(name, value) for name, value in zip(self._outputs, results, strict=True)
        ]
        return InferenceResponse(model_name=self.name, model_version=self.version, outputs=outputs)
