"""The backend interface: every backend kind implements `ModelAdapter` in one module of its own,
and describes itself in the class attributes the registry (adapters/__init__.py) reads.

Importing an adapter class costs nothing heavy: a backend imports its framework when a version
loads (`import_framework`), so a missing extra fails only the models that need it, with the hint
that says what to install.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, ClassVar, Protocol, Self, TypeVar

import grpc
import httpx
import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from gateway.breaker import Breakers, EndpointGuard
from gateway.config import ModelConfig, validation_problems
from gateway.errors import ModelNotReady
from gateway.native_logs import quiet_import
from gateway.types import ModelSignature, TensorSpec

log = logging.getLogger("modelyard.adapters")

# Versions load on worker threads, and two threads importing TensorFlow (or Keras, which imports
# it) at once can each see the other's half-initialized modules: one framework import at a time.
IMPORT_LOCK = threading.RLock()


class SharedResource(Protocol):
    async def aclose(self) -> None: ...


Resource = TypeVar("Resource", bound=SharedResource)


class SharedResources:
    """Backend resources that several model versions share: a managed server, a connection pool.

    Created once by the registry; each is built on first use and closed when the registry closes.
    """

    def __init__(
        self, breakers: Breakers | None = None, *, may_start_servers: bool = True, idle_stop_s: float = 30.0
    ) -> None:
        self._items: dict[str, SharedResource] = {}
        self._lock = asyncio.Lock()
        # Seconds a server the gateway started keeps running once no version uses it.
        self.idle_stop_s = idle_stop_s
        # The circuit breakers of remote backend endpoints.
        self.breakers = breakers or Breakers()
        # False in each of `--workers N`: a server the gateway starts (a managed TorchServe) must
        # exist once, and a worker is one of several.
        self.may_start_servers = may_start_servers

    async def get(self, key: str, factory: Callable[[], Awaitable[Resource]]) -> Resource:
        async with self._lock:
            if key not in self._items:
                self._items[key] = await factory()
            return self._items[key]  # type: ignore[return-value]

    async def release(self, key: str, resource: SharedResource, unused: Callable[[], bool]) -> bool:
        """Forgets and closes `resource` if it is still the one kept under `key` and `unused()`
        holds, both under the lock that `get` takes: a version that got it from `get` has marked
        itself a user before this can run."""
        async with self._lock:
            if self._items.get(key) is not resource or not unused():
                return False
            del self._items[key]
        await resource.aclose()
        return True

    async def grpc_channel(self, address: str, max_message_mb: int) -> grpc.aio.Channel:
        """One gRPC channel per address for every version that calls it. Messages carry whole
        tensors: far more than gRPC's 4 MiB default."""

        async def open_channel() -> _Channel:
            limit = max_message_mb * 1024 * 1024
            options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
            return _Channel(grpc.aio.insecure_channel(address, options=options))

        return (await self.get(f"grpc:{address}:{max_message_mb}", open_channel)).channel

    async def http_client(self, base_url: str) -> httpx.AsyncClient:
        """One keep-alive HTTP client per base URL for every version that calls it."""
        base_url = base_url.rstrip("/")

        async def open_client() -> httpx.AsyncClient:
            return httpx.AsyncClient(base_url=base_url)

        return await self.get(f"http:{base_url}", open_client)

    async def aclose(self) -> None:
        items, self._items = list(self._items.items()), {}
        for key, item in reversed(items):
            try:
                await item.aclose()
            except Exception:
                log.exception("closing shared resource %s", key)


@dataclass
class _Channel:
    channel: grpc.aio.Channel

    async def aclose(self) -> None:
        await self.channel.close()


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """What an adapter needs to load one version of one model."""

    model_name: str
    version: int
    version_dir: Path
    artifact: Path | None
    config: ModelConfig
    # The version the gateway serves when a request names none, for backends that keep their own default.
    default_version: int | None = None
    shared: SharedResources = field(default_factory=SharedResources)

    @property
    def model_dir(self) -> Path:
        return self.version_dir.parent

    @property
    def label(self) -> str:
        return f"model '{self.model_name}' version {self.version}"


class NoOptions(BaseModel):
    """The options of a backend whose config.yaml section takes no keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class OptionsError(ValueError):
    """A backend's config.yaml section that its options model refuses; one `key: problem` per fault."""


