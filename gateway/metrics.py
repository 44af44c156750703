"""Prometheus metrics, defined once and injected; each gateway owns its own registry.

Under `--workers N` each worker writes its values to files in a folder the supervisor owns
(prometheus-client's multiprocess mode), and whichever worker answers a scrape reads them all:
counters and histograms are summed over every worker that ever ran, gauges are merged as each
one's `multiprocess_mode` says, over the live workers.

The per-request series are looked up once per (model, version, backend, protocol) and kept, and
hold their observations until they are added in bulk (gateway/request_series.py). Gauges of what
is running and queued now are read from the limiters when Prometheus scrapes, so a request pays
nothing to keep them.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

import gateway
from gateway.auth import FULL_ACCESS, Access
from gateway.request_series import Flusher, RequestSeries
from gateway.workers import WorkerMetricFiles

# Counters carry no `_created` series: they double every counter's cardinality for a timestamp
# no dashboard reads.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

LABELS = ("model", "version", "backend", "protocol")
# From 100 µs to 10 s: in-process ONNX calls sit at the low end, remote backends higher up.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

# A request's phases (gateway.timing) reach down to the tens of microseconds a decode takes.
PHASE_BUCKETS = (0.00001, 0.000025, 0.00005, *LATENCY_BUCKETS)

# Model loads: from a few milliseconds (a small ONNX graph) to minutes (a managed TorchServe's first).
LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
VERSION_LABELS = ("model", "version", "backend")


# (model, requests running now, requests queued now) for every loaded model, read at scrape time.
LoadProbe = Callable[[], Iterable[tuple[str, int, int]]]
# (requests accepted and not yet answered, requests queued) across the whole gateway.
GatewayLoadProbe = Callable[[], tuple[int, int]]


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(
        self, registry: CollectorRegistry | None = None, multiprocess_dir: Path | None = None
    ) -> None:
        """`multiprocess_dir`: the folder every worker's values go to, under `--workers N`; the
        process must have been started with PROMETHEUS_MULTIPROC_DIR naming it."""
        self.registry = registry or CollectorRegistry()
        # Adds the per-request series' held observations (see the module's docstring).
        self.flusher = Flusher()
        self._series: dict[tuple[str, str, str, str], RequestSeries] = {}
        self._multiprocess = multiprocess_dir is not None
        # What a scrape reads: this registry, or every worker's files.
        self._exposed = self.registry
        if multiprocess_dir is None:
            # The gateway's own process (CPU, memory, open files): one worker's would mislead.
            ProcessCollector(registry=self.registry)
        else:
            self._exposed = CollectorRegistry()
            WorkerMetricFiles(self._exposed, path=str(multiprocess_dir))
        PlatformCollector(registry=self._exposed)
        self._load_gauges: _LoadGauges | None = None
        self.build_info = Gauge(
            "modelyard_build_info",
            "Always 1; the labels say which modelyard and Python serve.",
            ("version", "python"),
            registry=self.registry,
            multiprocess_mode="max",
        )
        self.build_info.labels(gateway.__version__, platform.python_version()).set(1)
        self.requests = Counter(
            "modelyard_requests", "Inference requests by outcome.", (*LABELS, "code"), registry=self.registry
        )
        self.request_duration = Histogram(
            "modelyard_request_duration_seconds",
            "Time from the request's arrival at the data plane to its answer.",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_duration = Histogram(
            "modelyard_queue_duration_seconds",
            "Time a request waited for an in-flight slot.",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.compute_duration = Histogram(
            "modelyard_compute_duration_seconds",
            "Time the backend spent on a request.",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.phase_duration = Histogram(
            "modelyard_request_phase_seconds",
            "Time answered requests spent in each phase (the phases of their Server-Timing): decode, "
            "load, queue, batch, backend, encode.",
            (*LABELS, "phase"),
            buckets=PHASE_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "modelyard_batch_size",
            "Rows in each batch that dynamic batching ran.",
            ("model", "version", "backend"),
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.batch_queue_duration = Histogram(
            "modelyard_batch_queue_duration_seconds",
            "Time the first request of each batch waited for the batch to fill.",
            ("model", "version", "backend"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "modelyard_fallbacks",
            "Requests answered by a fallback deployment because the model's own was not ready.",
            ("model", "to"),
            registry=self.registry,
        )
        self.shadow_requests = Counter(
            "modelyard_shadow_requests",
            "Copies of live requests sent to a shadow target, by outcome: match, mismatch, error, dropped.",
            ("model", "target", "outcome"),
            registry=self.registry,
        )
        self.shadow_abs_diff = Histogram(
            "modelyard_shadow_max_abs_diff",
            "The largest absolute difference between the primary's and the shadow's outputs, per request.",
            ("model", "target"),
            buckets=(0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0),
            registry=self.registry,
        )
        self.shadow_worst_abs_diff = Gauge(
            "modelyard_shadow_worst_abs_diff",
            "The largest absolute difference between the primary's and the shadow's outputs seen "
            "since the gateway started.",
            ("model", "target"),
            registry=self.registry,
            multiprocess_mode="max",
        )
        self.split_requests = Counter(
            "modelyard_split_requests",
            "Requests a model's split drew for another deployment, by outcome: sent, or unavailable "
            "(that deployment could not take it, and the model answered it itself).",
            ("model", "to", "outcome"),
            registry=self.registry,
        )
        self.recorded_requests = Counter(
            "modelyard_recorded_requests",
            "Requests drawn for recording, by outcome: kept (their inputs written), full (a cap was "
            "reached), busy (too many writes under way), error (the file could not be written).",
            ("model", "outcome"),
            registry=self.registry,
        )
        # Payload logging (gateway/payload_log.py).
        self.payloads_logged = Counter(
            "modelyard_payload_log_events",
            "Payload log events written, by type (request, response) and sink (http, file).",
            ("model", "type", "sink"),
            registry=self.registry,
        )
        self.payloads_dropped = Counter(
            "modelyard_payload_log_dropped",
            "Payload log events lost, by reason: queue_full (the queue was full), sink_error (the HTTP "
            "sink failed or was too slow), file_error (the file could not be written).",
            ("model", "reason"),
            registry=self.registry,
        )
        self.model_ready = Gauge(
            "modelyard_model_ready",
            "1 when the version is ready to serve (under --workers: on every live worker).",
            ("model", "version", "backend"),
            registry=self.registry,
            multiprocess_mode="livemin",
        )

        # Loads on demand and the memory budget.
        self.model_loads = Counter(
            "modelyard_model_loads",
            "Version loads, by trigger (load: at start, by the repository API or polling; request: on "
            "demand) and outcome (ok, failed, no_room).",
            (*VERSION_LABELS, "trigger", "outcome"),
            registry=self.registry,
        )
        self.model_load_duration = Histogram(
            "modelyard_model_load_duration_seconds",
            "Time a version took to load, warmup included, until it turned ready.",
            VERSION_LABELS,
            buckets=LOAD_BUCKETS,
            registry=self.registry,
        )
        self.evictions = Counter(
            "modelyard_model_evictions",
            "Versions unloaded to make room in the memory budget.",
            VERSION_LABELS,
            registry=self.registry,
        )
        self.resident_bytes = Gauge(
            "modelyard_model_resident_bytes",
            "Memory a version holds, as measured at its load (0 while it is not resident); "
            "under --workers, summed over the live workers.",
            VERSION_LABELS,
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.memory_budget = Gauge(
            "modelyard_model_memory_budget_bytes",
            "The memory budget the resident versions share (absent: no budget); under --workers, "
            "each worker's.",
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.cache_lookups = Counter(
            "modelyard_response_cache_lookups",
            "Lookups in a version's response cache (models with `cache:` in config.yaml), by outcome.",
            ("model", "version", "outcome"),
            registry=self.registry,
        )
        self.load_waits = Counter(
            "modelyard_load_waits",
            "Requests that waited for their version to load (its first, or its first since an unload).",
            ("model",),
            registry=self.registry,
        )

        # Faults: each also has a structured log line with the request id.
        self.rejections = Counter(
            "modelyard_rejected_requests",
            "Requests refused without an answer, by reason: model_limit, global_limit (429), "
            "draining, unavailable (503).",
            ("model", "reason"),
            registry=self.registry,
        )
        self.connections_closed = Counter(
            "modelyard_connections_closed",
            "Client connections the gateway shut for a limit, by front door and reason. http: cap "
            "(answered 503), headers_too_large (431), header_timeout (408, or closed where nothing came), "
            "malformed (400). grpc, on the native server, whose limits the gateway keeps: cap, "
            "handshake, idle. grpcio keeps the gRPC limits in its core and does not report them.",
            ("protocol", "reason"),
            registry=self.registry,
        )
        self.timeouts = Counter(
            "modelyard_deadline_exceeded",
            "Requests whose deadline passed, by stage: load, queue, batch_queue, backend.",
            ("model", "stage"),
            registry=self.registry,
        )
        self.backend_retries = Counter(
            "modelyard_backend_retries",
            "Calls to a backend tried again after it refused the connection.",
            ("backend", "endpoint"),
            registry=self.registry,
        )
        self.breaker_transitions = Counter(
            "modelyard_breaker_transitions",
            "Changes of a backend endpoint's circuit breaker, by the state entered.",
            ("backend", "endpoint", "state"),
            registry=self.registry,
        )
        self.breaker_state = Gauge(
            "modelyard_breaker_state",
            "A backend endpoint's circuit breaker: 0 closed, 1 half open, 2 open; under --workers, "
            "the most open of the live workers'.",
            ("backend", "endpoint"),
            registry=self.registry,
            multiprocess_mode="livemax",
        )

    def series(self, model: str, version: str, backend: str, protocol: str) -> RequestSeries:
        key = (model, version, backend, protocol)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = RequestSeries(self, key)
        return series

    def prepare(self, model: str, version: str, backend: str) -> None:
        """Makes a version's per-request series for the v2 front doors now, at its warmup, rather
        than at its first request: making them costs that request 0.3 - 0.4 ms. They read 0 until
        requests come."""
        for protocol, ok in (("rest", "200"), ("grpc", "OK")):
            series = self.series(model, version, backend, protocol)
            series.count_child(ok)
            for phase in ("decode", "queue", "backend", "encode"):
                series.phase(phase)

    def forget_resident(self, model: str, version: str, backend: str) -> None:
        """A version no longer resident: its series goes, or under `--workers`, where a series
        cannot be removed from the files, reads 0."""
        if self._multiprocess:
            self.resident_bytes.labels(model, version, backend).set(0)
            return
        with contextlib.suppress(KeyError):
            self.resident_bytes.remove(model, version, backend)

    def watch_load(self, per_model: LoadProbe, gateway_wide: GatewayLoadProbe) -> None:
        """Serve the in-flight and queued gauges, per model and for the whole gateway (the signals
        to autoscale a replica on; Prometheus adds the pod label), read at each scrape. Under
        `--workers` a scrape cannot read the other workers' limiters: each worker writes its
        figures to its gauges at every `refresh_load` (its server calls it on a timer)."""
        if self._multiprocess:
            self._load_gauges = _LoadGauges(self.registry, per_model, gateway_wide)
        else:
            self.registry.register(_LoadCollector(per_model, gateway_wide))

    def flush(self) -> None:
        """This process's held per-request observations and its load gauges, written now: before a
        scrape, and as a worker stops."""
        self.flusher.flush()
        self.refresh_load()

    def refresh_load(self) -> None:
        """Under `--workers`, write this worker's in-flight and queued figures for the others to read."""
        if self._load_gauges is not None:
            self._load_gauges.refresh()

    def collect(self) -> Iterable[Metric]:
        """Every family a scrape shows: this process's, or under `--workers` the whole gateway's."""
        self.flush()
        return self._exposed.collect()

    def render(self, access: Access = FULL_ACCESS) -> bytes:
        """The exposition as `access` may see it: the series of its models only, and the rest (the
        process, the platform, gateway-wide gauges, backend endpoints) only with the admin action."""
        self.flush()
        if access.everything:
            return generate_latest(self._exposed)
        return generate_latest(_Scoped(self._exposed, access))


