"""What the gateway is doing now, read-only: models, versions and their backends, backend health and
process memory, and live traffic computed from the gateway's own Prometheus metrics.

`GET /status` serves it as JSON (what `modelyard bench` reads for memory and twins); the status page
at `/` (gateway/protocols/status_page.py) renders the same object.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

import gateway
from gateway.auth import FULL_ACCESS, Access
from gateway.config import preferred_version
from gateway.dataplane import DataPlane
from gateway.errors import without_server_paths
from gateway.loaded import LoadedVersion
from gateway.metrics import LATENCY_BUCKETS, Metrics
from gateway.workers import WorkerRecord, WorkerTable

# The traffic figures cover at least this many seconds of the most recent history, where there is that much.
WINDOW_S = 5.0
# Snapshots older than this are dropped; the deque's length bounds memory whatever the poll rate.
HISTORY_S = 60.0
MAX_SNAPSHOTS = 256


@dataclass(frozen=True, slots=True)
class ModelTraffic:
    """One model's requests over the window: rate, share of errors and latency percentiles."""

    window_s: float
    requests: int
    req_per_s: float
    error_rate: float
    p50_ms: float | None
    p99_ms: float | None


@dataclass(frozen=True, slots=True)
class _Counts:
    requests: int
    errors: int
    buckets: tuple[float, ...]  # cumulative counts, one per upper bound of `bounds`


@dataclass(slots=True)
class MetricsWindow:
    """Rates and percentiles over a sliding window, from snapshots of cumulative counters taken
    whenever the status is read; nothing runs in the background."""

    metrics: Metrics
    clock: Callable[[], float] = time.monotonic
    _snapshots: deque[tuple[float, dict[str, _Counts]]] = field(
        default_factory=lambda: deque(maxlen=MAX_SNAPSHOTS)
    )
    # When the window was made, with every count at zero: the oldest base there is, so a first
    # look, or one after a quiet spell, shows the traffic since the start instead of an empty window.
    _origin: float = field(init=False)

    def __post_init__(self) -> None:
        self._origin = self.clock()

    def traffic(self) -> dict[str, ModelTraffic]:
        now = self.clock()
        current = self._read()
        while self._snapshots and now - self._snapshots[0][0] > HISTORY_S:
            self._snapshots.popleft()
        # The newest snapshot at least WINDOW_S old, else the oldest there is: the origin.
        base_time: float = self._origin
        base: dict[str, _Counts] = {}
        for taken, counts in self._snapshots:  # oldest first
            if now - taken < WINDOW_S:
                break
            base_time, base = taken, counts
        self._snapshots.append((now, current))
        window = now - base_time
        return {model: _difference(counts, base.get(model), window) for model, counts in current.items()}

    def _read(self) -> dict[str, _Counts]:
        requests: dict[str, int] = {}
        errors: dict[str, int] = {}
        buckets: dict[str, dict[float, float]] = {}
        for family in self.metrics.collect():
            for sample in family.samples:
                model = sample.labels.get("model")
                if model is None:
                    continue
                if sample.name == "modelyard_requests_total":
                    requests[model] = requests.get(model, 0) + int(sample.value)
                    if sample.labels.get("code") not in _SUCCESS_CODES:
                        errors[model] = errors.get(model, 0) + int(sample.value)
                elif sample.name == "modelyard_request_duration_seconds_bucket":
                    bound = float(sample.labels["le"])
                    per_model = buckets.setdefault(model, {})
                    per_model[bound] = per_model.get(bound, 0.0) + sample.value
        return {
            model: _Counts(
                requests.get(model, 0),
                errors.get(model, 0),
                tuple(buckets.get(model, {}).get(bound, 0.0) for bound in _BOUNDS),
            )
            for model in set(requests) | set(buckets)
        }


_BOUNDS = (*LATENCY_BUCKETS, float("inf"))
# The code label of an answered request: its HTTP status over REST, its gRPC code over gRPC.
_SUCCESS_CODES = frozenset({"200", "OK"})


def _difference(now: _Counts, before: _Counts | None, window: float) -> ModelTraffic:
    before = before or _Counts(0, 0, (0.0,) * len(_BOUNDS))
    requests = now.requests - before.requests
    errors = now.errors - before.errors
    buckets = [a - b for a, b in zip(now.buckets, before.buckets, strict=True)]
    return ModelTraffic(
        window_s=round(window, 3),
        requests=requests,
        req_per_s=requests / window if window > 0 else 0.0,
        error_rate=errors / requests if requests else 0.0,
        p50_ms=histogram_quantile(0.50, buckets),
        p99_ms=histogram_quantile(0.99, buckets),
    )


