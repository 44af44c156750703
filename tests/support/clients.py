"""The clients users use, wrapped so one test body runs the same case over REST and over gRPC:
tritonclient's two transports, and TF Serving's REST API (httpx) and gRPC stubs."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import httpx


@dataclass
class Protocol:
    """One of tritonclient's two transports, so a test body runs the same case over both."""

    name: str
    module: ModuleType
    client: Any

    @property
    def is_grpc(self) -> bool:
        return self.name == "grpc"

    def input(self, name: str, data: Any, datatype: str, binary: bool = True) -> Any:
        tensor = self.module.InferInput(name, list(data.shape), datatype)
        if self.is_grpc:
            tensor.set_data_from_numpy(data)
        else:
            tensor.set_data_from_numpy(data, binary_data=binary)
        return tensor

    def output(self, name: str, binary: bool = True) -> Any:
        if self.is_grpc:
            return self.module.InferRequestedOutput(name)
        return self.module.InferRequestedOutput(name, binary_data=binary)

    def error_code(self, error: Exception) -> str:
        """The status in the form the table uses: an HTTP status over REST, a gRPC code name over gRPC."""
        status = str(error.status())  # type: ignore[attr-defined]
        return status.removeprefix("StatusCode.")


class TfServingError(Exception):
    """A TF Serving API call that failed; `code` is an HTTP status over REST, a gRPC code name over gRPC."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class TfServingProtocol:
    """A TF Serving client over REST (httpx, columnar JSON) or gRPC (the tensorflow-serving-api stubs),
    so a test body runs the same case over both."""

    name: str
    http: httpx.Client
    channel: Any

    @property
    def is_grpc(self) -> bool:
        return self.name == "grpc"

    @staticmethod
    def _rest_prefix(model: str, version: str | None, label: str | None) -> str:
        if version:
            return f"/v1/models/{model}/versions/{version}"
        if label:
            return f"/v1/models/{model}/labels/{label}"
        return f"/v1/models/{model}"

    @staticmethod
    def _model_spec(spec: Any, model: str, version: str | None, label: str | None) -> None:
        spec.name = model
        if version:
            spec.version.value = int(version)
        elif label:
            spec.version_label = label

    def _rest(self, method: str, path: str, body: Any = None) -> Any:
        response = self.http.request(method, path, json=body)
        if response.status_code != 200:
            raise TfServingError(str(response.status_code), response.json()["error"])
        return response.json()

    def _grpc(self, call: Any, request: Any) -> Any:
        import grpc

        try:
            return call(request, timeout=60)
        except grpc.RpcError as exc:
            raise TfServingError(exc.code().name, exc.details()) from None

    def predict(
        self, model: str, inputs: dict[str, Any], version: str | None = None, label: str | None = None
    ) -> tuple[Any, str | None]:
        """The model's one output as numpy (strings as bytes), and the version the answer names
        (gRPC only: TF Serving's REST answer does not say)."""
        import numpy as np

        if not self.is_grpc:
            body = {"inputs": {name: _rest_values(value) for name, value in inputs.items()}}
            answer = self._rest("POST", self._rest_prefix(model, version, label) + ":predict", body)
            output = np.asarray(answer["outputs"])
            if output.dtype.kind == "U":
                output = np.array([v.encode() for v in output.ravel()], dtype=object).reshape(output.shape)
            return output, None
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

        request = predict_pb2.PredictRequest()
        self._model_spec(request.model_spec, model, version, label)
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(np.asarray(value)))
        stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        response = self._grpc(stub.Predict, request)
        (proto,) = response.outputs.values()
        return tf.make_ndarray(proto), str(response.model_spec.version.value)

    def status(
        self, model: str, version: str | None = None, label: str | None = None
    ) -> list[tuple[str, str]]:
        """(version, state name) for each version reported."""
        if not self.is_grpc:
            answer = self._rest("GET", self._rest_prefix(model, version, label))
            return [(s["version"], s["state"]) for s in answer["model_version_status"]]
        from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

        request = get_model_status_pb2.GetModelStatusRequest()
        self._model_spec(request.model_spec, model, version, label)
        response = self._grpc(model_service_pb2_grpc.ModelServiceStub(self.channel).GetModelStatus, request)
        state = get_model_status_pb2.ModelVersionStatus.State
        return [(str(s.version), state.Name(s.state)) for s in response.model_version_status]

    def signature(self, model: str, version: str | None = None) -> dict[str, dict[str, Any]]:
        """The serving_default signature as {"inputs"|"outputs": {name: (dtype name, shape)}}."""
        if not self.is_grpc:
            answer = self._rest("GET", self._rest_prefix(model, version, None) + "/metadata")
            signature = answer["metadata"]["signature_def"]["signature_def"]["serving_default"]
            return {
                side: {
                    name: (info["dtype"], [int(d["size"]) for d in info["tensor_shape"]["dim"]])
                    for name, info in signature[side].items()
                }
                for side in ("inputs", "outputs")
            }
        from tensorflow.core.framework import types_pb2
        from tensorflow_serving.apis import get_model_metadata_pb2, prediction_service_pb2_grpc

        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._model_spec(request.model_spec, model, version, None)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        response = self._grpc(stub.GetModelMetadata, request)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signatures)
        signature = signatures.signature_def["serving_default"]
        return {
            side: {
                name: (types_pb2.DataType.Name(info.dtype), [d.size for d in info.tensor_shape.dim])
                for name, info in getattr(signature, side).items()
            }
            for side in ("inputs", "outputs")
        }


def float_tensor_proto(shape: list[int], values: list[float]) -> Any:
    """A DT_FLOAT TensorProto built field by field, so shape and values may disagree on purpose."""
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in shape]
        ),
        float_val=values,
    )


def _rest_values(value: Any) -> Any:
    """Numbers as nested lists; bytes as TF Serving's {"b64": ...} objects."""
    import base64

    import numpy as np

    array = np.asarray(value)
    if array.dtype.kind in "OS":
        flat = [{"b64": base64.b64encode(v).decode("ascii")} for v in array.ravel()]
        return np.array(flat, dtype=object).reshape(array.shape).tolist()
    return array.tolist()