class _Scoped:
    """A registry's families, with only the samples one reader may see."""

    def __init__(self, registry: CollectorRegistry, access: Access) -> None:
        self._registry = registry
        self._access = access

    def collect(self) -> Iterator[Metric]:
        access = self._access
        for family in self._registry.collect():
            samples = [
                sample
                for sample in family.samples
                if ("model" in sample.labels and access.sees(sample.labels["model"]))
                or ("model" not in sample.labels and access.admin)
            ]
            if samples:
                scoped = Metric(family.name, family.documentation, family.type, family.unit)
                scoped.samples = samples
                yield scoped


class _LoadGauges:
    """The same gauges as _LoadCollector, as multiprocess gauges summed over the live workers."""

    def __init__(
        self, registry: CollectorRegistry, per_model: LoadProbe, gateway_wide: GatewayLoadProbe
    ) -> None:
        self._per_model = per_model
        self._gateway_wide = gateway_wide
        self._models: set[str] = set()
        self.inflight = Gauge(
            "modelyard_inflight_requests",
            "Requests running on the backend now.",
            ("model",),
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.queued = Gauge(
            "modelyard_queued_requests",
            "Requests waiting for a slot now.",
            ("model",),
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.gateway_inflight = Gauge(
            "modelyard_gateway_inflight_requests",
            "Inference requests this gateway has accepted and not yet answered, queued or running.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.gateway_queued = Gauge(
            "modelyard_gateway_queued_requests",
            "Inference requests waiting for a slot now, across all models and the global limit.",
            registry=registry,
            multiprocess_mode="livesum",
        )

    def refresh(self) -> None:
        seen: set[str] = set()
        for model, running, waiting in self._per_model():
            seen.add(model)
            self.inflight.labels(model).set(running)
            self.queued.labels(model).set(waiting)
        # A model this worker no longer serves adds nothing (its file keeps the last values).
        for model in self._models - seen:
            self.inflight.labels(model).set(0)
            self.queued.labels(model).set(0)
        self._models |= seen
        accepted, waiting = self._gateway_wide()
        self.gateway_inflight.set(accepted)
        self.gateway_queued.set(waiting)


class _LoadCollector(Collector):
    """The in-flight and queued gauges, per model as the limiters hold them, and gateway-wide."""

    def __init__(self, per_model: LoadProbe, gateway_wide: GatewayLoadProbe) -> None:
        self._per_model = per_model
        self._gateway_wide = gateway_wide

    def collect(self) -> Iterator[Metric]:
        inflight = GaugeMetricFamily(
            "modelyard_inflight_requests", "Requests running on the backend now.", labels=("model",)
        )
        queued = GaugeMetricFamily(
            "modelyard_queued_requests", "Requests waiting for a slot now.", labels=("model",)
        )
        for model, running, waiting in self._per_model():
            inflight.add_metric((model,), running)
            queued.add_metric((model,), waiting)
        accepted, waiting = self._gateway_wide()
        yield inflight
        yield queued
        yield GaugeMetricFamily(
            "modelyard_gateway_inflight_requests",
            "Inference requests this gateway has accepted and not yet answered, queued or running.",
            value=accepted,
        )
        yield GaugeMetricFamily(
            "modelyard_gateway_queued_requests",
            "Inference requests waiting for a slot now, across all models and the global limit.",
            value=waiting,
        )
