"""TorchServe: a managed local TorchServe that the gateway starts, supervises and stops, or a
remote one given by its URLs.

Managed mode archives `model.pt` (TorchScript) with torch-model-archiver and the handler in
`adapters/torchserve_handler.py`, registers every version through the management API, and keeps
TorchServe's default version in line with the gateway's. Tensors travel in the handler's compact
binary form over one long-lived HTTP connection pool per TorchServe.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import aiohttp
import httpx
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adapters import torchserve_handler as wire
from adapters.base import LoadSpec, ModelAdapter, SharedResources
from gateway.breaker import EndpointGuard, GuardOptions
from gateway.errors import (
    BackendError,
    BackendUnavailable,
    ConnectionRefused,
    DeadlineExceeded,
    GatewayError,
    InvalidInput,
    ModelNotReady,
)
from gateway.net import free_port
from gateway.types import ModelSignature, TensorSpec, datatype_of

log = logging.getLogger("modelyard.torchserve")

HANDLER_FILE = Path(wire.__file__)
STARTUP_TIMEOUT_S = 180.0
RESTART_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
PROBE_INTERVAL_S = 2.0


class TorchServeOptions(BaseModel):
    """The `torchserve:` section of a model's config.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["managed", "remote"] = "managed"
    # Remote mode: where TorchServe answers, and the model's name and versions there.
    inference_url: str | None = None
    management_url: str | None = None
    model_name: str | None = None
    # gateway version -> TorchServe version; without one, the remote's default version serves.
    versions: dict[int, str] = Field(default_factory=dict)
    # TorchServe's token authorization: the key itself, or the environment variable holding it.
    token: str | None = None
    token_env: str | None = None
    management_token: str | None = None
    management_token_env: str | None = None
    # TorchServe-side batching and workers (managed mode registers the model with these).
    batch_size: int = Field(default=1, ge=1)
    max_batch_delay_ms: int = Field(default=5, ge=0)
    workers: int = Field(default=1, ge=1)
    threads: int = Field(default=1, ge=1)
    response_timeout_s: int = Field(default=120, ge=1)
    # A .npz file of example inputs, beside config.yaml: the model's metadata when config.yaml
    # declares no inputs and outputs.
    sample: str | None = None
    timeout_s: float = Field(default=60.0, gt=0)
    # The circuit breaker and retries of this TorchServe's inference address (gateway/breaker.py).
    resilience: GuardOptions = GuardOptions()

    def secret(self, value: str | None, env: str | None, label: str) -> str | None:
        if value:
            return value
        if env:
            if env not in os.environ:
                raise ModelNotReady(f"{label}: environment variable {env} (torchserve {env!r}) is not set")
            return os.environ[env]
        return None


def _error_message(content: bytes) -> str:
    text = content[:300].decode(errors="replace")
    try:
        body = json.loads(content)
    except ValueError:
        try:
            header, _ = wire.decode(content, "outputs")
            return str(header.get("error", text))
        except wire.TensorFormatError:
            return text
    return str(body.get("message", body)) if isinstance(body, dict) else str(body)


@dataclass
class Registration:
    name: str
    version: str
    archive: str
    options: TorchServeOptions
    is_default: bool


