"""The gateway's errors and the one table that maps them to HTTP statuses and gRPC codes.

Every layer raises a `GatewayError` subclass. The REST exception handler and the gRPC interceptor
both read `ERROR_TABLE`, so the two protocols cannot disagree about a status.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Self

import grpc


class GatewayError(Exception):
    """Base of every error the gateway reports to a client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        # The id of the request that failed, set by the data plane, returned to the client.
        self.request_id: str | None = None
        # What only the server's log reads: where a remote backend is, its transport's own words.
        self.server_detail = ""

    def located(self, detail: str) -> Self:
        """This error, with `detail` for the server's log and never for the client."""
        self.server_detail = detail
        return self

    @property
    def logged(self) -> str:
        """The error as the server's log writes it: the client's message and the server's detail."""
        return f"{self.message} ({self.server_detail})" if self.server_detail else self.message

    def __str__(self) -> str:
        return self.message


class ModelNotFound(GatewayError):
    """No such model, version or label in the repository."""


class InvalidInput(GatewayError):
    """The request is well formed but does not fit the model: a wrong name, shape or datatype."""


class MalformedRequest(GatewayError):
    """The request cannot be decoded: bad JSON, truncated binary data, a missing field."""


class ModelNotReady(GatewayError):
    """The model or version exists but is not loaded, or failed to load."""


class NoRoom(ModelNotReady):
    """A load found no room in the memory budget: the versions that hold it have requests running."""


class BackendUnavailable(GatewayError):
    """The backend that serves the model cannot be reached."""


class ConnectionRefused(BackendUnavailable):
    """The backend refused the connection: nothing was sent, so trying again is safe."""


class Draining(GatewayError):
    """The gateway is shutting down: it finishes what it accepted and takes nothing new."""


class Overloaded(GatewayError):
    """Over the model's concurrency or queue limit."""

    def __init__(self, message: str, retry_after_s: int = 1, limit: str = "model") -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        # Which limit refused it: "model" (the model's own) or "global" (the gateway's).
        self.limit = limit


class DeadlineExceeded(GatewayError):
    """The request's deadline passed before an answer was ready."""

    def __init__(self, message: str, stage: str = "backend") -> None:
        super().__init__(message)
        # Where it was when the deadline passed: "queue" (admission), "batch_queue" or "backend".
        self.stage = stage


class SharedMemoryError(GatewayError):
    """A shared-memory region cannot be registered or used: a bad key, a place outside the region,
    a region not registered, an output larger than its place."""


class RegionExists(SharedMemoryError):
    """A shared-memory region of that name is already registered."""


class RegionNotFound(SharedMemoryError):
    """No shared-memory region of that name is registered: on status, or named by a tensor."""


class BackendError(GatewayError):
    """The backend failed while running a request that the gateway had accepted."""


class Unsupported(GatewayError):
    """The request asks for something this gateway does not implement."""


class PayloadTooLarge(GatewayError):
    """The request is over a configured size: its body, a tensor's element count, a string's length."""


class Unauthenticated(GatewayError):
    """Auth is on and the request carries no API key, or one the gateway does not know."""


class PermissionDenied(GatewayError):
    """The request's key is valid but not for this model or action, or the action is switched off."""


class HeadersTooLarge(GatewayError):
    """A request's header block is over its size or count limit; refused before it is read whole."""


class HeaderTimeout(GatewayError):
    """A connection did not send a whole header block in time."""


class ConnectionsExhausted(GatewayError):
    """The gateway holds as many connections as it may; a new one is answered and closed."""


class NoSuchEndpoint(GatewayError):
    """No route of any protocol has this path."""


class MethodNotAllowed(GatewayError):
    """The path exists, but not for this HTTP method."""


ERROR_TABLE: dict[type[GatewayError], tuple[int, grpc.StatusCode]] = {
    ModelNotFound: (404, grpc.StatusCode.NOT_FOUND),
    InvalidInput: (400, grpc.StatusCode.INVALID_ARGUMENT),
    MalformedRequest: (400, grpc.StatusCode.INVALID_ARGUMENT),
    ModelNotReady: (503, grpc.StatusCode.UNAVAILABLE),
    BackendUnavailable: (503, grpc.StatusCode.UNAVAILABLE),
    Draining: (503, grpc.StatusCode.UNAVAILABLE),
    Overloaded: (429, grpc.StatusCode.RESOURCE_EXHAUSTED),
    DeadlineExceeded: (504, grpc.StatusCode.DEADLINE_EXCEEDED),
    Unsupported: (501, grpc.StatusCode.UNIMPLEMENTED),
    # gRPC itself answers RESOURCE_EXHAUSTED for a message over its size limit: the same code here.
    PayloadTooLarge: (413, grpc.StatusCode.RESOURCE_EXHAUSTED),
    Unauthenticated: (401, grpc.StatusCode.UNAUTHENTICATED),
    PermissionDenied: (403, grpc.StatusCode.PERMISSION_DENIED),
    HeadersTooLarge: (431, grpc.StatusCode.RESOURCE_EXHAUSTED),
    HeaderTimeout: (408, grpc.StatusCode.DEADLINE_EXCEEDED),
    ConnectionsExhausted: (503, grpc.StatusCode.UNAVAILABLE),
    NoSuchEndpoint: (404, grpc.StatusCode.UNIMPLEMENTED),
    MethodNotAllowed: (405, grpc.StatusCode.UNIMPLEMENTED),
    SharedMemoryError: (400, grpc.StatusCode.INVALID_ARGUMENT),
    RegionExists: (409, grpc.StatusCode.ALREADY_EXISTS),
    # Triton's own code for it (NOT_FOUND, 404 over its HTTP), and the gateway's for whatever it lacks.
    RegionNotFound: (404, grpc.StatusCode.NOT_FOUND),
    BackendError: (500, grpc.StatusCode.INTERNAL),
    GatewayError: (500, grpc.StatusCode.INTERNAL),
}