def histogram_quantile(q: float, cumulative: list[float]) -> float | None:
    """Prometheus' estimate: linear within the bucket the quantile falls in; milliseconds, None
    without observations. Past the last finite bound it answers that bound."""
    total = cumulative[-1]
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in zip(_BOUNDS, cumulative, strict=True):
        if count >= rank:
            if bound == float("inf"):
                return lower_bound * 1000.0
            share = (rank - lower_count) / (count - lower_count) if count > lower_count else 1.0
            return (lower_bound + (bound - lower_bound) * share) * 1000.0
        lower_bound, lower_count = bound, count
    return lower_bound * 1000.0


@dataclass(frozen=True, slots=True)
class VersionStatus:
    version: int
    state: str
    reason: str
    backend: str
    backend_ready: bool
    # The state of the circuit breaker of the endpoint it calls ("closed", "open", "half_open");
    # None for in-process backends, which have none.
    breaker: str | None
    # The process that computes its answers: the gateway's own for in-process backends, a managed
    # server's; None for a remote backend, whose memory the gateway cannot see, and for a reader
    # without the admin action.
    pid: int | None
    inflight: int
    # Memory it holds now, as measured at its load: 0 while not resident, None where it was never
    # measured (not loaded yet, or a remote backend's).
    resident_bytes: int | None
    loads: int
    evictions: int
    # Its response cache, where the model has one: answers kept, their bytes, hits and misses.
    cache: CacheStatus | None = None


@dataclass(frozen=True, slots=True)
class CacheStatus:
    entries: int
    bytes: int
    hits: int
    misses: int


@dataclass(frozen=True, slots=True)
class MemoryStatus:
    """The memory budget and what the resident versions hold of it."""

    load_mode: str
    budget_bytes: int | None
    resident_bytes: int
    # What unloads did not give back: it counts against the budget.
    retained_bytes: int
    # What backends' runtimes kept of their first load: the gateway's base, not the budget's.
    runtime_bytes: int
    loads: int
    evictions: int


@dataclass(frozen=True, slots=True)
class ModelStatus:
    name: str
    state: str
    reason: str
    backend: str | None
    twin_of: str | None
    # The version a request naming none gets when no traffic split draws another.
    default_version: int | None
    labels: dict[str, int]
    traffic_weights: dict[str, float]
    # Other deployments answering a share of its requests, in percent, and its shadow targets.
    split: dict[str, float]
    shadow: list[dict[str, Any]]
    versions: list[VersionStatus]
    traffic: ModelTraffic | None


@dataclass(frozen=True, slots=True)
class ProcessStatus:
    """One process that serves models, with its resident memory (its children's included)."""

    name: str
    pid: int
    rss_bytes: int | None
    serves: list[str]


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """One serving process: the gateway itself, or one of `--workers N`."""

    index: int
    pid: int
    up_s: float
    restarts: int
    ready: bool
    rss_bytes: int | None


@dataclass(frozen=True, slots=True)
class IndexRow:
    name: str
    version: str
    state: str
    reason: str


