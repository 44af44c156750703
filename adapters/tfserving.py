"""A remote TF Serving: `PredictionService.Predict` over one long-lived gRPC channel, or REST.

Each local version N of the model is version N of `model_name` on the TF Serving side. gRPC is
used whenever `grpc` is given; REST (one long-lived httpx client) only when just `rest` is. TF
Serving's status codes become gateway errors at this boundary, with `raise ... from exc`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import grpc
import httpx
import numpy as np
import orjson
from google.protobuf import json_format
from pydantic import BaseModel, ConfigDict, Field, model_validator

from adapters.base import LoadSpec, ModelAdapter
from adapters.tensorflow import read_options, signature_of
from gateway.breaker import EndpointGuard, GuardOptions
from gateway.errors import (
    REMOTE_GRPC_ERRORS,
    REMOTE_HTTP_ERRORS,
    BackendError,
    BackendUnavailable,
    ConnectionRefused,
    DeadlineExceeded,
    GatewayError,
    ModelNotReady,
)
from gateway.types import Datatype, ModelSignature, numpy_dtype

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

PLATFORM = "tensorflow_serving"
_AVAILABLE = get_model_status_pb2.ModelVersionStatus.State.AVAILABLE


class _Pool:
    """One gRPC channel or HTTP client per TF Serving address, shared by every model version served
    there and closed with the last of them. Keyed by event loop too, since a grpc.aio channel
    belongs to the loop that made it."""

    def __init__(self) -> None:
        self._clients: dict[tuple[Any, ...], Any] = {}
        self._users: dict[int, tuple[tuple[Any, ...], int]] = {}

    async def acquire(self, address: tuple[Any, ...], open_client: Callable[[], Any]) -> Any:
        key = (asyncio.get_running_loop(), *address)
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = open_client()
        _, users = self._users.get(id(client), (key, 0))
        self._users[id(client)] = (key, users + 1)
        return client

    async def release(self, client: Any) -> None:
        key, users = self._users.pop(id(client))
        if users > 1:
            self._users[id(client)] = (key, users - 1)
            return
        del self._clients[key]
        if isinstance(client, httpx.AsyncClient):
            await client.aclose()
        else:
            await client.close()


_POOL = _Pool()


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

    def __init__(self, spec: LoadSpec) -> None:
        super().__init__(spec)
        self._options: TfServingOptions = read_options(spec, spec.config.tfserving, TfServingOptions)
        self.remote_name = self._options.model_name or spec.model_name
        self.remote_version: int | str = self._options.versions.get(spec.version, spec.version)
        self._channel: grpc.aio.Channel | None = None
        self._predict: prediction_service_pb2_grpc.PredictionServiceStub | None = None
        self._models: model_service_pb2_grpc.ModelServiceStub | None = None
        self._http: httpx.AsyncClient | None = None
        address = self._options.grpc or self._options.rest or ""
        self.guard = spec.shared.breakers.guard(self.backend, address, self._options.resilience)

    @property
    def _where(self) -> str:
        transport = f"gRPC {self._options.grpc}" if self._options.grpc else f"REST {self._options.rest}"
        return f"{self.spec.label}: TF Serving model '{self.remote_name}' version {self.remote_version} at {transport}"

    # Lifecycle --------------------------------------------------------------------------------

    async def load(self) -> None:
        options = self._options
        if options.grpc:
            self._channel = await _POOL.acquire(
                ("grpc", options.grpc, options.max_message_mb), self._open_channel
            )
            self._predict = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
            self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)
        else:
            assert options.rest is not None
            self._http = await _POOL.acquire(("rest", options.rest.rstrip("/"), 0), self._open_client)
        try:
            if not await self._available():
                raise ModelNotReady(f"{self._where} is not AVAILABLE there")
            self._signature = await self._read_signature()
        except BaseException:
            await self.aclose()
            raise

    def _open_channel(self) -> grpc.aio.Channel:
        assert self._options.grpc is not None
        limit = self._options.max_message_mb * 1024 * 1024
        return grpc.aio.insecure_channel(
            self._options.grpc,
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
        )

    def _open_client(self) -> httpx.AsyncClient:
        assert self._options.rest is not None
        return httpx.AsyncClient(base_url=self._options.rest.rstrip("/"))

    async def aclose(self) -> None:
        channel, self._channel = self._channel, None
        http, self._http = self._http, None
        self._predict = self._models = None
        if channel is not None:
            await _POOL.release(channel)
        if http is not None:
            await _POOL.release(http)

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
            request = get_model_status_pb2.GetModelStatusRequest()
            self._model_spec(request.model_spec)
            response = await self._call_grpc(self._models.GetModelStatus, request)
            states = [s.state == _AVAILABLE for s in response.model_version_status]
        else:
            body = await self._call_rest("GET", self._rest_path(""))
            states = [s.get("state") == "AVAILABLE" for s in body.get("model_version_status", [])]
        return bool(states) and all(states)

    async def _read_signature(self) -> ModelSignature:
        signatures = get_model_metadata_pb2.SignatureDefMap()
        if self._predict is not None:
            request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
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
            inputs=signature_of(signature.inputs, config.inputs, label),
            outputs=signature_of(signature.outputs, config.outputs, label),
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
        if self._predict is not None:
            request = predict_pb2.PredictRequest(output_filter=list(output_names))
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
            return await method(request, timeout=self._timeout(remaining))
        except grpc.aio.AioRpcError as exc:
            error = REMOTE_GRPC_ERRORS.get(exc.code(), BackendError)
            raise error(f"{self._where}: {exc.code().name}: {exc.details()}") from exc

    async def _call_rest(
        self, method: str, path: str, body: Any = None, remaining: float | None = None
    ) -> dict[str, Any]:
        if self._http is None:
            raise ModelNotReady(f"{self.spec.label} is not loaded")
        content = None if body is None else orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
        timeout = self._timeout(remaining)
        try:
            response = await self._http.request(method, path, content=content, timeout=timeout)
        except httpx.TimeoutException as exc:
            raise DeadlineExceeded(f"{self._where}: no answer within {timeout:.3g}s") from exc
        except httpx.ConnectError as exc:
            raise ConnectionRefused(f"{self._where}: cannot connect: {exc}") from exc
        except httpx.TransportError as exc:
            raise BackendUnavailable(f"{self._where}: the connection failed: {exc}") from exc
        try:
            answer = orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise BackendError(
                f"{self._where}: HTTP {response.status_code} with a body that is not JSON"
            ) from exc
        try:
            response.raise_for_status()
        except httpx.HTTPStatusError as exc:
            error = REMOTE_HTTP_ERRORS.get(response.status_code, BackendError)
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
