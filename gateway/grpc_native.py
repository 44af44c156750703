"""The native gRPC server (`grpc_server: native`): pygrpc-native, whose HTTP/2 and gRPC work runs in
Rust threads outside the GIL, so the event loop spends its time on the gateway's own code. The
services, the guard and the generated code are the same as on grpcio's server.

It takes every option the gateway sets except three connection limits, which `ConnectionWatch`
keeps from the process's own sockets instead:
- the connection cap: the oldest `max_connections` connections on the port are kept, and a newer
  one is shut down; its first call is refused with the error table's ConnectionsExhausted;
- the handshake timeout: a connection that has not sent the HTTP/2 preface and its SETTINGS frame
  this long after it was seen is shut down;
- idle close: a connection on which nothing was sent or received this long is shut down.

The watch sees a connection within `interval_s` of its opening. Its "idle" is the socket's (a
client's keepalive pings count as activity), where grpcio's is "no call open".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from gateway.errors import ConnectionsExhausted

log = logging.getLogger("modelyard.grpc")

MISSING = "the native gRPC server needs pygrpc-native (a dependency of modelyard): pip install pygrpc-native"
# The options pygrpc-native refuses (the limits the watch keeps) or ignores.
WATCHED_OPTIONS = frozenset(
    {
        "grpc.max_allowed_incoming_connections",
        "grpc.server_handshake_timeout_ms",
        "grpc.max_connection_idle_ms",
    }
)
# The client's connection preface (24 bytes) and the header of the SETTINGS frame that must follow.
HANDSHAKE_BYTES = 24 + 9
# struct tcp_info (linux/tcp.h): ms since data was last sent and received, bytes received.
_LAST_DATA_SENT = struct.Struct("=I"), 44
_LAST_DATA_RECV = struct.Struct("=I"), 52
_BYTES_RECEIVED = struct.Struct("=Q"), 128
_TCP_INFO_SIZE = 136
IDLE_CHECK_S = 1.0


def native_server(options: Sequence[tuple[str, Any]]) -> grpc.aio.Server:
    """A pygrpc-native aio server with the gateway's options, less the watched ones.
    Raises ImportError (with MISSING) where pygrpc-native is not installed."""
    try:
        import pygrpc_native.aio
    except ImportError as exc:
        raise ImportError(MISSING) from exc
    kept = [(key, value) for key, value in options if key not in WATCHED_OPTIONS]
    server: grpc.aio.Server = pygrpc_native.aio.server(options=kept)
    return server


def peer_name(address: Any, family: int) -> str | None:
    """A socket's peer address as pygrpc-native writes it in `context.peer()`."""
    if family == socket.AF_INET:
        return f"ipv4:{address[0]}:{address[1]}"
    if family == socket.AF_INET6:  # an IPv4 client of a dual-stack listener too: [::ffff:a.b.c.d]
        return f"ipv6:[{address[0]}]:{address[1]}"
    return None


@dataclass(slots=True)
class _Connection:
    fd: int
    inode: str
    peer: str
    seen: float
    greeted: bool = False
    idle_checked: float = 0.0


