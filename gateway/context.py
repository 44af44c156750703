"""The request context: what every front door reads the same way from a request's transport, built
by one function that all four front doors (v2 and TF Serving, REST and gRPC) call.

The data plane receives these parsed fields, never raw headers: the request id, the client's
deadline, the priority, the routing keys (header or metadata values that a model's label,
canary and sticky-split rules may read), and the caller's W3C trace context.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import MalformedRequest
from gateway.limits import Priority

REQUEST_ID_HEADER = "x-request-id"
# A REST client's timeout in milliseconds; gRPC clients set their own deadline instead.
TIMEOUT_HEADER = "x-timeout-ms"
_MAX_ID_LENGTH = 128
# The id of the request being served, for log lines written below the data plane (retries,
# breaker changes); None outside a request, and in batches, which serve several.
current_request_id: ContextVar[str | None] = ContextVar("current_request_id", default=None)
_PRIORITY_NAMES = {"high": Priority.HIGH, "normal": Priority.NORMAL, "low": Priority.LOW}
# Credentials never travel with the routing keys: nothing below the front door needs them.
_NOT_ROUTING = frozenset({"authorization", "x-api-key", "cookie"})
_NO_KEYS: Mapping[str, str] = {}
TRACEPARENT_HEADER = "traceparent"
# W3C Trace Context: version-traceid-parentid-flags, lower-case hex; version ff is invalid.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")


@dataclass(frozen=True, slots=True)
class TraceParent:
    """The caller's span, from a W3C `traceparent` header (REST) or metadata entry (gRPC)."""

    trace_id: int
    span_id: int
    flags: int
    # The caller's `tracestate`, passed on as it came; "" when it sent none.
    state: str = ""


def trace_parent(value: str | None, state: str | None = None) -> TraceParent | None:
    """The parsed `traceparent`, or None when there is none or it is not valid (the W3C rule:
    an invalid one is ignored, and the request starts a trace of its own)."""
    if not value:
        return None
    match = _TRACEPARENT.fullmatch(value.strip())
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or not int(trace_id, 16) or not int(span_id, 16):
        return None
    return TraceParent(int(trace_id, 16), int(span_id, 16), int(flags, 16), state or "")


@dataclass(slots=True)
class RequestContext:
    """One request's transport facts, parsed once at its front door, and not changed after.

    Not a frozen dataclass: its __init__ would set each field through object.__setattr__, which
    cost 0.45 µs a request."""

    request_id: str
    # The front door: rest or grpc (v2), tfserving_rest or tfserving_grpc, or shadow (a copy the
    # gateway sends itself). It is the `protocol` label of the request metrics.
    protocol: str
    # Absolute time.monotonic() by which the client wants its answer (the soonest of the gRPC
    # deadline, X-Timeout-Ms and Triton's `timeout` parameter); None: the client set none.
    deadline: float | None = None
    priority: Priority = Priority.NORMAL
    # Header (or gRPC metadata) names in lower case and their values, for routing rules.
    routing_keys: Mapping[str, str] = field(default_factory=dict)
    # The label a request's `label` parameter names (the label header is the model's to name).
    label: str | None = None
    trace_parent: TraceParent | None = None

    def deadline_within(self, timeout_ms: int | None) -> float | None:
        """The soonest of the client's deadline and a model's `limits.timeout_ms`, which caps what
        a client may ask for."""
        if timeout_ms is None:
            return self.deadline
        own = time.monotonic() + timeout_ms / 1000
        return own if self.deadline is None else min(own, self.deadline)


def request_id(header: str | None, body_id: str | None = None) -> str:
    """The client's id (the X-Request-ID header, else the v2 `id`) when it is a short printable
    string, else a new random one."""
    for given in (header, body_id):
        if given and len(given) <= _MAX_ID_LENGTH and given.isprintable():
            return given
    # Not os.urandom: that is a system call per request, and an id need not be secret. The module's
    # generator is seeded from the OS, and again in a forked child.
    return f"{random.getrandbits(64):016x}"


