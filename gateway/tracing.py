"""OpenTelemetry tracing: one server span per inference request, with child spans for the phases
the data plane sees (the limiter queue, the batch wait, the backend call), exported over OTLP.

Off unless OTEL_TRACES_EXPORTER names an exporter; then the composition root builds a `Tracer`
and the data plane starts a `RequestTrace` for each request. Off, the data plane holds None and
makes no tracer call at all, and this module imports nothing from OpenTelemetry.

A request's span continues the caller's trace when its front door read a valid W3C `traceparent`
(gateway/context.py). A backend call made in the request's own task carries the backend call
span on as `traceparent` (`trace_headers`): the remote adapters send it, so a trace crosses the
gateway. A batched call serves several requests and carries none.

Span times come from the perf_counter_ns() stamps the data plane already takes, mapped onto the
wall clock once per request, so the phases are marked where they were measured.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import gateway
from gateway.context import TRACEPARENT_HEADER, RequestContext, TraceParent

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

    from gateway.settings import Settings

# The trace of the request whose task this is, while its backend call runs; None otherwise
# (tracing off, outside a request, and in a batcher's task).
current_trace: ContextVar[RequestTrace | None] = ContextVar("current_trace", default=None)

# The span name of each front door's inference method.
SPAN_NAMES = {
    "rest": "POST /v2/models/{model_name}/infer",
    "grpc": "inference.GRPCInferenceService/ModelInfer",
    "tfserving_rest": "POST /v1/models/{model_name}:predict",
    "tfserving_grpc": "tensorflow.serving.PredictionService/Predict",
}
_NO_HEADERS: Mapping[str, str] = {}


def trace_headers() -> Mapping[str, str]:
    """The headers (gRPC: metadata) a backend call sends on: the backend call span as
    `traceparent`, or nothing when no traced request is making the call."""
    trace = current_trace.get()
    return _NO_HEADERS if trace is None else trace.outgoing


def trace_metadata() -> tuple[tuple[str, str], ...] | None:
    """`trace_headers` as gRPC call metadata; None (no metadata) when there is nothing to send."""
    trace = current_trace.get()
    return None if trace is None or not trace.outgoing else tuple(trace.outgoing.items())


def format_traceparent(trace_id: int, span_id: int, flags: int) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"


class Tracer:
    """The gateway's tracer: one per process, built by the composition root, shut down (flushing
    what is still queued for export) when the gateway stops."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("modelyard", gateway.__version__)

    @classmethod
    def from_settings(cls, settings: Settings) -> Tracer | None:
        """The tracer the OTEL_* variables ask for; None when they ask for none (the default).
        Raises ValueError for an exporter or protocol the gateway cannot use."""
        names = [n.strip() for n in settings.otel_traces_exporter.split(",") if n.strip()]
        names = [n for n in names if n != "none"]
        if settings.otel_sdk_disabled or not names:
            return None
        try:
            from opentelemetry.sdk.resources import SERVICE_NAME, Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
        except ImportError as exc:
            raise ValueError(
                f"OTEL_TRACES_EXPORTER={settings.otel_traces_exporter} needs the OpenTelemetry SDK: "
                f"{exc} (pip install 'modelyard[otel]')"
            ) from None
        exporters: list[SpanExporter] = []
        for name in names:
            if name == "otlp":
                protocol = settings.otel_exporter_otlp_protocol
                if protocol != "http/protobuf":
                    raise ValueError(
                        f"OTLP over {protocol} is not supported: the gateway exports over http/protobuf"
                    )
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

                exporters.append(OTLPSpanExporter())
            elif name == "console":
                from opentelemetry.sdk.trace.export import ConsoleSpanExporter

                exporters.append(ConsoleSpanExporter())
            else:
                raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (otlp, console or none)")
        # The sampler follows OTEL_TRACES_SAMPLER, the batch processors OTEL_BSP_*, the exporter
        # OTEL_EXPORTER_OTLP_*: the SDK reads them itself.
        provider = TracerProvider(resource=Resource.create({SERVICE_NAME: settings.otel_service_name}))
        for exporter in exporters:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider)

    def start(self, context: RequestContext, started_ns: int) -> RequestTrace:
        return RequestTrace(self._tracer, context, started_ns)

    def shutdown(self) -> None:
        self.provider.shutdown()


class RequestTrace:
    """One request's spans. Times are time.perf_counter_ns() stamps."""

    __slots__ = ("_context", "_offset", "_open", "_open_context", "_span", "_tracer", "outgoing")

    def __init__(self, tracer: Any, context: RequestContext, started_ns: int) -> None:
        from opentelemetry import trace

        self._tracer = tracer
        self._offset = time.time_ns() - time.perf_counter_ns()
        name = SPAN_NAMES.get(context.protocol, f"{context.protocol} infer")
        self._span: Span = tracer.start_span(
            name,
            context=_parent(context.trace_parent),
            kind=trace.SpanKind.SERVER,
            start_time=started_ns + self._offset,
            attributes={"modelyard.protocol": context.protocol, "modelyard.request_id": context.request_id},
        )
        self._context: Context = trace.set_span_in_context(self._span)
        self._open: Span | None = None
        self._open_context: Context | None = None
        self.outgoing: Mapping[str, str] = _NO_HEADERS

    def phase(
        self, name: str, start_ns: int, end_ns: int, attributes: Mapping[str, str | int] | None = None
    ) -> None:
        """A phase that has ended, under the open backend call if there is one, else the request."""
        span = self._tracer.start_span(
            name, context=self._open_context or self._context, start_time=start_ns + self._offset
        )
        if attributes:
            span.set_attributes(attributes)
        span.end(end_time=end_ns + self._offset)

    def begin_backend_call(self, backend: str, start_ns: int) -> None:
        """Opens the backend call span, which the call's `traceparent` names as the parent."""
        from opentelemetry import trace

        span = self._tracer.start_span(
            "backend_call",
            context=self._context,
            start_time=start_ns + self._offset,
            attributes={"modelyard.backend": backend},
        )
        self._open, self._open_context = span, trace.set_span_in_context(span)
        ids = span.get_span_context()
        headers = {TRACEPARENT_HEADER: format_traceparent(ids.trace_id, ids.span_id, ids.trace_flags)}
        state = ids.trace_state.to_header()
        if state:
            headers["tracestate"] = state
        self.outgoing = headers

    def end_backend_call(self, end_ns: int, failed: bool) -> None:
        if self._open is None:
            return
        if failed:
            from opentelemetry.trace import Status, StatusCode

            self._open.set_status(Status(StatusCode.ERROR))
        self._open.end(end_time=end_ns + self._offset)
        self._open = self._open_context = None
        self.outgoing = _NO_HEADERS

    def finish(
        self, model: str, version: str, backend: str, status: str, error: BaseException | None
    ) -> None:
        """Ends the request's span with what served it and the status it got (an HTTP status, or
        a gRPC code name, as the request metrics' `code` label)."""
        self.end_backend_call(time.perf_counter_ns(), failed=True)
        span = self._span
        span.set_attributes(
            {
                "modelyard.model": model,
                "modelyard.model_version": version,
                "modelyard.backend": backend,
                "modelyard.status": status,
            }
        )
        if error is not None:
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"[:256]))
        span.end()


def _parent(parent: TraceParent | None) -> Context | None:
    if parent is None:
        return None
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

    state = TraceState.from_header([parent.state]) if parent.state else None
    remote = SpanContext(
        parent.trace_id,
        parent.span_id,
        is_remote=True,
        trace_flags=TraceFlags(parent.flags),
        trace_state=state,
    )
    return trace.set_span_in_context(NonRecordingSpan(remote))
