"""What is loaded: each model's versions, their adapters, readiness and statistics.

A version loads at start (eager), or at the first request that needs it (on demand): then every
request that finds it loading waits on the same load, each within its own deadline. Loads of
versions whose memory the gateway holds go through the residency (gateway/residency.py), which
measures them and unloads idle versions when the memory budget needs room.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from adapters import LoadSpec, ModelAdapter, SharedResources, create_adapter
from gateway.batching import BatchingAdapter, BatchObserver
from gateway.cache import cache_for
from gateway.config import (
    ROUTING_KEYS,
    ConfigError,
    LoadMode,
    ModelConfig,
    load_model_config,
    preferred_version,
)
from gateway.errors import (
    BackendUnavailable,
    DeadlineExceeded,
    GatewayError,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    NoRoom,
    Overloaded,
)
from gateway.limits import Limiter
from gateway.loaded import NOT_RESIDENT, LoadedModel, LoadedVersion, State
from gateway.metrics import Metrics
from gateway.repository import CONFIG_FILE, ModelEntry, Repository, VersionEntry, is_remote
from gateway.residency import Residency, artifact_bytes
from gateway.samples import warm_up
from gateway.types import IndexEntry

log = logging.getLogger("modelyard.registry")

# Seconds between loads of a model whose backend could not be reached; the last repeats.
RETRY_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
# How long a replaced or unloaded version may take to finish the requests it is running.
DRAIN_TIMEOUT_S = 30.0

AdapterFactory = Callable[[str, LoadSpec], ModelAdapter]


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
        *,
        load_mode: LoadMode = "eager",
        residency: Residency | None = None,
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
        self.load_mode = load_mode
        self.residency = residency or Residency(metrics=metrics)
        # A repository load's config, in config.yaml's keys: it stands in for the file's until the
        # next repository load of the model.
        self._overrides: dict[str, dict[str, Any]] = {}
        self._loading: set[asyncio.Task[None]] = set()
        # Versions that loaded successfully, over the gateway's life.
        self.loads = 0

    def get(self, name: str) -> LoadedModel:
        model = self._models.get(name)
        if model is not None:
            return model
        # Triton's wording, which clients (tritonclient's own examples among them) look for.
        if self.repository.folder(name) is not None:
            raise ModelNotReady(
                f"Request for unknown model: '{name}' has no available versions: it is in the "
                "repository but not loaded"
            )
        raise ModelNotFound(f"Request for unknown model: '{name}' is not found")

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

    async def load(self, name: str, resident: bool | None = None) -> LoadedModel:
        """Loads the model again from the repository: its versions resident now, or (with None)
        as its load mode says, which leaves an on-demand model's versions to their first request."""
        self._held_back.discard(name)
        try:
            return await self._load(name, resident)
        finally:
            self._retry_if_backend_was_down(name)

    async def load_from_api(self, name: str, override: Mapping[str, Any] | None = None) -> LoadedModel:
        """A repository load: every version resident now, with `override` (config.yaml keys) in
        place of the file's until the next repository load. A config that does not fit is refused
        before anything changes."""
        folder = self.repository.folder(name)
        if folder is None:
            raise ModelNotFound(f"failed to load '{name}', failed to poll from model repository")
        if override:
            try:
                load_model_config(folder / CONFIG_FILE, override)
            except ConfigError as exc:
                raise InvalidInput(
                    f"failed to load '{name}', the config does not fit config.yaml: {exc}"
                ) from None
            problems = self.repository.scan(name, override).problems
            if problems:
                raise InvalidInput(f"failed to load '{name}', with this config: {'; '.join(problems)}")
            self._overrides[name] = dict(override)
        else:
            self._overrides.pop(name, None)
        return await self.load(name, resident=True)

    async def make_resident(self, model: LoadedModel, loaded: LoadedVersion, deadline: float | None) -> None:
        """Waits, until `deadline` at most, for `loaded` to be ready: starts its load, or joins the
        one under way. The caller has counted its request on the version (or needs only what a
        load leaves behind, its signature), so once loaded nothing unloads it under the request."""
        if loaded.ready:
            return
        label = f"model '{model.name}' version {loaded.version}"
        if loaded.pending is None:
            if not loaded.loadable:
                raise ModelNotReady(_not_ready(model.name, loaded))
            loaded.pending = task = asyncio.ensure_future(self._load_on_demand(model, loaded))
            self._loading.add(task)
            task.add_done_callback(self._loading.discard)
        limits = model.entry.config.limits
        if loaded.waiting >= limits.max_inflight + limits.max_queue:
            raise Overloaded(f"{label}: {loaded.waiting} requests already wait for it to load")
        loaded.waiting += 1
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            await asyncio.wait_for(asyncio.shield(loaded.pending), timeout)
        except TimeoutError:
            # The load goes on for the requests after this one.
            raise DeadlineExceeded(
                f"{label}: still loading at the request's deadline", stage="load"
            ) from None
        finally:
            loaded.waiting -= 1
        if not loaded.ready:
            raise ModelNotReady(_not_ready(model.name, loaded))

    async def _load_on_demand(self, model: LoadedModel, loaded: LoadedVersion) -> None:
        try:
            await self._bring_in(model, loaded, trigger="request")
        finally:
            loaded.pending = None

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
            log.info("model '%s' is new or changed on disk", name)
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
                await self._load(name, None)
            model = self._models.get(name)
            if model is not None and not any(v.retryable for v in model.versions.values()):
                log.info("model '%s' loaded on retry %d", name, attempt)
                return

    async def _load(self, name: str, resident: bool | None) -> LoadedModel:
        folder = self.repository.folder(name)
        if folder is None:
            raise ModelNotFound(f"failed to load '{name}', failed to poll from model repository")
        async with self._lock(name):
            fingerprint = _fingerprint(folder)
            entry = self.repository.scan(name, self._overrides.get(name))
            old = self._models.get(name)
            if old is not None and _only_routing_changed(
                old, entry, fingerprint, self._fingerprints.get(name)
            ):
                # Its versions and backends stay as they are; the next request routes by the new keys.
                self._fingerprints[name] = fingerprint
                changed = _changed_keys(old.entry.config, entry.config)
                old.entry = entry
                log.info("model '%s': %s changed, applied without a reload", name, ", ".join(changed))
                return old
            self._fingerprints[name] = fingerprint
            if not entry.ok:
                for problem in entry.problems:
                    log.error("cannot load %s", problem)
                failed = LoadedModel(
                    name, entry, {}, self._limiter(entry), State.UNAVAILABLE, "; ".join(entry.problems)
                )
                await self._replace(name, failed)
                raise ModelNotReady(f"load failed for model '{name}': {failed.reason}")
            backend = entry.backend or "onnxruntime"
            versions = {
                v.version: LoadedVersion(
                    v.version, backend, State.LOADABLE, NOT_RESIDENT, cache=cache_for(entry.config.cache)
                )
                for v in entry.versions
            }
            model = LoadedModel(name, entry, versions, self._limiter(entry))
            if resident is None:
                resident = (entry.config.load or self.load_mode) == "eager"
            if resident:
                await asyncio.gather(*(self._bring_in(model, loaded, "load") for loaded in versions.values()))
                if not model.ready_versions:
                    model.state = State.UNAVAILABLE
                    model.reason = "; ".join(v.reason for v in versions.values())
            await self._replace(name, model)
            if model.state is State.UNAVAILABLE:
                failures = " ".join(
                    f"version {v.version} is at {v.state} state: {v.reason};" for v in versions.values()
                )
                raise ModelNotReady(f"load failed for model '{name}': {failures}")
            shown = model.ready_versions if resident else f"{sorted(versions)} on demand"
            log.info("model '%s' ready: versions %s (%s)", name, shown, entry.backend)
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
        for task in list(self._loading):
            task.cancel()
        await asyncio.gather(*self._loading, return_exceptions=True)
        if self._draining:
            await asyncio.gather(*self._draining, return_exceptions=True)
        models, self._models = list(self._models.values()), {}
        await asyncio.gather(*(self._close(model) for model in models))
        await self.shared.aclose()

    async def _bring_in(self, model: LoadedModel, loaded: LoadedVersion, trigger: str) -> None:
        """Loads one version, through the memory budget where the gateway holds its memory. A
        failure stays in the version's state and reason."""
        entry = model.entry
        found = next(v for v in entry.versions if v.version == loaded.version)
        label = f"model '{model.name}' version {loaded.version}"
        started = time.monotonic()
        loaded.state = State.LOADING
        outcome = "ok"
        adapter: ModelAdapter | None = None
        try:
            # Built outside the measurement: building imports the backend's runtime, a cost of the
            # process, not of this version.
            adapter = self._build(entry, loaded, found)
            if is_remote(entry.config, entry.backend):
                await self._open(entry, loaded, adapter)
            else:
                files = artifact_bytes(found.artifact)
                await self.residency.load(
                    model.name, loaded, files, lambda: self._open(entry, loaded, adapter)
                )
        except NoRoom as exc:
            log.warning("cannot load %s now: %s", label, exc)
            loaded.state, loaded.reason, outcome = State.LOADABLE, str(exc), "no_room"
        except GatewayError as exc:
            log.error("cannot load %s: %s", label, exc.logged)
            loaded.state, loaded.reason, outcome = State.UNAVAILABLE, str(exc), "failed"
            loaded.retryable = isinstance(exc, BackendUnavailable | DeadlineExceeded)
            if loaded.retryable and trigger == "request":
                loaded.state = State.LOADABLE  # its backend may answer the next request's load
        except Exception as exc:  # an adapter bug must not take the other models down
            log.exception("cannot load %s", label)
            loaded.state, loaded.reason, outcome = State.UNAVAILABLE, f"{type(exc).__name__}: {exc}", "failed"
        else:
            loaded.loads += 1
            self.loads += 1
        if adapter is not None and loaded.adapter is not adapter:
            with contextlib.suppress(Exception):  # built, but it never served: closing twice is safe
                await adapter.aclose()
        if self._metrics is not None:
            labels = (model.name, str(loaded.version), loaded.backend)
            self._metrics.model_loads.labels(*labels, trigger, outcome).inc()
            if outcome == "ok":
                self._metrics.model_load_duration.labels(*labels).observe(time.monotonic() - started)
            self._metrics.model_ready.labels(*labels).set(int(loaded.ready))

    def _build(self, entry: ModelEntry, loaded: LoadedVersion, found: VersionEntry) -> ModelAdapter:
        default = preferred_version(entry.config, [v.version for v in entry.versions])
        spec = LoadSpec(
            entry.name, found.version, found.path, found.artifact, entry.config, default, self.shared
        )
        adapter = self._adapter_factory(loaded.backend, spec)
        if entry.config.batching.max_batch_size > 0:
            adapter = BatchingAdapter(
                adapter, entry.config.batching, self._batch_observer(spec, loaded.backend)
            )
        return adapter

    async def _open(self, entry: ModelEntry, loaded: LoadedVersion, adapter: ModelAdapter) -> None:
        """Loads and warms up the version's adapter, and only then hands it to the version: no
        request sees it half loaded."""
        label = f"model '{entry.name}' version {loaded.version}"
        try:
            await adapter.load()
            signature = await adapter.metadata()
            if entry.config.warmup is not None:
                await warm_up(adapter, signature, entry.config.warmup, entry.path, label)
                if self._metrics is not None:
                    self._metrics.prepare(entry.name, str(loaded.version), loaded.backend)
            if loaded.closed:
                raise ModelNotReady(f"{label} was unloaded while it loaded")
        except BaseException:
            with contextlib.suppress(Exception):
                await adapter.aclose()
            raise
        loaded.signature, loaded.adapter = signature, adapter
        loaded.state, loaded.reason, loaded.retryable = State.READY, "", False

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
            version.closed = True
            adapter, version.adapter = version.adapter, None
            version.state = State.UNAVAILABLE
            version.reason = "unloaded"
            if adapter is not None:
                try:
                    await adapter.aclose()
                except Exception:
                    log.exception("closing model '%s' version %d", model.name, version.version)
            self.residency.release(model.name, version)

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


