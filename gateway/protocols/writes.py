"""One socket write per HTTP answer.

uvicorn writes an answer's status line and headers when the app sends `http.response.start`, and
its body when the app sends `http.response.body`: two `send` system calls, and two wake-ups of
the client, for every answer. Over loopback each costs about as much as the gateway's whole JSON
decode of a small request. `CoalescingTransport` stands between the protocol and the socket's
transport: what is written during one turn of the event loop goes out as one write at the end of
that turn (at once when it grows past `FLUSH_BYTES`, so a large body is never held or copied).
Closing, or handing the connection to another protocol, writes what is held first.
"""

from __future__ import annotations

import asyncio
from typing import Any

# Held bytes past this are written at once (a large body goes out without being copied).
FLUSH_BYTES = 64 * 1024


class CoalescingTransport(asyncio.Transport):
    __slots__ = ("_held", "_loop", "_size", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._held: list[bytes | bytearray | memoryview] = []
        self._size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._held:
            if len(data) >= FLUSH_BYTES:
                self._transport.write(data)
                return
            self._loop.call_soon(self.flush)
        self._held.append(data)
        self._size += len(data)
        if self._size >= FLUSH_BYTES:
            self.flush()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        """Writes what is held, in one call."""
        held = self._held
        if not held:
            return
        size = self._size
        self._held, self._size = [], 0
        if self._transport.is_closing():
            return
        if len(held) == 1:
            self._transport.write(held[0])
        elif size >= FLUSH_BYTES:
            self._transport.writelines(held)
        else:
            self._transport.write(b"".join(held))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._held, self._size = [], 0
        self._transport.abort()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.flush()
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)
