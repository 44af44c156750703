"""Where one request's time went, phase by phase, as the gateway measured it; written as a
`Server-Timing` value (REST header, gRPC trailing metadata) and observed into the phase histogram.

The phases, each measured where it happens:
- decode: the front door turning the request body into tensors (gRPC's own protobuf parse comes
  before it and is not in it);
- load: waiting for the version to load (on demand, or after an eviction), only when it did;
- queue: waiting for an in-flight slot (the model's limit, then the gateway's);
- batch: waiting in the dynamic batching queue for the batch to run, only for a batched request;
- backend: the backend computing it (for a batched request, its batch's run);
- encode: the front door writing the answer (gRPC's protobuf serialization comes after it).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.request_series import RequestSeries

# The phases as the histogram's `phase` label and Server-Timing's metric names, in request order.
PHASES = ("decode", "load", "queue", "batch", "backend", "encode")
# Each phase's attribute on RequestTiming, named once rather than formatted per request.
_FIELDS = {phase: f"{phase}_ns" for phase in PHASES}
SERVER_TIMING = "server-timing"
# A gRPC call whose metadata has this key set to one of _YES gets Server-Timing in its trailing
# metadata (REST answers always carry the header: a header costs a REST answer next to nothing).
TIMING_REQUEST = "x-server-timing"
_YES = frozenset({"1", "true", "yes", "on"})


def timing_asked(metadata: Mapping[str, str], always: bool) -> bool:
    """Whether a gRPC answer carries its Server-Timing: always, or where its call asks."""
    return always or metadata.get(TIMING_REQUEST, "").lower() in _YES


@dataclass(slots=True)
class RequestTiming:
    """Nanoseconds per phase; None for a phase the request did not go through."""

    decode_ns: int | None = None
    load_ns: int | None = None
    queue_ns: int | None = None
    batch_ns: int | None = None
    backend_ns: int | None = None
    encode_ns: int | None = None
    # From the start of decoding to the end of encoding, as the front door measured it.
    total_ns: int | None = None
    # The series of the version that answered, for the front door's own phases.
    series: RequestSeries | None = None

    def observe_backend(self) -> None:
        """The data plane's phases (load, queue, batch, backend) that the request went through,
        into the version's phase histogram."""
        series = self.series
        if series is None:
            return
        phase = series.phase
        if self.load_ns is not None:
            phase("load").observe(self.load_ns / 1e9)
        if self.queue_ns is not None:
            phase("queue").observe(self.queue_ns / 1e9)
        if self.batch_ns is not None:
            phase("batch").observe(self.batch_ns / 1e9)
        if self.backend_ns is not None:
            phase("backend").observe(self.backend_ns / 1e9)

    def transport(self, started_ns: int, decoded_ns: int, encoding_ns: int, ended_ns: int) -> None:
        """The front door's own phases, from its perf_counter_ns() readings: before decoding, after
        it, before encoding and after it; decode and encode go into the phase histogram."""
        self.decode_ns = decode = decoded_ns - started_ns
        self.encode_ns = encode = ended_ns - encoding_ns
        self.total_ns = ended_ns - started_ns
        series = self.series
        if series is not None:
            series.phase("decode").observe(decode / 1e9)
            series.phase("encode").observe(encode / 1e9)

    def header(self) -> str:
        """The Server-Timing value: each phase gone through, `dur` in milliseconds, then `total`,
        the gateway's time from the start of decoding to the end of encoding (the phases and the
        steps between them: routing, the input checks)."""
        parts = []
        for phase, field in _FIELDS.items():
            ns = getattr(self, field)
            if ns is not None:
                parts.append(f"{phase};dur={ns / 1e6:.3f}")
        if self.total_ns is not None:
            parts.append(f"total;dur={self.total_ns / 1e6:.3f}")
        return ", ".join(parts)


# The timing of the request being served, for the batching wrapper below the data plane to add its
# queue wait to; None outside a request (warmup, a shadow's own run still has its own).
current_timing: ContextVar[RequestTiming | None] = ContextVar("current_timing", default=None)