def _not_ready(model: str, loaded: LoadedVersion) -> str:
    reason = f": {loaded.reason}" if loaded.reason else ""
    return f"Request for unknown model: '{model}' version {loaded.version} is not at ready state ({loaded.state}){reason}"


def _only_routing_changed(
    old: LoadedModel, entry: ModelEntry, fingerprint: tuple[object, ...], before: tuple[object, ...] | None
) -> bool:
    """Whether the new scan differs from the loaded model in routing keys alone: the same files
    beside config.yaml, the same versions, none failed, and config.yaml's other keys equal."""
    if not entry.ok or before is None or old.state is not State.READY:
        return False
    if _artifacts(fingerprint) != _artifacts(before) or entry.versions != old.entry.versions:
        return False
    if not all(v.ready or v.loadable for v in old.versions.values()):
        return False  # a version that failed loads again
    changed = _changed_keys(old.entry.config, entry.config)
    return bool(changed) and set(changed) <= ROUTING_KEYS


def _changed_keys(old: ModelConfig, new: ModelConfig) -> list[str]:
    before, after = old.model_dump(), new.model_dump()
    return sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))


def _artifacts(fingerprint: tuple[object, ...]) -> tuple[object, ...]:
    """A fingerprint's files other than config.yaml."""
    return tuple(f for f in fingerprint if not (isinstance(f, tuple) and f[0] == CONFIG_FILE))


def _fingerprint(folder: Path) -> tuple[object, ...]:
    """Every file under a model's folder with its size and modification time: any edit changes it."""
    try:
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        return tuple((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    except OSError:
        return ()
