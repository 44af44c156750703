"""A remote TF Serving: `PredictionService.Predict` over one long-lived gRPC channel, or REST.

Each local version N of the model is version N of `model_name` on the TF Serving side. gRPC is
used whenever `grpc` is given; REST (one long-lived httpx client) only when just `rest` is; either
is shared by every version that calls the same address (`SharedResources`). TF Serving's status
codes become gateway errors at this boundary, with `raise ... from exc`. TensorFlow and TF
Serving's API protos are imported when the first version loads.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc
import httpx
import numpy as np
import orjson
from google.protobuf import json_format
from pydantic import BaseModel, ConfigDict, Field, model_validator

from adapters.base import LoadSpec, ModelAdapter
from adapters.tensorflow import import_tensorflow
from adapters.tf_signature import signature_of
from gateway.breaker import EndpointGuard, GuardOptions
from gateway.errors import (
    BackendError,
    BackendUnavailable,
    ConnectionRefused,
    DeadlineExceeded,
    GatewayError,
    ModelNotReady,
    remote_grpc_failure,
    remote_http_error,
)
from gateway.tracing import trace_headers, trace_metadata
from gateway.types import Datatype, ModelSignature, numpy_dtype

PLATFORM = "tensorflow_serving"


@dataclass(frozen=True)
class _Apis:
    """TensorFlow's tensor conversions and TF Serving's API modules, imported when a version loads."""

    tf: Any
    metadata: Any  # get_model_metadata_pb2
    status: Any  # get_model_status_pb2
    models: Any  # model_service_pb2_grpc
    predict: Any  # predict_pb2
    prediction: Any  # prediction_service_pb2_grpc

    @classmethod
    def load(cls, adapter: type[ModelAdapter], label: str) -> _Apis:
        tf = import_tensorflow(adapter, label)
        names = ("get_model_metadata_pb2", "get_model_status_pb2", "model_service_pb2_grpc", "predict_pb2",
                 "prediction_service_pb2_grpc")  # fmt: skip
        return cls(
            tf, *(adapter.import_framework(f"tensorflow_serving.apis.{name}", label) for name in names)
        )


class TfServingOptions(BaseModel):
    """The `tfserving:` section of config.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    grpc: str | None = None  # host:port of TF Serving's gRPC API (8500)
    rest: str | None = None  # http://host:port of its REST API (8501), used when grpc is not given
    model_name: str | None = None  # default: the gateway's own name for the model
    signature_name: str = "serving_default"
    timeout_s: float = Field(default=30.0, gt=0)
    # Local version -> the TF Serving version number or label it stands for; unlisted ones are
    # the same number there. A label is resolved by TF Serving on each request.
    versions: dict[int, int | str] = Field(default_factory=dict)
    # gRPC messages carry whole tensors: far more than gRPC's 4 MiB default.
    max_message_mb: int = Field(default=256, ge=1)
    # The circuit breaker and retries of this TF Serving address (gateway/breaker.py).
    resilience: GuardOptions = GuardOptions()

    @model_validator(mode="after")
    def _an_address(self) -> TfServingOptions:
        if not self.grpc and not self.rest:
            raise ValueError("give grpc (host:port) or rest (http://host:port)")
        return self