def client_deadline(headers: Mapping[str, str], parameters: Mapping[str, Any]) -> float | None:
    """The absolute time.monotonic() deadline a client asks for: the X-Timeout-Ms header, or
    Triton's `timeout` request parameter (microseconds, as tritonclient's `timeout=` sends it)."""
    timeouts: list[float] = []
    header = headers.get(TIMEOUT_HEADER)
    if header is not None:
        try:
            timeouts.append(float(header) / 1000)
        except ValueError:
            raise MalformedRequest(
                f"{TIMEOUT_HEADER} must be a number of milliseconds, not {header[:64]!r}"
            ) from None
    parameter = parameters.get("timeout")
    if parameter is not None:
        if not isinstance(parameter, int) or isinstance(parameter, bool):
            raise MalformedRequest("the 'timeout' parameter must be an integer number of microseconds")
        timeouts.append(parameter / 1e6)
    if not timeouts:
        return None
    timeout = min(timeouts)
    if timeout <= 0:
        raise MalformedRequest(f"a timeout must be positive, not {timeout * 1000:g} ms")
    return time.monotonic() + timeout


def priority(headers: Mapping[str, str], header_name: str, parameters: Mapping[str, Any]) -> Priority:
    """`high`, `normal` or `low` from the priority header; else Triton's `priority` parameter
    (1 is high, 0 and 2 normal, 3 and above low); else normal."""
    value = headers.get(header_name)
    if value is not None:
        try:
            return _PRIORITY_NAMES[value.strip().lower()]
        except KeyError:
            raise MalformedRequest(f"{header_name} must be high, normal or low, not {value[:64]!r}") from None
    level = parameters.get("priority")
    if level is None:
        return Priority.NORMAL
    if not isinstance(level, int) or isinstance(level, bool) or level < 0:
        raise MalformedRequest("the 'priority' parameter must be a non-negative integer")
    if level == 1:
        return Priority.HIGH
    return Priority.LOW if level >= 3 else Priority.NORMAL


# The longest timeout gRPC's wire can carry (`grpc-timeout: 99999999H`); a server that has no
# deadline to report may report more (pygrpc-native: sys.maxsize seconds), which is none.
GRPC_MAX_TIMEOUT_S = 99_999_999 * 3600


def deadline_after(seconds: float | None) -> float | None:
    """A transport's time remaining (gRPC's) as an absolute time.monotonic() deadline."""
    if seconds is None or seconds > GRPC_MAX_TIMEOUT_S:
        return None
    return time.monotonic() + seconds


class ContextBuilder:
    """Builds every request's context; the front doors share one, made by the composition root."""

    def __init__(self, priority_header: str = "x-priority") -> None:
        self.priority_header = priority_header.lower()

    def build(
        self,
        protocol: str,
        headers: Mapping[str, str],
        parameters: Mapping[str, Any] | None = None,
        *,
        transport_deadline: float | None = None,
        body_id: str | None = None,
    ) -> RequestContext:
        """The context of a request from its headers (REST) or metadata (gRPC), lower-case names,
        the request-level parameters its body carries, and the deadline its transport set."""
        parameters = parameters or _NO_KEYS
        rid = request_id(headers.get(REQUEST_ID_HEADER), body_id)
        if not headers and not parameters:
            return RequestContext(rid, protocol, transport_deadline)
        asked = client_deadline(headers, parameters)
        deadline = transport_deadline if asked is None else min(asked, transport_deadline or asked)
        label = parameters.get("label")
        return RequestContext(
            request_id=rid,
            protocol=protocol,
            deadline=deadline,
            priority=priority(headers, self.priority_header, parameters),
            routing_keys={k: v for k, v in headers.items() if k not in _NOT_ROUTING},
            label=None if label is None or label == "" else str(label),
            trace_parent=trace_parent(headers.get(TRACEPARENT_HEADER), headers.get("tracestate")),
        )

    @staticmethod
    def grpc_metadata(metadata: Any) -> dict[str, str]:
        """gRPC invocation metadata as a mapping of its text entries (binary `-bin` ones are left out)."""
        return {key: value for key, value in metadata or () if isinstance(value, str)}
