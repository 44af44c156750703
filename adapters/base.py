"""The backend interface: every backend kind implements `ModelAdapter` in one module of its own."""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Protocol, Self, TypeVar

import numpy as np

from gateway.breaker import Breakers, EndpointGuard
from gateway.config import ModelConfig
from gateway.errors import ModelNotReady
from gateway.types import ModelSignature, TensorSpec

log = logging.getLogger("modelyard.adapters")


class SharedResource(Protocol):
    async def aclose(self) -> None: ...


Resource = TypeVar("Resource", bound=SharedResource)


class SharedResources:
    """Backend resources that several model versions share: a managed server, a connection pool.

    Created once by the registry; each is built on first use and closed when the registry closes.
    """

    def __init__(self, breakers: Breakers | None = None) -> None:
        self._items: dict[str, SharedResource] = {}
        self._lock = asyncio.Lock()
        # The circuit breakers of remote backend endpoints.
        self.breakers = breakers or Breakers()

    async def get(self, key: str, factory: Callable[[], Awaitable[Resource]]) -> Resource:
        async with self._lock:
            if key not in self._items:
                self._items[key] = await factory()
            return self._items[key]  # type: ignore[return-value]

    async def aclose(self) -> None:
        items, self._items = list(self._items.items()), {}
        for key, item in reversed(items):
            try:
                await item.aclose()
            except Exception:
                log.exception("closing shared resource %s", key)


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


class ModelAdapter(ABC):
    """One loaded model version on one backend.

    Adapters raise only `GatewayError` subclasses; backend exceptions are translated at this
    boundary with `raise ... from exc`.
    """

    backend: ClassVar[str]

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self._signature: ModelSignature | None = None

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