class TfServingAdapter(ModelAdapter):
    backend: ClassVar[str] = "tfserving"
    remote: ClassVar[bool] = True
    extra: ClassVar[str | None] = "tensorflow"
    options_model: ClassVar[type[BaseModel]] = TfServingOptions
    packages: ClassVar[tuple[str, ...]] = ("tensorflow-serving-api",)

    def __init__(self, spec: LoadSpec) -> None:
        super().__init__(spec)
        self._options: TfServingOptions = self.read_options(spec)
        self.remote_name = self._options.model_name or spec.model_name
        self.remote_version: int | str = self._options.versions.get(spec.version, spec.version)
        self._apis: _Apis | None = None
        self._channel: grpc.aio.Channel | None = None
        self._predict: Any = None  # PredictionServiceStub
        self._models: Any = None  # ModelServiceStub
        self._http: httpx.AsyncClient | None = None
        address = self._options.grpc or self._options.rest or ""
        self.guard = spec.shared.breakers.guard(self.backend, address, self._options.resilience)

    @property
    def _where(self) -> str:
        return f"{self.spec.label}: TF Serving model '{self.remote_name}' version {self.remote_version}"

    @property
    def _address(self) -> str:
        return f"gRPC {self._options.grpc}" if self._options.grpc else f"REST {self._options.rest}"

    # Lifecycle --------------------------------------------------------------------------------

    async def load(self) -> None:
        options, shared = self._options, self.spec.shared
        # TensorFlow takes seconds to import: off the event loop.
        self._apis = apis = await asyncio.to_thread(_Apis.load, type(self), self.spec.label)
        if options.grpc:
            self._channel = await shared.grpc_channel(options.grpc, options.max_message_mb)
            self._predict = apis.prediction.PredictionServiceStub(self._channel)
            self._models = apis.models.ModelServiceStub(self._channel)
        else:
            assert options.rest is not None
            self._http = await shared.http_client(options.rest)
        try:
            if not await self._available():
                raise ModelNotReady(f"{self._where} is not AVAILABLE there").located(self._address)
            self._signature = await self._read_signature()
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        # The channel or client belongs to SharedResources, which closes it with the registry.
        self._channel = self._http = self._predict = self._models = None

    def breaker(self) -> EndpointGuard | None:
        return self.guard

    async def ready(self) -> bool:
        if (self._predict is None and self._http is None) or not self.guard.allows_traffic():
            return False
        try:
            return await self._available()
        except GatewayError:
            return False

    # Status and metadata ----------------------------------------------------------------------

    async def _available(self) -> bool:
        # The request names one version (or label), so the answer holds that version alone.
        if self._models is not None:
            assert self._apis is not None
            status = self._apis.status
            request = status.GetModelStatusRequest()
            self._model_spec(request.model_spec)
            response = await self._call_grpc(self._models.GetModelStatus, request)
            available = status.ModelVersionStatus.State.AVAILABLE
            states = [s.state == available for s in response.model_version_status]
        else:
            body = await self._call_rest("GET", self._rest_path(""))
            states = [s.get("state") == "AVAILABLE" for s in body.get("model_version_status", [])]
        return bool(states) and all(states)

    async def _read_signature(self) -> ModelSignature:
        assert self._apis is not None
        tf, metadata = self._apis.tf, self._apis.metadata
        signatures = metadata.SignatureDefMap()
        if self._predict is not None:
            request = metadata.GetModelMetadataRequest(metadata_field=["signature_def"])
            self._model_spec(request.model_spec)
            response = await self._call_grpc(self._predict.GetModelMetadata, request)
            response.metadata["signature_def"].Unpack(signatures)
        else:
            body = await self._call_rest("GET", self._rest_path("/metadata"))
            # TF Serving's REST metadata is the JSON form of the same SignatureDefMap.
            raw = body.get("metadata", {}).get("signature_def", {})
            try:
                json_format.ParseDict(raw, signatures, ignore_unknown_fields=True)
            except json_format.ParseError as exc:
                raise BackendError(f"{self._where}: the metadata cannot be read: {exc}") from exc
        name = self._options.signature_name
        if name not in signatures.signature_def:
            raise ModelNotReady(
                f"{self._where} has no signature '{name}'; it has {', '.join(sorted(signatures.signature_def)) or 'none'}"
            )
        signature = signatures.signature_def[name]
        config, label = self.spec.config, self.spec.label
        return ModelSignature(
            inputs=signature_of(tf, signature.inputs, config.inputs, label),
            outputs=signature_of(tf, signature.outputs, config.outputs, label),
            platform=PLATFORM,
        )

    # Inference --------------------------------------------------------------------------------

    async def infer(
        self,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        output_names: Sequence[str],
        *,
        deadline: float | None = None,
    ) -> dict[str, np.ndarray[Any, Any]]:
        if self._predict is not None and self._apis is not None:
            tf = self._apis.tf
            request = self._apis.predict.PredictRequest(output_filter=list(output_names))
            self._model_spec(request.model_spec)
            for name, array in inputs.items():
                request.inputs[name].CopyFrom(tf.make_tensor_proto(array))
            response = await self.guard.call(
                lambda timeout: self._call_grpc(self._predict_method(), request, timeout), deadline
            )
            missing = [n for n in output_names if n not in response.outputs]
            if missing:
                raise BackendError(f"{self._where}: the answer lacks output(s) {', '.join(missing)}")
            return {name: tf.make_ndarray(response.outputs[name]) for name in output_names}
        if self._http is None:
            raise ModelNotReady(f"{self.spec.label} is not loaded")
        body = {
            "signature_name": self._options.signature_name,
            "inputs": {name: _json_values(array) for name, array in inputs.items()},
        }
        answer = await self.guard.call(
            lambda timeout: self._call_rest("POST", self._rest_path(":predict"), body, timeout), deadline
        )
        return self._outputs_from_json(answer.get("outputs"), output_names)

    def _outputs_from_json(
        self, outputs: Any, output_names: Sequence[str]
    ) -> dict[str, np.ndarray[Any, Any]]:
        assert self._signature is not None
        specs = {spec.name: spec for spec in self._signature.outputs}
        # A model with one output answers its value alone, not an object keyed by name.
        by_name = outputs if isinstance(outputs, dict) and len(specs) > 1 else {next(iter(specs)): outputs}
        results = {}
        for name in output_names:
            if name not in by_name:
                raise BackendError(f"{self._where}: the answer lacks output '{name}'")
            try:
                results[name] = _array(by_name[name], specs[name].datatype)
            except (ValueError, TypeError, binascii.Error) as exc:
                raise BackendError(f"{self._where}: output '{name}' cannot be read: {exc}") from exc
        return results

    # Transport --------------------------------------------------------------------------------

    def _model_spec(self, model_spec: Any) -> None:
        model_spec.name = self.remote_name
        model_spec.signature_name = self._options.signature_name
        if isinstance(self.remote_version, int):
            model_spec.version.value = self.remote_version
        else:
            model_spec.version_label = self.remote_version

    def _rest_path(self, suffix: str) -> str:
        kind = "versions" if isinstance(self.remote_version, int) else "labels"
        return f"/v1/models/{self.remote_name}/{kind}/{self.remote_version}{suffix}"

    def _predict_method(self) -> Any:
        if self._predict is None:
            raise ModelNotReady(f"{self.spec.label} is not loaded")
        return self._predict.Predict

    def _timeout(self, remaining: float | None) -> float:
        """The call's timeout: the backend's own, or less when the request's deadline is sooner."""
        return self._options.timeout_s if remaining is None else min(remaining, self._options.timeout_s)

    async def _call_grpc(self, method: Any, request: Any, remaining: float | None = None) -> Any:
        try:
            return await method(request, timeout=self._timeout(remaining), metadata=trace_metadata())
        except grpc.aio.AioRpcError as exc:
            raise remote_grpc_failure(self._where, self._address, exc.code(), exc.details()) from exc

    async def _call_rest(
        self, method: str, path: str, body: Any = None, remaining: float | None = None
    ) -> dict[str, Any]:
        if self._http is None:
            raise ModelNotReady(f"{self.spec.label} is not loaded")
        content = None if body is None else orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
        timeout = self._timeout(remaining)
        try:
            response = await self._http.request(
                method, path, content=content, headers=trace_headers() or None, timeout=timeout
            )
        except httpx.TimeoutException as exc:
            raise DeadlineExceeded(f"{self._where}: no answer within {timeout:.3g}s").located(
                self._address
            ) from exc
        except httpx.ConnectError as exc:
            raise ConnectionRefused(f"{self._where}: cannot connect").located(
                f"{self._address}: {exc}"
            ) from exc
        except httpx.TransportError as exc:
            raise BackendUnavailable(f"{self._where}: the connection failed").located(
                f"{self._address}: {exc}"
            ) from exc
        try:
            answer = orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise BackendError(
                f"{self._where}: HTTP {response.status_code} with a body that is not JSON"
            ) from exc
        try:
            response.raise_for_status()
        except httpx.HTTPStatusError as exc:
            error = remote_http_error(response.status_code)
            detail = answer.get("error", answer) if isinstance(answer, dict) else answer
            raise error(f"{self._where}: HTTP {response.status_code}: {detail}") from exc
        if not isinstance(answer, dict):
            raise BackendError(f"{self._where}: the answer is not a JSON object")
        return answer


def _json_values(array: np.ndarray[Any, Any]) -> Any:
    if array.dtype.kind in "OSU":
        flat = [
            {"b64": base64.b64encode(v if isinstance(v, bytes) else str(v).encode()).decode("ascii")}
            for v in array.ravel()
        ]
        return np.array(flat, dtype=object).reshape(array.shape).tolist()
    return np.ascontiguousarray(array)


def _array(values: Any, datatype: Datatype) -> np.ndarray[Any, Any]:
    if datatype is not Datatype.BYTES:
        return np.asarray(values, dtype=numpy_dtype(datatype))
    nested = np.array(values, dtype=object)
    flat = [
        base64.b64decode(v["b64"]) if isinstance(v, dict) else str(v).encode("utf-8") for v in nested.ravel()
    ]
    return np.array(flat, dtype=object).reshape(nested.shape)
