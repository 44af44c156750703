"""Any remote Open Inference Protocol v2 server: Triton, KServe, MLServer or another modelyard.

gRPC (`inference.GRPCInferenceService`, with raw tensor contents) is the default; REST with
Triton's binary tensor extension when `protocol: rest`. One long-lived gRPC channel or HTTP client
per address, shared by every model version served there (`SharedResources`). Readiness and metadata
come from the remote; its status codes become gateway errors at this boundary, and the request's
deadline becomes the remote call's gRPC deadline or HTTP timeout.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import grpc
import httpx
import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field
from tritonclient.grpc import service_pb2, service_pb2_grpc

from adapters.base import LoadSpec, ModelAdapter, override_signature
from gateway.codec import CONTENTS_FIELD, tensor_from_buffer, tensor_from_values, tensor_to_bytes
from gateway.errors import (
    BackendError,
    BackendUnavailable,
    DeadlineExceeded,
    GatewayError,
    InvalidInput,
    ModelNotReady,
    remote_grpc_failure,
    remote_http_error,
)
from gateway.tracing import trace_headers, trace_metadata
from gateway.types import Datatype, ModelSignature, Tensor, TensorSpec, datatype_of

_HEADER_LENGTH = "Inference-Header-Content-Length"


class V2Options(BaseModel):
    """The `v2:` section of config.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # host:port of the remote's gRPC port (Triton: 8001), or http://host:port of its REST port (8000).
    address: str
    protocol: Literal["grpc", "rest"] = "grpc"
    model_name: str | None = None  # default: the gateway's own name for the model
    # The remote version every local version stands for; none: the remote's own default.
    version: str | None = None
    # Local version -> remote version, where they differ per version.
    versions: dict[int, str] = Field(default_factory=dict)
    # The remote call's timeout when a request carries no deadline of its own.
    timeout_s: float = Field(default=30.0, gt=0)
    # gRPC messages carry whole tensors: far more than gRPC's 4 MiB default.
    max_message_mb: int = Field(default=256, ge=1)


