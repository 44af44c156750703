"""What every protocol reads the same way from a request's headers or parameters: its id, its
timeout and its priority. Small functions the protocol layers and the data plane call, cheap
enough for the hot path."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from contextvars import ContextVar
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


def request_id(header: str | None, body_id: str | None = None) -> str:
    """The client's id (the X-Request-ID header, else the v2 `id`) when it is a short printable
    string, else a new random one."""
    for given in (header, body_id):
        if given and len(given) <= _MAX_ID_LENGTH and given.isprintable():
            return given
    return os.urandom(8).hex()


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
                f"{TIMEOUT_HEADER} must be a number of milliseconds, not {header!r}"
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
            raise MalformedRequest(f"{header_name} must be high, normal or low, not {value!r}") from None
    level = parameters.get("priority")
    if level is None:
        return Priority.NORMAL
    if not isinstance(level, int) or isinstance(level, bool) or level < 0:
        raise MalformedRequest("the 'priority' parameter must be a non-negative integer")
    if level == 1:
        return Priority.HIGH
    return Priority.LOW if level >= 3 else Priority.NORMAL