class TorchServeClient:
    """One long-lived connection pool to one TorchServe's inference API, one to its management API.

    Inference goes through aiohttp: measured against httpx on the same requests, its client costs
    about a sixth of the CPU per request, and on the hot path that CPU is the gateway's. Management
    calls are rare and stay on httpx.
    """

    def __init__(
        self,
        inference_url: str,
        management_url: str | None,
        token: str | None,
        management_token: str | None,
        timeout_s: float,
    ) -> None:
        self.inference_url = inference_url.rstrip("/")
        self.management_url = management_url.rstrip("/") if management_url else None
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.inference = aiohttp.ClientSession(
            base_url=self.inference_url,
            headers=auth,
            connector=aiohttp.TCPConnector(limit=256),
            timeout=self._timeout,
        )
        management_auth = {"Authorization": f"Bearer {management_token}"} if management_token else {}
        self.management = httpx.AsyncClient(
            base_url=self.management_url or self.inference_url, headers=management_auth, timeout=timeout_s
        )

    async def healthy(self) -> bool:
        try:
            async with self.inference.get("/ping", timeout=aiohttp.ClientTimeout(total=5)) as response:
                if response.status != 200:
                    return False
                body = json.loads(await response.read())
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return False
        return isinstance(body, dict) and body.get("status") == "Healthy"

    async def predict(
        self, label: str, name: str, version: str | None, body: bytes, timeout: float | None
    ) -> bytes:
        path = f"/predictions/{name}" + (f"/{version}" if version else "")
        limit = self._timeout if timeout is None else aiohttp.ClientTimeout(total=timeout)
        try:
            async with self.inference.post(
                path, data=body, headers={"Content-Type": wire.CONTENT_TYPE}, timeout=limit
            ) as response:
                status, content = response.status, await response.read()
        except TimeoutError as exc:
            raise DeadlineExceeded(f"{label}: TorchServe gave no answer in time") from exc
        except aiohttp.ClientConnectorError as exc:
            raise ConnectionRefused(
                f"{label}: TorchServe at {self.inference_url} refused the connection: {exc}"
            ) from exc
        except aiohttp.ClientError as exc:
            raise BackendUnavailable(
                f"{label}: TorchServe at {self.inference_url} is unreachable: {exc}"
            ) from exc
        if status == 200:
            return content
        message = f"{label}: TorchServe answered {status}: {_error_message(content)}"
        if status in (400, 413, 422):
            raise InvalidInput(message)
        if status in (401, 403):
            raise BackendError(f"{label}: TorchServe refused the gateway's token ({status})")
        if status == 404:
            raise ModelNotReady(message)
        if status in (502, 503, 507):
            raise BackendUnavailable(message)
        if status == 504:
            raise DeadlineExceeded(message)
        raise BackendError(message)

    async def manage(self, method: str, path: str, label: str, **params: Any) -> httpx.Response:
        try:
            response = await self.management.request(method, path, params=params or None)
        except httpx.TransportError as exc:
            raise BackendUnavailable(f"{label}: TorchServe management API is unreachable: {exc}") from exc
        if response.status_code in (401, 403):
            raise BackendError(f"{label}: TorchServe refused the management token ({response.status_code})")
        return response

    async def aclose(self) -> None:
        await self.inference.close()
        await self.management.aclose()


