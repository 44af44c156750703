"""HTTP connections held to bounds before any request reaches the application, and drained on
shutdown without losing a request.

uvicorn's httptools protocol has no cap on a header block and no timeout for one (its keep-alive
timer is reset by every byte, so a client trickling a header holds its connection forever), and
its `limit_concurrency` answers 503 only once a header block is complete. `GuardedHttpToolsProtocol`
adds, per connection and before the ASGI app runs:
- a cap on open connections: one past it is answered 503 at once and closed;
- a cap on the header block's size (431 as soon as it is passed, so an unfinished header holds
  at most the cap plus one read) and on its count of headers (431 once the block is read);
- a header timeout: a connection that has not sent a whole header block this long after it
  opened, or after a request's first byte, is closed (408 if it had begun one);
- draining: once `ConnectionGuard.begin_drain` is called every answer says `Connection: close`,
  and each connection closes once its answer is sent.
Responses it writes itself go through the error table, in the REST body shape.
"""

from __future__ import annotations

import asyncio
import http
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.errors import (
    ConnectionsExhausted,
    GatewayError,
    HeadersTooLarge,
    HeaderTimeout,
    public_message,
    status_for,
)
from gateway.protocols.writes import CoalescingTransport

if TYPE_CHECKING:
    from gateway.settings import Settings

# A refused connection is read (and what it sends dropped) this long after its answer, or until
# this much has been dropped, before it is closed: so the client reads the answer rather than a
# reset, and a client that keeps sending costs little.
LINGER_S = 1.0
LINGER_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_connections: int = 1000
    max_header_bytes: int = 64 << 10
    max_headers: int = 256
    header_timeout_s: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            max_connections=settings.http_max_connections,
            max_header_bytes=int(settings.http_max_header_kb * 1024),
            max_headers=settings.http_max_headers,
            header_timeout_s=settings.http_header_timeout_s,
        )


class ConnectionGuard:
    """The limits every connection is held to, and the drain they all follow."""

    def __init__(self, limits: ConnectionLimits, on_close: Callable[[str], None] | None = None) -> None:
        self.limits = limits
        # Told the reason each time a limit shuts a connection (the connections-closed metric).
        self.on_close = on_close or _ignore
        self.draining = False
        self._connections: set[Any] | None = None

    def protocol_class(self) -> type[GuardedHttpToolsProtocol]:
        """The protocol class to give uvicorn (`Config(http=...)`), bound to this guard."""
        return type("GatewayHttpProtocol", (GuardedHttpToolsProtocol,), {"guard": self})

    def watch(self, connections: set[Any]) -> None:
        self._connections = connections

    @property
    def open_connections(self) -> int:
        return len(self._connections or ())

    def begin_drain(self) -> None:
        """From now on every answer closes its connection; the answers under way too."""
        self.draining = True
        for connection in list(self._connections or ()):
            connection.stop_keeping_alive()


def _ignore(reason: str) -> None:
    pass


def _answer(error: GatewayError) -> bytes:
    status, _ = status_for(error)
    body = orjson.dumps({"error": public_message(error)})
    head = (
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


class _Refused(Exception):
    """Stops the parser once the guard has answered."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    guard: ConnectionGuard

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        limits = self.guard.limits
        self._refused = False
        self._dropped = 0
        self._reading_head = True
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        # When the header block under way began (the connection itself, for the first); None
        # between requests, where the keep-alive timeout holds instead.
        self._head_started: float | None = None
        over = len(self.connections) >= limits.max_connections
        # Each answer's head and body leave in one write (gateway/protocols/writes.py).
        super().connection_made(CoalescingTransport(transport, self.loop))
        self.guard.watch(self.connections)
        if over:
            self._refuse(
                ConnectionsExhausted(
                    f"the gateway holds {limits.max_connections} connections, its limit "
                    "(MODELYARD_HTTP_MAX_CONNECTIONS); retry shortly"
                ),
                "cap",
            )
            return
        self._head_started = self.loop.time()
        self._arm_head_timer(limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            self._dropped += len(data)
            if self._dropped > LINGER_BYTES:
                self.transport.close()
            return
        self._unset_keepalive_if_required()
        if self._reading_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            if not self._refused:
                message = "Invalid HTTP request received."
                self.logger.warning(message)
                self.guard.on_close("malformed")
                self.send_400_response(message)
            return
        if self._reading_head and self._head_bytes > self.guard.limits.max_header_bytes:
            self._refuse(self._too_large(), "headers_too_large")

    def _too_large(self) -> HeadersTooLarge:
        limits = self.guard.limits
        return HeadersTooLarge(
            f"the request's header block is over {limits.max_header_bytes} bytes or {limits.max_headers} "
            "headers (MODELYARD_HTTP_MAX_HEADER_KB, MODELYARD_HTTP_MAX_HEADERS)"
        )

    # Parser callbacks -------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # No timer per request: the one armed goes on checking the head that is under way.
        self._head_started = self.loop.time()
        if self._head_timer is None:
            self._arm_head_timer(self.guard.limits.header_timeout_s)

    def on_headers_complete(self) -> None:
        limits = self.guard.limits
        # A read that held more than the cap may have held a whole block over it: measure it.
        too_large = self._head_bytes > limits.max_header_bytes and limits.max_header_bytes < len(
            self.url
        ) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if too_large or len(self.headers) > limits.max_headers:
            self._refuse(self._too_large(), "headers_too_large")
            raise _Refused
        self._reading_head = False
        self._head_bytes = 0
        self._head_started = None
        super().on_headers_complete()
        if self.guard.draining and self.cycle is not None:
            self.cycle.keep_alive = False

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_head = True

    # The guard's own answers ------------------------------------------------------------------

    def stop_keeping_alive(self) -> None:
        """This connection closes once the answer under way (if any) is sent; each one queued
        behind it, pipelined, says `Connection: close` too."""
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
        for cycle, _ in self.pipeline:
            cycle.keep_alive = False

    def _refuse(self, error: GatewayError, reason: str) -> None:
        """Answers with `error` and closes, after a moment in which what the client still sends
        is read and dropped, so that it reads the answer rather than a reset. `reason` is what
        the connections-closed metric counts it under."""
        if self._refused:
            return
        self._refused = True
        self.guard.on_close(reason)
        self._cancel_head_timer()
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request's answer is still being written: close after it, say no more.
            self.cycle.keep_alive = False
            self.flow.pause_reading()
            return
        self.connections.discard(self)
        transport = self.transport
        if transport.is_closing():
            return
        transport.write(_answer(error))
        self.loop.call_later(LINGER_S, transport.close)

    def _arm_head_timer(self, delay: float) -> None:
        self._head_timer = self.loop.call_later(delay, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        started = self._head_started
        if started is None or self.transport.is_closing():
            return  # no header block under way: the next one arms the timer again
        timeout = self.guard.limits.header_timeout_s
        waited = self.loop.time() - started
        if waited < timeout:
            self._arm_head_timer(timeout - waited)
            return
        if self._head_bytes == 0 and self.cycle is None:
            self.guard.on_close("header_timeout")
            self.transport.close()  # opened and never sent a byte
            return
        self._refuse(
            HeaderTimeout(
                f"the request's header block did not arrive within {timeout:g} s (MODELYARD_HTTP_HEADER_TIMEOUT_S)"
            ),
            "header_timeout",
        )
