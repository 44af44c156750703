"""What became of each inference request, in the metrics and the log: one count per request with
the status it got, and a structured line for each one the gateway refused or gave up on.

The `code` label is the answer's HTTP status over REST and its gRPC code name over gRPC. A model
name the repository does not know is counted under "", so clients cannot mint series.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import grpc

from gateway.context import RequestContext
from gateway.errors import (
    BackendUnavailable,
    DeadlineExceeded,
    Draining,
    GatewayError,
    ModelNotReady,
    Overloaded,
    status_for,
)
from gateway.metrics import Metrics
from gateway.registry import Registry
from gateway.types import InferRequest

log = logging.getLogger("modelyard.dataplane")

# Front doors whose answers carry a gRPC status; the others answer with an HTTP status.
GRPC_PROTOCOLS = frozenset({"grpc", "tfserving_grpc"})


@dataclass(slots=True)
class Served:
    """Which model version answered a request, or last tried to ("" until routing chose one)."""

    model: str
    version: str = ""
    backend: str = ""


def code_of(error: GatewayError | None, context: RequestContext) -> str:
    """The code label of an answer: its HTTP status, or over gRPC its status code's name."""
    http, code = (200, grpc.StatusCode.OK) if error is None else status_for(error)
    return code.name if context.protocol in GRPC_PROTOCOLS else str(http)


class Outcomes:
    def __init__(self, registry: Registry, metrics: Metrics) -> None:
        self.registry = registry
        self.metrics = metrics

    def answered(self, served: Served, context: RequestContext, started: int) -> None:
        self._count(served, context, code_of(None, context), started)

    def counted(self, served: Served, context: RequestContext, error: GatewayError, started: int) -> None:
        self._count(served, context, code_of(error, context), started)

    def failed(self, served: Served, context: RequestContext, started: int) -> None:
        """An error that is not the gateway's own: a 500 / INTERNAL."""
        self._count(served, context, "INTERNAL" if context.protocol in GRPC_PROTOCOLS else "500", started)

    def refused(
        self,
        request: InferRequest,
        served: Served,
        context: RequestContext,
        error: GatewayError,
        started: int,
    ) -> None:
        """Counted with its code; and where the gateway refused it or gave up, its metric and log line."""
        self._count(served, context, code_of(error, context), started)
        if isinstance(error, Overloaded):
            event, reason, level = "rejected", f"{error.limit}_limit", logging.INFO
        elif isinstance(error, Draining):
            event, reason, level = "rejected", "draining", logging.INFO
        elif isinstance(error, ModelNotReady | BackendUnavailable):
            event, reason, level = "rejected", "unavailable", logging.WARNING
        elif isinstance(error, DeadlineExceeded):
            event, reason, level = "timeout", error.stage, logging.WARNING
        else:
            return  # the request's own fault (bad input) or a backend error: its code says it
        counter = self.metrics.timeouts if event == "timeout" else self.metrics.rejections
        counter.labels(self._model(served), reason).inc()
        log.log(
            level,
            "event=%s reason=%s request_id=%s model=%s version=%s protocol=%s detail=%r",
            event,
            reason,
            context.request_id,
            request.model_name[:128],
            (request.model_version or "")[:64],
            context.protocol,
            error.logged,
        )

    def _model(self, served: Served) -> str:
        return served.model if served.version or self.registry.knows(served.model) else ""

    def _count(self, served: Served, context: RequestContext, code: str, started: int) -> None:
        series = self.metrics.series(self._model(served), served.version, served.backend, context.protocol)
        series.count(code)
        if not served.version:  # refused before routing: its time is in no version's histogram
            series.duration.observe((time.perf_counter_ns() - started) / 1e9)