class ConnectionWatch:
    """The gRPC connection limits the native server leaves to the gateway, kept by looking at the
    process's own sockets: each sweep lists them (/proc/self/fd), reads the TCP state of those
    accepted on the gRPC port, and shuts down the ones past a limit. Shutting a socket down ends
    its connection in the server, which then closes it; the watch never closes a descriptor the
    server owns."""

    def __init__(
        self,
        max_connections: int,
        handshake_timeout_s: float,
        idle_s: float,
        interval_s: float = 0.25,
        fd_dir: str = "/proc/self/fd",
        on_close: Callable[[str], None] | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.handshake_timeout_s = handshake_timeout_s
        self.idle_s = idle_s
        self.interval_s = interval_s
        self._fd_dir = fd_dir
        self.port: int | None = None
        self._held: dict[int, _Connection] = {}  # the port's connections, by descriptor
        self._others: dict[int, str] = {}  # every other socket's inode, so it is looked at once
        self._admitted: set[str] = set()
        self.closed: dict[str, int] = {"cap": 0, "handshake": 0, "idle": 0}
        # Told the reason of each connection shut (the connections-closed metric).
        self._on_close = on_close

    @property
    def open_connections(self) -> int:
        return len(self._held)

    def admit(self, peer: str) -> None:
        """Called by each guarded call before it runs: raises ConnectionsExhausted where the call's
        connection is one the cap shuts down. Cheap once a connection is admitted."""
        if peer in self._admitted:
            return
        if not peer.startswith(("ipv4:", "ipv6:")):
            return  # the fallback server's calls: their connection is the watch's already
        if len(self._admitted) < self.max_connections:
            self._admitted.add(peer)
            return
        self.sweep()
        if peer not in self._admitted:
            raise ConnectionsExhausted(
                f"the gateway holds its {self.max_connections} gRPC connections; try again later"
            )

    async def run(self) -> None:
        while True:
            try:
                self.sweep()
            except Exception:  # one failed look must not end the watch
                log.exception("watching the gRPC connections failed")
            await asyncio.sleep(self.interval_s)

    def sweep(self, now: float | None = None) -> None:
        if self.port is None:
            return
        now = time.monotonic() if now is None else now
        held: dict[int, _Connection] = {}
        others: dict[int, str] = {}
        for name in os.listdir(self._fd_dir):
            fd = int(name)
            try:
                inode = os.readlink(f"{self._fd_dir}/{name}")
            except OSError:
                continue  # closed since it was listed
            if not inode.startswith("socket:"):
                continue
            known = self._held.get(fd)
            if known is not None and known.inode == inode:
                held[fd] = known
            elif self._others.get(fd) == inode:
                others[fd] = inode
            else:
                found = self._accepted(fd, inode, now)
                if found is None:
                    others[fd] = inode
                else:
                    held[fd] = found
        self._others = others
        # The oldest are kept; within one sweep, a lower descriptor was opened first.
        ordered = sorted(held.values(), key=lambda c: (c.seen, c.fd))
        for connection in ordered[self.max_connections :]:
            self._shut(connection, "cap")
            del held[connection.fd]
        for connection in list(held.values()):
            reason = self._limit_passed(connection, now)
            if reason is not None:
                self._shut(connection, reason)
                del held[connection.fd]
        self._held = held
        self._admitted = {connection.peer for connection in held.values()}

    def _accepted(self, fd: int, inode: str, now: float) -> _Connection | None:
        """The connection on descriptor `fd`, if it is one accepted on the gRPC port."""
        try:
            with socket.socket(fileno=os.dup(fd)) as sock:
                if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
                    return None
                if sock.getsockname()[1] != self.port:
                    return None
                peer = peer_name(sock.getpeername(), sock.family)
        except OSError:
            return None  # closed, not a socket we can read, or the listener (no peer)
        return None if peer is None else _Connection(fd, inode, peer, now)

    def _limit_passed(self, connection: _Connection, now: float) -> str | None:
        checks_handshake = not connection.greeted and now - connection.seen >= self.handshake_timeout_s
        if not checks_handshake:
            # Idle time is read at most once a second per connection, and not before it could pass.
            if now - connection.seen < self.idle_s or now - connection.idle_checked < IDLE_CHECK_S:
                return None
            connection.idle_checked = now
        info = self._tcp_info(connection.fd)
        if info is None:
            return None
        if not connection.greeted:
            connection.greeted = _field(info, _BYTES_RECEIVED) >= HANDSHAKE_BYTES
            if checks_handshake and not connection.greeted:
                return "handshake"
        quiet_ms = min(_field(info, _LAST_DATA_SENT), _field(info, _LAST_DATA_RECV))
        if quiet_ms >= self.idle_s * 1000:
            return "idle"
        return None

    def _tcp_info(self, fd: int) -> bytes | None:
        try:
            with socket.socket(fileno=os.dup(fd)) as sock:
                return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
        except OSError:
            return None

    def _shut(self, connection: _Connection, reason: str) -> None:
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(connection.fd)) as sock:
            # The descriptor may have been closed and reused since the sweep listed it.
            if os.readlink(f"{self._fd_dir}/{connection.fd}") == connection.inode:
                sock.shutdown(socket.SHUT_RDWR)
                self.closed[reason] += 1
                if self._on_close is not None:
                    self._on_close(reason)
                log.info("event=grpc_connection_closed reason=%s peer=%s", reason, connection.peer)


def _field(info: bytes, field: tuple[struct.Struct, int]) -> int:
    layout, offset = field
    value: int = layout.unpack_from(info, offset)[0]
    return value