# A remote backend's answer (TF Serving, TorchServe, a v2 server) read back into the gateway's errors,
# the same way for every remote adapter; codes not listed are BackendError. What the remote says of
# its own copy of a model becomes this deployment's condition:
# - its "not found" is about a model this gateway has loaded (or is loading), so the deployment is
#   not ready: ModelNotReady, 503 / UNAVAILABLE, which a client may retry and a fallback may answer.
#   404 / NOT_FOUND stays for what the gateway itself does not have.
# - its UNAVAILABLE (and a proxy's 502, a worker out of memory's 507) is the backend being down.
# - its refusal of the gateway's own credentials (401, 403) is the gateway's fault: BackendError.
REMOTE_GRPC_ERRORS: dict[grpc.StatusCode, type[GatewayError]] = {
    grpc.StatusCode.NOT_FOUND: ModelNotReady,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.UNAVAILABLE: BackendUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNIMPLEMENTED: Unsupported,
}
REMOTE_HTTP_ERRORS: dict[int, type[GatewayError]] = {
    400: InvalidInput,
    404: ModelNotReady,
    413: PayloadTooLarge,
    422: InvalidInput,
    429: Overloaded,
    501: Unsupported,
    502: BackendUnavailable,
    503: BackendUnavailable,
    504: DeadlineExceeded,
    507: BackendUnavailable,
}


def remote_grpc_error(code: grpc.StatusCode) -> type[GatewayError]:
    """The gateway error for a remote backend's gRPC status code."""
    return REMOTE_GRPC_ERRORS.get(code, BackendError)


# Codes a remote's gRPC stack (not the remote model) writes: its details name addresses and
# transport state, which are for the server's log.
_TRANSPORT_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN}
)


def remote_grpc_failure(where: str, address: str, code: grpc.StatusCode, details: str | None) -> GatewayError:
    """The gateway error for a remote's failed gRPC call: the remote model's own words reach the
    client; the transport's, and the remote's address, only the server's log."""
    error = remote_grpc_error(code)
    if code in _TRANSPORT_CODES:
        return error(f"{where}: {code.name}").located(f"{address}: {details}")
    return error(f"{where}: {code.name}: {details}").located(address)


def remote_http_error(status: int) -> type[GatewayError]:
    """The gateway error for a remote backend's HTTP status."""
    return REMOTE_HTTP_ERRORS.get(status, BackendError)


def status_for(error: GatewayError) -> tuple[int, grpc.StatusCode]:
    """The (HTTP status, gRPC code) of an error: the entry of its nearest class in the table."""
    for klass in type(error).__mro__:
        if klass in ERROR_TABLE:
            return ERROR_TABLE[klass]
    raise AssertionError("GatewayError is always in the table")


def retry_after(error: GatewayError) -> int | None:
    """Seconds a client should wait before retrying, for errors that have such a hint."""
    return error.retry_after_s if isinstance(error, Overloaded) else None


# What a client reads of an error is at most this long: a message that quotes a client's input, or a
# backend's own text, must not come back megabytes long.
MAX_PUBLIC_MESSAGE = 2048


def _server_path_pattern() -> re.Pattern[str]:
    """Absolute paths under the folders a server's own files live in: the system's, the Python
    environment's, the working directory's, home and the temporary folder."""
    roots = {
        "/tmp",
        "/home",
        "/root",
        "/usr",
        "/opt",
        "/var",
        "/etc",
        "/srv",
        "/mnt",
        "/models",
        "/work",
        "/data",
        "/app",
    }
    for folder in (os.getcwd(), sys.prefix, sys.base_prefix, tempfile.gettempdir(), str(Path.home())):
        if folder not in ("", "/"):
            roots.add(folder.rstrip("/"))
    alternatives = "|".join(re.escape(root) for root in sorted(roots, key=len, reverse=True))
    return re.compile(rf"(?<![\w.:/])(?:{alternatives})(?:/[\w.@+-]+)+/?")


_SERVER_PATH = _server_path_pattern()


def without_server_paths(text: str) -> str:
    """`text` with each absolute server path cut to its last part (`.../1/model.onnx` -> `model.onnx`):
    the model and version a message names say where; the folders say nothing a client may know."""
    if "/" not in text:
        return text
    return _SERVER_PATH.sub(lambda match: match.group(0).rstrip("/").rsplit("/", 1)[-1], text)


def public_message(error: GatewayError) -> str:
    """What a client reads of an error: no server paths, and never more than MAX_PUBLIC_MESSAGE."""
    text = without_server_paths(str(error))
    if len(text) > MAX_PUBLIC_MESSAGE:
        text = f"{text[:MAX_PUBLIC_MESSAGE]}... ({len(text) - MAX_PUBLIC_MESSAGE} more characters)"
    return text
