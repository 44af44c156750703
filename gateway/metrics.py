"""Prometheus metrics, defined once and injected; each gateway owns its own registry."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

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


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
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
        self.inflight = Gauge(
            "modelyard_inflight_requests",
            "Requests running on the backend now.",
            ("model",),
            registry=self.registry,
        )
        self.queued = Gauge(
            "modelyard_queued_requests",
            "Requests waiting for a slot now.",
            ("model",),
            registry=self.registry,
        )
        # The signals to autoscale a replica on (Prometheus adds the pod label): what it carries
        # now across all models, read when scraped.
        self.gateway_inflight = Gauge(
            "modelyard_gateway_inflight_requests",
            "Inference requests this gateway has accepted and not yet answered, queued or running.",
            registry=self.registry,
        )
        self.gateway_queued = Gauge(
            "modelyard_gateway_queued_requests",
            "Inference requests waiting for a slot now, across all models and the global limit.",
            registry=self.registry,
        )
        self.model_ready = Gauge(
            "modelyard_model_ready",
            "1 when the version is ready to serve.",
            ("model", "version", "backend"),
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
        self.timeouts = Counter(
            "modelyard_deadline_exceeded",
            "Requests whose deadline passed, by stage: queue, batch_queue, backend.",
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
            "A backend endpoint's circuit breaker: 0 closed, 1 half open, 2 open.",
            ("backend", "endpoint"),
            registry=self.registry,
        )

    def watch_load(self, inflight: Callable[[], float], queued: Callable[[], float]) -> None:
        """Where the gateway-wide gauges read their values when scraped."""
        self.gateway_inflight.set_function(inflight)
        self.gateway_queued.set_function(queued)

    def render(self) -> bytes:
        return generate_latest(self.registry)