class ModelAdapter(ABC):
    """One loaded model version on one backend.

    Adapters raise only `GatewayError` subclasses; backend exceptions are translated at this
    boundary with `raise ... from exc`.
    """

    # The backend describes itself; config.yaml's backend names and sections, artifact detection,
    # remote checks, the bench's aliases and the install hints all derive from these.
    backend: ClassVar[str]
    # File or folder names in a version folder that select this backend when config.yaml names
    # none, in order of preference. None for a backend that serves from elsewhere.
    artifacts: ClassVar[tuple[str, ...]] = ()
    # It serves from elsewhere: its version folders need no artifact, and may be absent.
    remote: ClassVar[bool] = False
    # The pip extra that brings its framework; None when the core install has everything it needs.
    extra: ClassVar[str | None] = None
    # Validates its config.yaml section, the key named like the backend (at scan and at load).
    options_model: ClassVar[type[BaseModel]] = NoOptions
    # Other names `modelyard bench --deployments` accepts for it.
    aliases: ClassVar[tuple[str, ...]] = ()
    # The distributions whose versions the bench's report names.
    packages: ClassVar[tuple[str, ...]] = ()

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self._signature: ModelSignature | None = None

    # What the backend is -------------------------------------------------------------------------

    @classmethod
    def parse_options(cls, config: ModelConfig) -> BaseModel:
        """The backend's section of `config`, validated by `options_model`."""
        try:
            return cls.options_model.model_validate(dict(config.section(cls.backend)))
        except ValidationError as exc:
            raise OptionsError(validation_problems(exc, cls.options_model, (cls.backend,))) from exc

    @classmethod
    def read_options(cls, spec: LoadSpec) -> Any:
        """`parse_options` for the version being loaded; a bad section is ModelNotReady."""
        try:
            return cls.parse_options(spec.config)
        except OptionsError as exc:
            raise ModelNotReady(f"{spec.label}: invalid config.yaml section: {exc}") from exc

    @classmethod
    def serves_remotely(cls, options: BaseModel) -> bool:
        """Whether, with these options, the backend serves from elsewhere (`remote`, unless a
        backend's mode says otherwise)."""
        return cls.remote

    @classmethod
    def starts_server(cls, options: BaseModel) -> bool:
        """Whether, with these options, the gateway starts and owns a server for the backend (a
        managed TorchServe), which must exist once whatever the number of workers."""
        return False

    @classmethod
    def listed_versions(cls, options: BaseModel) -> tuple[int, ...]:
        """The versions a remote model's section lists in its `versions` mapping (local version ->
        the remote's), which stand for version folders that git cannot hold empty."""
        versions: Mapping[Any, Any] = getattr(options, "versions", None) or {}
        return tuple(sorted(int(v) for v in versions if str(v).isdigit()))

    @classmethod
    def install_hint(cls) -> str:
        if cls.extra is None:
            return "it is part of modelyard's core install (pip install modelyard)"
        return f"install the '{cls.extra}' extra (pip install 'modelyard[{cls.extra}]')"

    @classmethod
    def import_framework(cls, module: str, label: str) -> ModuleType:
        """A module of the backend's framework, imported when a version loads."""
        try:
            with IMPORT_LOCK:
                return quiet_import(module)
        except ImportError as exc:
            raise ModelNotReady(
                f"{label}: backend '{cls.backend}' cannot import {module}: {cls.install_hint()} ({exc})"
            ) from exc

    # One version ---------------------------------------------------------------------------------

    @abstractmethod
    async def load(self) -> None:
        """Make the version ready to serve, or raise with the reason it cannot be."""

    async def metadata(self) -> ModelSignature:
        """Inputs and outputs as the backend reports them, -1 for dynamic dimensions: what `load`
        left in `_signature`."""
        if self._signature is None:
            raise ModelNotReady(f"{self.spec.label} is not loaded")
        return self._signature

    @abstractmethod
    async def infer(
        self,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        output_names: Sequence[str],
        *,
        deadline: float | None = None,
    ) -> dict[str, np.ndarray[Any, Any]]:
        """Run one request; inputs are already checked against `metadata()`.

        `deadline` is an absolute `time.monotonic()` value by which the answer is due, or None.
        Remote backends turn it into their call's timeout (and raise `DeadlineExceeded`);
        in-process ones may ignore it, since the data plane stops waiting at the deadline anyway.
        """

    @abstractmethod
    async def ready(self) -> bool:
        """Whether the backend can take a request for this version now."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release the version's resources. Safe to call more than once."""

    def process_id(self) -> int | None:
        """The process that computes this version's answers, for the status page's memory figures:
        the gateway's own for in-process backends, a managed server's; None (the default) where the
        backend runs elsewhere and the gateway cannot see its memory."""
        return None

    def breaker(self) -> EndpointGuard | None:
        """The circuit breaker of the backend endpoint this version calls; None (the default) for
        backends that run in-process."""
        return None

    async def __aenter__(self) -> Self:
        await self.load()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


def override_signature(
    found: tuple[TensorSpec, ...], declared: Sequence[Any] | None, label: str
) -> tuple[TensorSpec, ...]:
    """Where config.yaml declares tensors, its shapes fill in what the artifact leaves open."""
    if not declared:
        return found
    by_name = {spec.name: spec for spec in found}
    merged = dict(by_name)
    for decl in declared:
        spec = decl.spec()
        if spec.name not in by_name:
            raise ModelNotReady(
                f"{label}: config.yaml declares tensor '{spec.name}', which the model does not have "
                f"(it has {', '.join(by_name)})"
            )
        actual = by_name[spec.name]
        if spec.datatype != actual.datatype:
            raise ModelNotReady(
                f"{label}: config.yaml says '{spec.name}' is {spec.datatype}, the model says {actual.datatype}"
            )
        merged[spec.name] = spec
    return tuple(merged[spec.name] for spec in found)