@dataclass(frozen=True, slots=True)
class GatewayStatus:
    version: str
    uptime_s: float
    repository_api: bool
    grpc_server: str  # "grpcio" or "native" (settings.grpc_server)
    models: list[ModelStatus]
    processes: list[ProcessStatus]
    index: list[IndexRow]
    memory: MemoryStatus
    # The serving processes (1 without --workers); each one, and the supervisor's pid (None:
    # none), only for a reader with the admin action.
    worker_count: int
    workers: list[WorkerStatus]
    supervisor_pid: int | None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class StatusReader:
    def __init__(
        self,
        dataplane: DataPlane,
        metrics: Metrics,
        repository_api: bool = False,
        worker_table: Path | None = None,
        grpc_server: str = "grpcio",
    ) -> None:
        """`worker_table`: the supervisor's table of workers, where this is one of `--workers N`."""
        self.dataplane = dataplane
        self.repository_api = repository_api
        self.window = MetricsWindow(metrics)
        self._started = time.monotonic()
        self._started_at = time.time()
        self._worker_table = worker_table
        self.grpc_server = grpc_server

    async def read(self, access: Access = FULL_ACCESS) -> GatewayStatus:
        """The status as `access` may see it: its models only, and the processes (pids, memory)
        only with the admin action."""
        traffic = self.window.traffic()
        models: list[ModelStatus] = []
        served_by: dict[int, list[str]] = {os.getpid(): []}
        for model in sorted(self.dataplane.registry.models(), key=lambda m: m.name):
            if not access.sees(model.name):
                continue
            config = model.entry.config
            versions = []
            for loaded in sorted(model.versions.values(), key=lambda v: v.version):
                version = await _version(loaded, access.admin)
                versions.append(version)
                if version.pid is not None:
                    served_by.setdefault(version.pid, []).append(f"{model.name}:{loaded.version}")
            models.append(
                ModelStatus(
                    name=model.name,
                    state=model.state.value,
                    reason=without_server_paths(model.reason),
                    backend=model.entry.backend,
                    twin_of=config.twin_of,
                    default_version=preferred_version(config, model.servable_versions),
                    labels=dict(config.labels),
                    traffic_weights={str(v): w for v, w in config.traffic.items()},
                    split=dict(config.split),
                    shadow=[target.model_dump() for target in config.shadow],
                    versions=versions,
                    traffic=traffic.get(model.name),
                )
            )
        index = [
            IndexRow(e.name, e.version, e.state, e.reason)
            for e in await self.dataplane.repository_index(visible=access.sees)
        ]
        registry = self.dataplane.registry
        residency = registry.residency
        table = self._table()
        memory = MemoryStatus(
            registry.load_mode,
            residency.budget,
            residency.resident_bytes,
            residency.retained_bytes,
            residency.runtime_bytes,
            registry.loads,
            residency.evictions,
        )
        return GatewayStatus(
            version=gateway.__version__,
            uptime_s=round(time.monotonic() - self._started, 1),
            repository_api=self.repository_api,
            grpc_server=self.grpc_server,
            models=models,
            processes=[_process(pid, serves) for pid, serves in served_by.items()] if access.admin else [],
            index=index,
            memory=memory,
            worker_count=len(table.workers),
            workers=_workers(table) if access.admin else [],
            supervisor_pid=(table.supervisor_pid or None) if access.admin else None,
        )

    def _table(self) -> WorkerTable:
        table = None if self._worker_table is None else WorkerTable.read(self._worker_table)
        if table is not None:
            return table
        return WorkerTable(0, [WorkerRecord(0, os.getpid(), self._started_at, 0, True)])


def _workers(table: WorkerTable) -> list[WorkerStatus]:
    now = time.time()
    return [
        WorkerStatus(
            index=row.index,
            pid=row.pid,
            up_s=round(max(0.0, now - row.started_at), 1),
            restarts=row.restarts,
            ready=row.ready,
            rss_bytes=_rss_of(row.pid),
        )
        for row in table.workers
    ]


async def _version(loaded: LoadedVersion, admin: bool) -> VersionStatus:
    adapter = loaded.adapter
    backend_ready = adapter is not None and loaded.ready and await adapter.ready()
    guard = adapter.breaker() if adapter is not None else None
    return VersionStatus(
        version=loaded.version,
        state=loaded.state.value,
        reason=without_server_paths(loaded.reason),
        backend=loaded.backend,
        backend_ready=backend_ready,
        breaker=None if guard is None else guard.state.value,
        pid=adapter.process_id() if adapter is not None and admin else None,
        inflight=loaded.inflight,
        resident_bytes=_resident(loaded),
        loads=loaded.loads,
        evictions=loaded.evictions,
        cache=None
        if (cache := loaded.cache) is None
        else CacheStatus(len(cache), cache.bytes, cache.hits, cache.misses),
    )


def _resident(loaded: LoadedVersion) -> int | None:
    if loaded.footprint is None:
        return None
    return loaded.footprint.resident if loaded.adapter is not None else 0


def _process(pid: int, serves: list[str]) -> ProcessStatus:
    own = pid == os.getpid()
    try:
        process = psutil.Process(pid)
        # A backend server's workers are its children. The gateway's children are those servers,
        # which have rows of their own.
        family = [process] if own else [process, *process.children(recursive=True)]
        name = "gateway" if own else f"{process.name()} + {len(family) - 1} child processes"
        return ProcessStatus(name, pid, sum(_rss(member) for member in family), serves)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ProcessStatus("(gone)", pid, None, serves)


def _rss_of(pid: int) -> int | None:
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _rss(process: psutil.Process) -> int:
    try:
        return int(process.memory_info().rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0