class ManagedTorchServe:
    """A TorchServe that the gateway runs on loopback ports, restarts when it dies, and stops.

    It runs in a process group of its own, so stopping it ends its Java frontend and every Python
    worker with it: no orphans.
    """

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="modelyard-torchserve-"))
        self.store = self.workdir / "model-store"
        self.store.mkdir()
        self.generation = 0  # bumps on every (re)start; registrations belong to one generation
        self.healthy = False
        self.client: TorchServeClient | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._registrations: dict[tuple[str, str], Registration] = {}
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        self._lock = asyncio.Lock()

    @classmethod
    async def create(cls) -> ManagedTorchServe:
        runtime = cls()
        try:
            await runtime._start()
        except BaseException:
            await runtime.aclose()
            raise
        runtime.healthy = True
        runtime._supervisor = asyncio.create_task(runtime._supervise())
        return runtime

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def _start(self) -> None:
        if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
            raise ModelNotReady("TorchServe needs Java 17 or later: no `java` on PATH and no JAVA_HOME")
        inference, management, metrics = free_port(), free_port(), free_port()
        config = self.workdir / "config.properties"
        config.write_text(
            "\n".join(
                [
                    f"inference_address=http://127.0.0.1:{inference}",
                    f"management_address=http://127.0.0.1:{management}",
                    f"metrics_address=http://127.0.0.1:{metrics}",
                    # TorchServe also opens gRPC on fixed ports 7070/7071 unless told otherwise:
                    # two TorchServes on one machine would then collide.
                    "grpc_inference_address=127.0.0.1",
                    "grpc_management_address=127.0.0.1",
                    f"grpc_inference_port={free_port()}",
                    f"grpc_management_port={free_port()}",
                    f"model_store={self.store}",
                    "default_workers_per_model=1",
                    "install_py_dep_per_model=false",
                    "disable_system_metrics=true",
                    "enable_envvars_config=false",
                ]
            )
            + "\n"
        )
        tmp = self.workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        log_dir = self.workdir / "logs"
        log_dir.mkdir(exist_ok=True)
        # TorchServe's launcher keeps a machine-wide pid file in TMPDIR: a private TMPDIR lets
        # several gateways (and tests) each run their own.
        env = {
            **os.environ,
            "TMPDIR": str(tmp),
            "LOG_LOCATION": str(log_dir),
            "METRICS_LOCATION": str(log_dir),
        }
        launcher = Path(sys.executable).with_name("torchserve")
        command = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "ts.model_server"]
        command += ["--start", "--foreground", "--ncs", "--ts-config", str(config), "--model-store", str(self.store),
                    "--disable-token-auth", "--enable-model-api"]  # fmt: skip
        with (log_dir / "torchserve.out").open("ab") as sink:
            self._process = await asyncio.create_subprocess_exec(
                *command, cwd=self.workdir, env=env, stdout=sink, stderr=sink, start_new_session=True
            )
        self.client = TorchServeClient(
            f"http://127.0.0.1:{inference}", f"http://127.0.0.1:{management}", None, None, 60.0
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STARTUP_TIMEOUT_S
        while loop.time() < deadline:
            if self._process.returncode is not None:
                raise ModelNotReady(
                    f"TorchServe exited at start with {self._process.returncode}; see {log_dir}"
                )
            if await self.client.healthy():
                self.generation += 1
                log.info("managed TorchServe up (pid %d, inference port %d)", self._process.pid, inference)
                return
            await asyncio.sleep(0.25)
        raise ModelNotReady(
            f"TorchServe did not become healthy within {STARTUP_TIMEOUT_S:.0f}s; see {log_dir}"
        )

    async def _supervise(self) -> None:
        while not self._closing:
            assert self._process is not None
            code = await self._process.wait()
            if self._closing:
                return
            self.healthy = False
            log.error("managed TorchServe exited with %s; restarting", code)
            await self._kill_group()
            for attempt, delay in enumerate([*RESTART_BACKOFF_S, *[RESTART_BACKOFF_S[-1]] * 1000]):
                await asyncio.sleep(delay)
                if self._closing:
                    return
                try:
                    async with self._lock:
                        await self._replace_client()
                        await self._start()
                        for registration in list(self._registrations.values()):
                            await self._register(registration)
                        self.healthy = True
                    log.info(
                        "managed TorchServe restarted after %d attempt(s); models registered again",
                        attempt + 1,
                    )
                    break
                except (GatewayError, OSError) as exc:
                    self.healthy = False
                    log.error("restarting TorchServe failed (attempt %d): %s", attempt + 1, exc)
                    await self._kill_group()

    async def _replace_client(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    async def archive(
        self, spec: LoadSpec, options: TorchServeOptions, inputs: list[str], outputs: list[str]
    ) -> str:
        """The archive file name in the model store for one version, built once per content."""
        assert spec.artifact is not None
        name = f"{spec.model_name}-v{spec.version}"
        if spec.artifact.suffix == ".mar":
            target = self.store / f"{name}.mar"
            await asyncio.to_thread(shutil.copyfile, spec.artifact, target)
            return target.name
        settings = json.dumps({"inputs": inputs, "outputs": outputs, "threads": options.threads})
        digest = hashlib.sha256(spec.artifact.read_bytes() + settings.encode()).hexdigest()[:12]
        archive = f"{name}-{digest}"
        if (self.store / f"{archive}.mar").exists():
            return f"{archive}.mar"
        staging = Path(tempfile.mkdtemp(prefix="stage-", dir=self.workdir))
        (staging / wire.SETTINGS_FILE).write_text(settings)
        command = [
            sys.executable, "-m", "model_archiver.model_packaging", "--model-name", archive,
            "--version", str(spec.version), "--serialized-file", str(spec.artifact), "--handler", str(HANDLER_FILE),
            "--extra-files", str(staging / wire.SETTINGS_FILE), "--export-path", str(self.store), "--force",
        ]  # fmt: skip
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        output, _ = await process.communicate()
        shutil.rmtree(staging, ignore_errors=True)
        if process.returncode != 0:
            raise ModelNotReady(
                f"{spec.label}: torch-model-archiver failed: {output.decode(errors='replace')[-500:]}"
            )
        return f"{archive}.mar"

    async def register(self, registration: Registration, label: str) -> None:
        async with self._lock:
            self._registrations[(registration.name, registration.version)] = registration
            try:
                await self._register(registration)
            except BaseException:
                self._registrations.pop((registration.name, registration.version), None)
                raise

    async def _register(self, registration: Registration) -> None:
        client = self.client
        if client is None:
            raise BackendUnavailable("the managed TorchServe is not running")
        label = f"model '{registration.name}' version {registration.version}"
        options = registration.options
        existing = await client.manage("GET", f"/models/{registration.name}/{registration.version}", label)
        if existing.status_code == 200:
            await client.manage("DELETE", f"/models/{registration.name}/{registration.version}", label)
        response = await client.manage(
            "POST", "/models", label, url=registration.archive, model_name=registration.name,
            initial_workers=options.workers, synchronous="true", batch_size=options.batch_size,
            max_batch_delay=options.max_batch_delay_ms, response_timeout=options.response_timeout_s,
        )  # fmt: skip
        if response.status_code != 200:
            raise ModelNotReady(
                f"{label}: TorchServe would not register it: {_error_message(response.content)}"
            )
        if registration.is_default:
            await client.manage(
                "PUT", f"/models/{registration.name}/{registration.version}/set-default", label
            )

    async def unregister(self, registration: Registration) -> None:
        """Removes the registration, unless a reload has since registered the same version anew."""
        name, version = registration.name, registration.version
        async with self._lock:
            if self._registrations.get((name, version)) is not registration:
                return
            del self._registrations[(name, version)]
            if self.healthy and self.client is not None:
                with contextlib.suppress(GatewayError):
                    await self.client.manage(
                        "DELETE", f"/models/{name}/{version}", f"model '{name}' version {version}"
                    )

    async def _kill_group(self) -> None:
        process = self._process
        if process is None:
            return
        for sig, wait_s in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(process.wait(), wait_s)
            if not _group_alive(process.pid):
                break

    async def aclose(self) -> None:
        self._closing = True
        self.healthy = False
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await self._kill_group()
        await self._replace_client()
        shutil.rmtree(self.workdir, ignore_errors=True)
        log.info("managed TorchServe stopped")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _spec_of(name: str, array: np.ndarray[Any, Any]) -> TensorSpec:
    # A sample fixes one batch size; the first dimension is the batch and may vary.
    shape = (-1, *array.shape[1:]) if array.ndim else ()
    return TensorSpec(name, datatype_of(array.dtype), shape)


async def _managed(shared: SharedResources) -> ManagedTorchServe:
    return await shared.get("torchserve:managed", ManagedTorchServe.create)


class TorchServeAdapter(ModelAdapter):
    backend: ClassVar[str] = "torchserve"

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
        try:
            self.options = TorchServeOptions.model_validate(spec.config.torchserve)
        except ValidationError as exc:
            problems = "; ".join(
                f"torchserve.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            raise ModelNotReady(f"{spec.label}: {problems}") from exc

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
            return ModelSignature(inputs, outputs, "pytorch_torchscript")
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
        return ModelSignature(
            inputs, tuple(_spec_of(n, a) for n, a in outputs.items()), "pytorch_torchscript"
        )

    def _tensor_names(self, declared: ModelSignature | None) -> tuple[list[str], list[str]]:
        if declared is not None:
            return [s.name for s in declared.inputs], [s.name for s in declared.outputs]
        return list(self._sample()), []

    async def _load_managed(self, declared: ModelSignature | None) -> None:
        if self.spec.artifact is None or self.spec.artifact.suffix not in (".pt", ".mar"):
            raise ModelNotReady(
                f"{self.spec.label}: managed TorchServe needs model.pt or model.mar in {self.spec.version_dir}"
            )
        runtime = await _managed(self.spec.shared)
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
        self._registration = registration
        self._managed = runtime
        self._generation = runtime.generation

    async def _load_remote(self) -> None:
        options = self.options
        if not options.inference_url:
            raise ModelNotReady(f"{self.spec.label}: remote TorchServe needs torchserve.inference_url")
        self._ts_name = options.model_name or self.spec.model_name
        self._ts_version = options.versions.get(self.spec.version)
        self._remote = TorchServeClient(
            options.inference_url,
            options.management_url,
            options.secret(options.token, options.token_env, self.spec.label),
            options.secret(options.management_token, options.management_token_env, self.spec.label),
            options.timeout_s,
        )
        if not await self._probe_remote():
            await self._remote.aclose()
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
            await managed.unregister(self._registration)
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
            self._prober = None
        remote, self._remote = self._remote, None
        if remote is not None:
            await remote.aclose()
