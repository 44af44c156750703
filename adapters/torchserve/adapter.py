"""The TorchServe backend's adapter: one model version on the managed TorchServe or a remote one."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import httpx
import numpy as np
from pydantic import BaseModel

from adapters.base import LoadSpec, ModelAdapter
from adapters.torchserve import modelyard_handler as wire
from adapters.torchserve.client import TorchServeClient, remote_client
from adapters.torchserve.managed import ManagedTorchServe, Registration, managed_torchserve
from adapters.torchserve.options import TorchServeOptions
from gateway.breaker import EndpointGuard
from gateway.errors import BackendError, BackendUnavailable, GatewayError, InvalidInput, ModelNotReady
from gateway.types import ModelSignature, TensorSpec, datatype_of

log = logging.getLogger("modelyard.torchserve")

PROBE_INTERVAL_S = 2.0
PLATFORM = "pytorch_torchscript"


def _spec_of(name: str, array: np.ndarray[Any, Any]) -> TensorSpec:
    # A sample fixes one batch size; the first dimension is the batch and may vary.
    shape = (-1, *array.shape[1:]) if array.ndim else ()
    return TensorSpec(name, datatype_of(array.dtype), shape)


class TorchServeAdapter(ModelAdapter):
    backend: ClassVar[str] = "torchserve"
    artifacts: ClassVar[tuple[str, ...]] = ("model.mar", "model.pt")
    extra: ClassVar[str | None] = "torchserve"
    options_model: ClassVar[type[BaseModel]] = TorchServeOptions
    aliases: ClassVar[tuple[str, ...]] = ("torch",)
    packages: ClassVar[tuple[str, ...]] = ("torch", "torchserve")

    @classmethod
    def serves_remotely(cls, options: BaseModel) -> bool:
        return isinstance(options, TorchServeOptions) and options.mode == "remote"

    @classmethod
    def starts_server(cls, options: BaseModel) -> bool:
        return not cls.serves_remotely(options)

    def __init__(self, spec: LoadSpec) -> None:
        super().__init__(spec)
        self._managed: ManagedTorchServe | None = None
        self._registration: Registration | None = None
        self._remote: TorchServeClient | None = None
        self._generation = 0
        self._remote_healthy = False
        self._prober: asyncio.Task[None] | None = None
        self._ts_name = spec.model_name
        self._ts_version: str | None = str(spec.version)
        self.options: TorchServeOptions = self.read_options(spec)

    async def load(self) -> None:
        declared = self._declared_signature()
        if self.options.mode == "managed":
            await self._load_managed(declared)
        else:
            await self._load_remote()
        if declared is None or not declared.outputs:
            declared = await self._signature_from_sample(declared)
        self._signature = declared

    def _declared_signature(self) -> ModelSignature | None:
        config = self.spec.config
        if config.inputs:
            inputs = tuple(d.spec() for d in config.inputs)
            outputs = tuple(d.spec() for d in config.outputs or ())
            return ModelSignature(inputs, outputs, PLATFORM)
        if self.options.sample is None:
            raise ModelNotReady(
                f"{self.spec.label}: TorchServe models must declare their tensors: give `inputs` and "
                f"`outputs` in config.yaml, or `torchserve: {{sample: FILE.npz}}` with example inputs"
            )
        return None

    def _sample(self) -> dict[str, np.ndarray[Any, Any]]:
        path = self.spec.model_dir / str(self.options.sample)
        try:
            with np.load(path, allow_pickle=False) as sample:
                return {name: sample[name] for name in sample.files}
        except (OSError, ValueError) as exc:
            raise ModelNotReady(f"{self.spec.label}: cannot read the sample {path}: {exc}") from exc

    async def _signature_from_sample(self, declared: ModelSignature | None) -> ModelSignature:
        """Runs the sample through the model once: its outputs give names, datatypes and shapes."""
        sample = self._sample()
        outputs = await self.infer(sample, [])
        inputs = declared.inputs if declared else tuple(_spec_of(n, a) for n, a in sample.items())
        return ModelSignature(inputs, tuple(_spec_of(n, a) for n, a in outputs.items()), PLATFORM)

    def _tensor_names(self, declared: ModelSignature | None) -> tuple[list[str], list[str]]:
        if declared is not None:
            return [s.name for s in declared.inputs], [s.name for s in declared.outputs]
        return list(self._sample()), []

    async def _load_managed(self, declared: ModelSignature | None) -> None:
        if self.spec.artifact is None or self.spec.artifact.suffix not in (".pt", ".mar"):
            raise ModelNotReady(
                f"{self.spec.label}: managed TorchServe needs model.pt or model.mar in {self.spec.version_dir}"
            )
        needed = ("ts", "model_archiver") if self.spec.artifact.suffix == ".pt" else ("ts",)
        for module in needed:
            if importlib.util.find_spec(module) is None:
                raise ModelNotReady(
                    f"{self.spec.label}: managed TorchServe needs the {module} package: {self.install_hint()}"
                )
        if not self.spec.shared.may_start_servers:
            raise ModelNotReady(
                f"{self.spec.label}: a managed TorchServe cannot run under --workers; "
                "serve it with `torchserve: {mode: remote}` or with one worker"
            )
        runtime = await managed_torchserve(self.spec.shared)
        try:
            inputs, outputs = self._tensor_names(declared)
            archive = await runtime.archive(self.spec, self.options, inputs, outputs)
            registration = Registration(
                self._ts_name,
                str(self.spec.version),
                archive,
                self.options,
                self.spec.default_version == self.spec.version,
            )
            await runtime.register(registration, self.spec.label)
        except BaseException:
            runtime.release(self.spec.shared)
            raise
        self._registration = registration
        self._managed = runtime
        self._generation = runtime.generation

    async def _load_remote(self) -> None:
        options = self.options
        if not options.inference_url:
            raise ModelNotReady(f"{self.spec.label}: remote TorchServe needs torchserve.inference_url")
        self._ts_name = options.model_name or self.spec.model_name
        self._ts_version = options.versions.get(self.spec.version)
        self._remote = await remote_client(self.spec.shared, options, self.spec.label)
        if not await self._probe_remote():
            self._remote = None
            raise BackendUnavailable(
                f"{self.spec.label}: remote TorchServe at {options.inference_url} is not serving it"
            )
        self._prober = asyncio.create_task(self._probe_forever())

    async def _probe_remote(self) -> bool:
        """Healthy, and (where the management API is given) the model has a worker ready."""
        assert self._remote is not None
        healthy = await self._remote.healthy()
        if healthy and self._remote.management_url:
            path = f"/models/{self._ts_name}" + (f"/{self._ts_version}" if self._ts_version else "")
            try:
                response = await self._remote.manage("GET", path, self.spec.label)
            except GatewayError as exc:
                log.warning("%s", exc)
                healthy = False
            else:
                healthy = response.status_code == 200 and any(
                    w.get("status") == "READY" for m in response.json() for w in m.get("workers", [])
                )
        self._remote_healthy = healthy
        return healthy

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            with contextlib.suppress(httpx.HTTPError, ValueError):
                await self._probe_remote()

    async def infer(
        self,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        output_names: Sequence[str],
        *,
        deadline: float | None = None,
    ) -> dict[str, np.ndarray[Any, Any]]:
        client = self._client()
        try:
            body = wire.encode_tensors(
                "inputs", dict(inputs), {"outputs": list(output_names)} if output_names else None
            )
        except wire.TensorFormatError as exc:
            raise InvalidInput(f"{self.spec.label}: {exc}") from exc
        guard = self._guard(client)
        limit = self.options.timeout_s

        async def attempt(remaining: float | None) -> bytes:
            timeout = limit if remaining is None else min(remaining, limit)
            return await client.predict(self.spec.label, self._ts_name, self._ts_version, body, timeout)

        try:
            payload = await guard.call(attempt, deadline)
        except BackendUnavailable:
            self._remote_healthy = False
            raise
        try:
            header, outputs = wire.decode(payload, "outputs")
        except wire.TensorFormatError as exc:
            raise BackendError(
                f"{self.spec.label}: TorchServe's answer is not in the modelyard tensor format: {exc}"
            ) from exc
        if "error" in header:
            raise BackendError(f"{self.spec.label}: {header['error']}")
        return {n: outputs[n] for n in output_names} if output_names else outputs

    def _client(self) -> TorchServeClient:
        if self._managed is not None:
            if not self._managed.healthy or self._managed.client is None:
                raise BackendUnavailable(
                    f"{self.spec.label}: the managed TorchServe is down; it is being restarted"
                )
            return self._managed.client
        if self._remote is not None:
            return self._remote
        raise ModelNotReady(f"{self.spec.label} is not loaded")

    def _guard(self, client: TorchServeClient) -> EndpointGuard:
        return self.spec.shared.breakers.guard(self.backend, client.inference_url, self.options.resilience)

    @property
    def guard(self) -> EndpointGuard | None:
        """The circuit breaker of the TorchServe this version runs on, once it has one."""
        client = self._managed.client if self._managed is not None else self._remote
        return None if client is None else self._guard(client)

    def breaker(self) -> EndpointGuard | None:
        return self.guard

    def process_id(self) -> int | None:
        return self._managed.pid if self._managed is not None else None

    async def ready(self) -> bool:
        guard = self.guard
        if guard is not None and not guard.allows_traffic():
            return False
        if self._managed is not None:
            return self._managed.healthy
        return self._remote is not None and self._remote_healthy

    async def aclose(self) -> None:
        managed, self._managed = self._managed, None
        if managed is not None:
            assert self._registration is not None
            try:
                await managed.unregister(self._registration)
            finally:
                managed.release(self.spec.shared)
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
            self._prober = None
        # A remote client belongs to SharedResources, which closes it with the registry.
        self._remote = None
