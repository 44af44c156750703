"""What is loaded: each model's versions, their adapters, readiness and statistics."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from adapters import LoadSpec, ModelAdapter, SharedResources, create_adapter
from gateway.batching import BatchingAdapter, BatchObserver
from gateway.config import preferred_version
from gateway.errors import BackendUnavailable, DeadlineExceeded, GatewayError, ModelNotFound, ModelNotReady
from gateway.limits import Limiter
from gateway.metrics import Metrics
from gateway.repository import ModelEntry, Repository
from gateway.types import IndexEntry, ModelSignature, VersionStats

log = logging.getLogger("modelyard.registry")

# Seconds between loads of a model whose backend could not be reached; the last repeats.
RETRY_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
# How long a replaced or unloaded version may take to finish the requests it is running.
DRAIN_TIMEOUT_S = 30.0

AdapterFactory = Callable[[str, LoadSpec], ModelAdapter]


class State(StrEnum):
    READY = "READY"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


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
    # Requests the data plane is running on this version now.
    inflight: int = 0

    @property
    def ready(self) -> bool:
        return self.state is State.READY and self.adapter is not None and self.signature is not None


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


class Registry:
    """Loads models from the repository and owns their adapters.

    Loading a model that is already loaded builds the new versions first and swaps them in whole,
    so requests keep being served by the old versions until the new ones are ready.
    """

    def __init__(
        self,
        root: Path,
        adapter_factory: AdapterFactory = create_adapter,
        metrics: Metrics | None = None,
        shared: SharedResources | None = None,
        model_name: str | None = None,
    ) -> None:
        self.root = root
        # With a model name, `root` is that one model's folder (KServe's /mnt/models).
        self.repository = Repository(root, model_name)
        self._adapter_factory = adapter_factory
        self._metrics = metrics
        self._models: dict[str, LoadedModel] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.shared = shared or SharedResources()
        self._retries: dict[str, asyncio.Task[None]] = {}
        self._draining: set[asyncio.Task[None]] = set()
        # What each model's files looked like when it was last loaded, for polling.
        self._fingerprints: dict[str, tuple[object, ...]] = {}
        # Unloaded through the API: polling leaves these alone until they are loaded again.
        self._held_back: set[str] = set()

    def get(self, name: str) -> LoadedModel:
        model = self._models.get(name)
        if model is not None:
            return model
        if self.repository.folder(name) is not None:
            raise ModelNotReady(f"model '{name}' is in the repository but not loaded")
        raise ModelNotFound(f"model '{name}' is not in the repository")

    def knows(self, name: str) -> bool:
        """Whether the model is loaded or in the repository folder."""
        return name in self._models or self.repository.folder(name) is not None

    def models(self) -> list[LoadedModel]:
        return [self._models[name] for name in sorted(self._models)]

    def load_levels(self) -> list[tuple[str, int, int]]:
        """(model, requests running, requests queued) for every loaded model, from its limiter."""
        return [(name, m.limiter.inflight, m.limiter.queued) for name, m in sorted(self._models.items())]

    async def load_all(self) -> None:
        """Load every model in the repository; one that fails is logged and left UNAVAILABLE."""
        results = await asyncio.gather(
            *(self.load(name) for name in self.repository.names()), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, GatewayError):
                raise result

    async def load(self, name: str) -> LoadedModel:
        self._held_back.discard(name)
        try:
            return await self._load(name)
        finally:
            self._retry_if_backend_was_down(name)

    async def poll(self) -> None:
        """Brings what is loaded in line with the folder: new models load, removed ones unload,
        and a model whose files or config changed loads again (its old versions serve until then)."""
        on_disk = set(self.repository.names())
        for name in sorted(set(self._models) - on_disk):
            log.info("model '%s' left the repository: unloading", name)
            await self.unload(name, hold_back=False)
        for name in sorted(on_disk - self._held_back):
            folder = self.repository.folder(name)
            if name in self._models and folder and self._fingerprints.get(name) == _fingerprint(folder):
                continue
            log.info("model '%s' is new or changed on disk: loading", name)
            with contextlib.suppress(GatewayError):  # logged, and shown in the index
                await self.load(name)

    def _retry_if_backend_was_down(self, name: str) -> None:
        model = self._models.get(name)
        waiting = model is not None and any(v.retryable for v in model.versions.values())
        if waiting and (name not in self._retries or self._retries[name].done()):
            self._retries[name] = asyncio.create_task(self._retry(name), name=f"retry loading {name}")

    async def _retry(self, name: str) -> None:
        """Loads the model again, with backoff, until the backends it waits for answer."""
        delays = itertools.chain(RETRY_BACKOFF_S, itertools.repeat(RETRY_BACKOFF_S[-1]))
        for attempt, delay in enumerate(delays, start=1):
            await asyncio.sleep(delay)
            model = self._models.get(name)
            if model is None or not any(v.retryable for v in model.versions.values()):
                return  # unloaded, or loaded since by someone else
            with contextlib.suppress(GatewayError):  # still down: the next attempt tells
                await self._load(name)
            model = self._models.get(name)
            if model is not None and not any(v.retryable for v in model.versions.values()):
                log.info("model '%s' loaded on retry %d", name, attempt)
                return

    async def _load(self, name: str) -> LoadedModel:
        folder = self.repository.folder(name)
        if folder is None:
            raise ModelNotFound(f"model '{name}' is not in the repository")
        async with self._lock(name):
            self._fingerprints[name] = _fingerprint(folder)
            entry = self.repository.scan(name)
            if not entry.ok:
                for problem in entry.problems:
                    log.error("cannot load %s", problem)
                failed = LoadedModel(
                    name, entry, {}, self._limiter(entry), State.UNAVAILABLE, "; ".join(entry.problems)
                )
                await self._replace(name, failed)
                raise ModelNotReady(failed.reason)
            versions = dict(
                zip(
                    [v.version for v in entry.versions],
                    await asyncio.gather(*(self._load_version(entry, v.version) for v in entry.versions)),
                    strict=True,
                )
            )
            model = LoadedModel(name, entry, versions, self._limiter(entry))
            if not model.ready_versions:
                model.state = State.UNAVAILABLE
                model.reason = "; ".join(v.reason for v in versions.values())
            await self._replace(name, model)
            if model.state is State.UNAVAILABLE:
                raise ModelNotReady(f"model '{name}' failed to load: {model.reason}")
            log.info("model '%s' ready: versions %s (%s)", name, model.ready_versions, entry.backend)
            return model

    async def unload(self, name: str, hold_back: bool = True) -> None:
        if hold_back:
            self._held_back.add(name)
        if name not in self._models:
            self.get(name)  # raises the right error for an unknown or never-loaded model
            return
        retry = self._retries.pop(name, None)
        if retry is not None:
            retry.cancel()
        async with self._lock(name):
            model = self._models.pop(name, None)
            if model is not None:
                self._publish(model, unloaded=True)
                await self._close(model, drain=True)
                log.info("model '%s' unloaded", name)

    def index(self) -> list[IndexEntry]:
        entries: list[IndexEntry] = []
        for name in sorted(set(self.repository.names()) | set(self._models)):
            model = self._models.get(name)
            if model is None:
                entries.append(IndexEntry(name, "", State.UNAVAILABLE.value, "not loaded"))
            elif not model.versions:
                entries.append(IndexEntry(name, "", model.state.value, model.reason))
            else:
                entries.extend(
                    IndexEntry(name, str(v.version), v.state.value, v.reason)
                    for v in sorted(model.versions.values(), key=lambda v: v.version)
                )
        return entries

    async def aclose(self) -> None:
        for retry in self._retries.values():
            retry.cancel()
        if self._draining:
            await asyncio.gather(*self._draining, return_exceptions=True)
        models, self._models = list(self._models.values()), {}
        await asyncio.gather(*(self._close(model) for model in models))
        await self.shared.aclose()

    async def _load_version(self, entry: ModelEntry, version: int) -> LoadedVersion:
        found = next(v for v in entry.versions if v.version == version)
        backend = entry.backend or "onnxruntime"
        default = preferred_version(entry.config, [v.version for v in entry.versions])
        spec = LoadSpec(entry.name, version, found.path, found.artifact, entry.config, default, self.shared)
        loaded = LoadedVersion(version, backend, State.LOADING)
        try:
            adapter = self._adapter_factory(backend, spec)
            if entry.config.batching.max_batch_size > 0:
                adapter = BatchingAdapter(adapter, entry.config.batching, self._batch_observer(spec, backend))
            await adapter.load()
            loaded.signature = await adapter.metadata()
            loaded.adapter = adapter
            loaded.state = State.READY
        except GatewayError as exc:
            log.error("cannot load %s: %s", spec.label, exc)
            loaded.state, loaded.reason = State.UNAVAILABLE, str(exc)
            loaded.retryable = isinstance(exc, BackendUnavailable | DeadlineExceeded)
        except Exception as exc:  # an adapter bug must not take the other models down
            log.exception("cannot load %s", spec.label)
            loaded.state, loaded.reason = State.UNAVAILABLE, f"{type(exc).__name__}: {exc}"
        return loaded

    async def _replace(self, name: str, model: LoadedModel) -> None:
        old = self._models.get(name)
        self._models[name] = model
        self._publish(model)
        if old is not None:
            # New requests already go to the new versions; the old ones close once they are idle.
            task = asyncio.create_task(self._close(old, drain=True), name=f"drain {name}")
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)

    async def _close(self, model: LoadedModel, drain: bool = False) -> None:
        if drain:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + DRAIN_TIMEOUT_S
            while any(v.inflight for v in model.versions.values()) and loop.time() < deadline:
                await asyncio.sleep(0.01)
        for version in model.versions.values():
            adapter, version.adapter = version.adapter, None
            version.state = State.UNAVAILABLE
            version.reason = "unloaded"
            if adapter is not None:
                try:
                    await adapter.aclose()
                except Exception:
                    log.exception("closing model '%s' version %d", model.name, version.version)

    def _publish(self, model: LoadedModel, unloaded: bool = False) -> None:
        if self._metrics is None:
            return
        for loaded in model.versions.values():
            ready = loaded.ready and not unloaded
            self._metrics.model_ready.labels(model.name, str(loaded.version), loaded.backend).set(int(ready))

    def _batch_observer(self, spec: LoadSpec, backend: str) -> BatchObserver | None:
        metrics = self._metrics
        if metrics is None:
            return None
        sizes = metrics.batch_size.labels(spec.model_name, str(spec.version), backend)
        waits = metrics.batch_queue_duration.labels(spec.model_name, str(spec.version), backend)

        def observe(rows: int, waited_s: float) -> None:
            sizes.observe(rows)
            waits.observe(waited_s)

        return observe

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    @staticmethod
    def _limiter(entry: ModelEntry) -> Limiter:
        limits = entry.config.limits
        return Limiter(limits.max_inflight, limits.max_queue, f"model '{entry.name}'")


def _fingerprint(folder: Path) -> tuple[object, ...]:
    """Every file under a model's folder with its size and modification time: any edit changes it."""
    try:
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        return tuple((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    except OSError:
        return ()
