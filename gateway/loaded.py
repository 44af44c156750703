"""What the registry holds of each model: its versions, their state, adapter and figures."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from enum import StrEnum

from adapters import ModelAdapter
from gateway.cache import ResponseCache
from gateway.limits import Limiter
from gateway.repository import ModelEntry
from gateway.types import ModelSignature, VersionStats


class State(StrEnum):
    READY = "READY"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"
    # Not resident, and loads when a request needs it: on demand, or unloaded to make room.
    LOADABLE = "LOADABLE"


NOT_RESIDENT = "not resident: loads at its first request"


@dataclass(slots=True)
class LoadedVersion:
    version: int
    backend: str
    state: State
    reason: str = ""
    adapter: ModelAdapter | None = None
    signature: ModelSignature | None = None
    stats: VersionStats = field(default_factory=VersionStats)
    # It failed because its backend could not be reached: loading again later may succeed.
    retryable: bool = False
    # Requests the data plane is running on this version now, or waiting for it to load.
    inflight: int = 0
    # time.monotonic() of its latest request: the least recently used idle version unloads first.
    last_used: float = 0.0
    # What its last load measured; kept while it is not resident, for its next load.
    footprint: Footprint | None = None
    loads: int = 0
    evictions: int = 0
    # The load every request that finds it loading waits on, and how many wait.
    pending: asyncio.Future[None] | None = None
    waiting: int = 0
    # The registry closed it (unloaded, or replaced by a reload): it never turns ready again.
    closed: bool = False
    # Its answers by their inputs, where the model's config asks for a cache; its own, never shared.
    cache: ResponseCache | None = None

    @property
    def ready(self) -> bool:
        return self.state is State.READY and self.adapter is not None and self.signature is not None

    @property
    def loadable(self) -> bool:
        """Not resident, and a request may wait for its load."""
        return self.state in (State.LOADABLE, State.LOADING) and not self.closed

    def detach(self, reason: str) -> ModelAdapter | None:
        """Takes the adapter out in one step, leaving the version loadable again."""
        adapter, self.adapter = self.adapter, None
        self.state, self.reason = State.LOADABLE, reason
        if self.cache is not None:
            self.cache.clear()
        return adapter


@dataclass(slots=True)
class LoadedModel:
    name: str
    entry: ModelEntry
    versions: dict[int, LoadedVersion]
    limiter: Limiter
    state: State = State.READY
    reason: str = ""

    @property
    def ready_versions(self) -> list[int]:
        return sorted(v for v, loaded in self.versions.items() if loaded.ready)

    @property
    def servable_versions(self) -> list[int]:
        """The versions a request can be served by: ready ones, and those that load on demand."""
        return sorted(v for v, loaded in self.versions.items() if loaded.ready or loaded.loadable)


@dataclass(frozen=True, slots=True)
class Footprint:
    """What a version added to the resident set at its last load."""

    # From just before the load to just after it, warmup included: what it holds while resident.
    resident: int
    # The most it added at any moment of the load.
    peak: int