class V2Adapter(ModelAdapter):
    backend: ClassVar[str] = "v2"
    remote: ClassVar[bool] = True
    options_model: ClassVar[type[BaseModel]] = V2Options

    def __init__(self, spec: LoadSpec) -> None:
        super().__init__(spec)
        self._options: V2Options = self.read_options(spec)
        self.remote_name = self._options.model_name or spec.model_name
        self.remote_version = self._options.versions.get(spec.version, self._options.version) or ""
        self._channel: grpc.aio.Channel | None = None
        self._grpc: service_pb2_grpc.GRPCInferenceServiceStub | None = None
        self._http: httpx.AsyncClient | None = None

    @property
    def _where(self) -> str:
        version = f"version {self.remote_version}" if self.remote_version else "its default version"
        return f"{self.spec.label}: remote model '{self.remote_name}' {version}"

    @property
    def _address(self) -> str:
        return f"{self._options.protocol} {self._options.address}"

    # Lifecycle --------------------------------------------------------------------------------

    async def load(self) -> None:
        options, shared = self._options, self.spec.shared
        if options.protocol == "grpc":
            self._channel = await shared.grpc_channel(options.address, options.max_message_mb)
            self._grpc = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        else:
            self._http = await shared.http_client(options.address)
        try:
            if not await self._remote_ready(None):
                # Retried by the registry: the remote may still be loading it.
                raise BackendUnavailable(f"{self._where} is not ready there").located(self._address)
            self._signature = await self._read_signature()
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        # The channel or client belongs to SharedResources, which closes it with the registry.
        self._channel, self._grpc, self._http = None, None, None

    async def ready(self) -> bool:
        if self._grpc is None and self._http is None:
            return False
        try:
            return await self._remote_ready(None)
        except GatewayError:
            return False

    # Status and metadata ----------------------------------------------------------------------

    async def _remote_ready(self, deadline: float | None) -> bool:
        if self._grpc is not None:
            request = service_pb2.ModelReadyRequest(name=self.remote_name, version=self.remote_version)
            response = await self._call_grpc(self._grpc.ModelReady, request, deadline)
            return bool(response.ready)
        try:
            await self._call_rest("GET", self._path("/ready"), deadline)
        except BackendUnavailable:  # the remote's 503: it has the model, not ready yet
            return False
        return True

    async def _read_signature(self) -> ModelSignature:
        if self._grpc is not None:
            request = service_pb2.ModelMetadataRequest(name=self.remote_name, version=self.remote_version)
            response = await self._call_grpc(self._grpc.ModelMetadata, request, None)
            platform = response.platform
            inputs = [(t.name, t.datatype, list(t.shape)) for t in response.inputs]
            outputs = [(t.name, t.datatype, list(t.shape)) for t in response.outputs]
        else:
            body, _ = await self._call_rest("GET", self._path(""), None)
            platform = str(body.get("platform", ""))
            try:
                inputs = [(t["name"], t["datatype"], list(t["shape"])) for t in body.get("inputs", [])]
                outputs = [(t["name"], t["datatype"], list(t["shape"])) for t in body.get("outputs", [])]
            except (KeyError, TypeError) as exc:
                raise BackendError(f"{self._where}: the metadata lacks {exc}") from exc
        return ModelSignature(
            inputs=self._declared(self._specs(inputs), self.spec.config.inputs, "inputs"),
            outputs=self._declared(self._specs(outputs), self.spec.config.outputs, "outputs"),
            platform=platform or "remote_v2",
        )

    def _declared(
        self, found: tuple[TensorSpec, ...], declared: Sequence[Any] | None, side: str
    ) -> tuple[TensorSpec, ...]:
        """The remote's tensors, completed by config.yaml; where the remote lists none (KServe's
        custom models, for one), config.yaml's alone."""
        if found:
            return override_signature(found, declared, self.spec.label)
        if not declared:
            raise ModelNotReady(f"{self._where} reports no {side}: declare them in config.yaml")
        return tuple(d.spec() for d in declared)

    def _specs(self, tensors: Sequence[tuple[Any, Any, list[Any]]]) -> tuple[TensorSpec, ...]:
        specs = []
        for name, datatype, shape in tensors:
            try:
                specs.append(TensorSpec(str(name), Datatype(datatype), tuple(int(d) for d in shape)))
            except (ValueError, TypeError):
                raise ModelNotReady(
                    f"{self._where}: tensor '{name}' is {datatype} {shape}, which modelyard cannot serve"
                ) from None
        return tuple(specs)

    # Inference --------------------------------------------------------------------------------

    async def infer(
        self,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        output_names: Sequence[str],
        *,
        deadline: float | None = None,
    ) -> dict[str, np.ndarray[Any, Any]]:
        tensors = [_tensor(name, array) for name, array in inputs.items()]
        if self._grpc is not None:
            return await self._infer_grpc(self._grpc, tensors, output_names, deadline)
        if self._http is not None:
            return await self._infer_rest(tensors, output_names, deadline)
        raise ModelNotReady(f"{self.spec.label} is not loaded")

    async def _infer_grpc(
        self,
        stub: service_pb2_grpc.GRPCInferenceServiceStub,
        tensors: list[Tensor],
        output_names: Sequence[str],
        deadline: float | None,
    ) -> dict[str, np.ndarray[Any, Any]]:
        request = service_pb2.ModelInferRequest(
            model_name=self.remote_name,
            model_version=self.remote_version,
            inputs=[
                service_pb2.ModelInferRequest.InferInputTensor(
                    name=t.name, datatype=t.datatype.value, shape=list(t.shape)
                )
                for t in tensors
            ],
            outputs=[service_pb2.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in output_names],
            raw_input_contents=[tensor_to_bytes(t) for t in tensors],
        )
        response = await self._call_grpc(stub.ModelInfer, request, deadline)
        results = {}
        for index, output in enumerate(response.outputs):
            shape = tuple(int(d) for d in output.shape)
            datatype = self._datatype(output.name, output.datatype)
            if index < len(response.raw_output_contents):
                results[output.name] = self._from_buffer(
                    output.name, datatype, shape, response.raw_output_contents[index]
                )
            else:
                field = CONTENTS_FIELD.get(datatype)
                values = getattr(output.contents, field) if field else ()
                results[output.name] = self._from_values(output.name, datatype, shape, list(values))
        return self._pick(results, output_names)

    async def _infer_rest(
        self, tensors: list[Tensor], output_names: Sequence[str], deadline: float | None
    ) -> dict[str, np.ndarray[Any, Any]]:
        blobs = [tensor_to_bytes(t) for t in tensors]
        header = orjson.dumps(
            {
                "inputs": [
                    {
                        "name": t.name,
                        "datatype": t.datatype.value,
                        "shape": list(t.shape),
                        "parameters": {"binary_data_size": len(blob)},
                    }
                    for t, blob in zip(tensors, blobs, strict=True)
                ],
                "outputs": [{"name": n, "parameters": {"binary_data": True}} for n in output_names],
            }
        )
        headers = {_HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"}
        body, binary = await self._call_rest(
            "POST", self._path("/infer"), deadline, b"".join([header, *blobs]), headers
        )
        results, offset = {}, 0
        try:
            for output in body.get("outputs", []):
                name, shape = str(output["name"]), tuple(int(d) for d in output["shape"])
                datatype = self._datatype(name, output["datatype"])
                size = (output.get("parameters") or {}).get("binary_data_size")
                if size is not None:
                    results[name] = self._from_buffer(name, datatype, shape, binary[offset : offset + size])
                    offset += size
                else:
                    results[name] = self._from_values(name, datatype, shape, output["data"])
        except (KeyError, TypeError) as exc:
            raise BackendError(f"{self._where}: the answer lacks {exc}") from exc
        return self._pick(results, output_names)

    def _pick(
        self, results: dict[str, np.ndarray[Any, Any]], output_names: Sequence[str]
    ) -> dict[str, np.ndarray[Any, Any]]:
        missing = [n for n in output_names if n not in results]
        if missing:
            raise BackendError(f"{self._where}: the answer lacks output(s) {', '.join(missing)}")
        return {name: results[name] for name in output_names}

    def _datatype(self, name: str, value: Any) -> Datatype:
        try:
            return Datatype(value)
        except ValueError:
            raise BackendError(f"{self._where}: output '{name}' has unknown datatype {value!r}") from None

    def _from_buffer(
        self, name: str, datatype: Datatype, shape: tuple[int, ...], buffer: bytes | memoryview
    ) -> np.ndarray[Any, Any]:
        try:
            return tensor_from_buffer(name, datatype, shape, buffer).data
        except InvalidInput as exc:  # the remote's answer is malformed, not the client's request
            raise BackendError(f"{self._where}: output {exc}") from exc

    def _from_values(
        self, name: str, datatype: Datatype, shape: tuple[int, ...], values: Any
    ) -> np.ndarray[Any, Any]:
        try:
            return tensor_from_values(name, datatype, shape, values).data
        except GatewayError as exc:  # the remote's answer is malformed, not the client's request
            raise BackendError(f"{self._where}: output {exc}") from exc

    # Transport --------------------------------------------------------------------------------

    def _path(self, suffix: str) -> str:
        version = f"/versions/{self.remote_version}" if self.remote_version else ""
        return f"/v2/models/{self.remote_name}{version}{suffix}"

    def _timeout(self, deadline: float | None) -> float:
        if deadline is None:
            return self._options.timeout_s
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(f"{self._where}: the deadline passed before the call")
        return remaining

    async def _call_grpc(self, method: Any, request: Any, deadline: float | None) -> Any:
        timeout = self._timeout(deadline)
        try:
            return await method(request, timeout=timeout, metadata=trace_metadata())
        except grpc.aio.AioRpcError as exc:
            raise remote_grpc_failure(self._where, self._address, exc.code(), exc.details()) from exc

    async def _call_rest(
        self,
        method: str,
        path: str,
        deadline: float | None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[dict[str, Any], memoryview]:
        """The answer's JSON object, and the binary tensor data after it (empty without any)."""
        if self._http is None:
            raise ModelNotReady(f"{self.spec.label} is not loaded")
        timeout = self._timeout(deadline)
        traced = trace_headers()
        if traced:
            headers = {**(headers or {}), **traced}
        try:
            response = await self._http.request(
                method, path, content=content, headers=headers, timeout=timeout
            )
        except httpx.TimeoutException as exc:
            raise DeadlineExceeded(f"{self._where}: no answer within {timeout:.3f}s").located(
                self._address
            ) from exc
        except httpx.TransportError as exc:
            raise BackendUnavailable(f"{self._where}: cannot connect").located(
                f"{self._address}: {exc}"
            ) from exc
        raw = memoryview(response.content)
        length = int(response.headers.get(_HEADER_LENGTH, len(raw)))
        try:
            answer = orjson.loads(raw[:length]) if length else {}
        except orjson.JSONDecodeError as exc:
            raise BackendError(
                f"{self._where}: HTTP {response.status_code} with a body that is not JSON"
            ) from exc
        if response.status_code != 200:
            error = remote_http_error(response.status_code)
            detail = answer.get("error", answer) if isinstance(answer, dict) else answer
            raise error(f"{self._where}: HTTP {response.status_code}: {detail}")
        if not isinstance(answer, dict):
            raise BackendError(f"{self._where}: the answer is not a JSON object")
        return answer, raw[length:]


def _tensor(name: str, array: np.ndarray[Any, Any]) -> Tensor:
    try:
        datatype = datatype_of(array.dtype)
    except ValueError as exc:
        raise InvalidInput(f"input '{name}': {exc}") from exc
    return Tensor(name, datatype, tuple(array.shape), array)
