"""An HTTP answer leaves the gateway in one socket write: uvicorn writes an answer's head and its
body separately, which cost a second system call and a second wake-up of the client on every
answer. Real uvicorn, the gateway's own protocol class, real sockets; the only addition is a
counter on the socket's transport, under the gateway's own wrapper."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn

from gateway.protocols.connections import ConnectionGuard, ConnectionLimits
from gateway.protocols.writes import FLUSH_BYTES

SMALL = b'{"outputs": []}'
LARGE = b"x" * (4 * FLUSH_BYTES)


class WriteCounter:
    """The socket's transport, with each write it is asked for counted."""

    def __init__(self, transport: asyncio.Transport, writes: list[int]) -> None:
        self._transport = transport
        self._writes = writes

    def write(self, data: bytes) -> None:
        self._writes.append(len(data))
        self._transport.write(data)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = LARGE if scope["path"] == "/large" else SMALL
    if scope["type"] != "http":
        return
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]}
    )
    await send({"type": "http.response.body", "body": body})


async def serve_and_ask(paths: list[str], keep_alive: bool = True) -> tuple[list[bytes], list[list[int]]]:
    """Each path asked once on one connection; the answers as read, and each connection's writes."""
    writes: list[list[int]] = []

    class Counted(ConnectionGuard(ConnectionLimits()).protocol_class()):  # type: ignore[misc]
        def connection_made(self, transport: asyncio.Transport) -> None:
            writes.append([])
            super().connection_made(WriteCounter(transport, writes[-1]))

    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, lifespan="off", loop="none", http=Counted, log_level="warning"
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    answers = []
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for index, path in enumerate(paths):
            last = index == len(paths) - 1
            close = b"" if keep_alive or not last else b"Connection: close\r\n"
            writer.write(b"GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (path.encode(), close))
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(
                next(
                    line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
                ).split(b":")[1]
            )
            answers.append(await reader.readexactly(length))
        if not keep_alive:
            assert await reader.read() == b""  # closed, after the whole answer
        writer.close()
    finally:
        server.should_exit = True
        await serving
    return answers, writes


def test_a_small_answer_leaves_in_one_write() -> None:
    answers, writes = asyncio.run(serve_and_ask(["/a", "/b", "/c"]))
    assert answers == [SMALL] * 3
    assert len(writes[0]) == 3, writes  # one per answer, head and body together


def test_a_large_body_is_written_as_it_comes_and_arrives_whole() -> None:
    answers, writes = asyncio.run(serve_and_ask(["/large", "/a"]))
    assert answers == [LARGE, SMALL]
    assert LARGE.__len__() in writes[0], writes  # the big body went out by itself, not copied in


def test_an_answer_that_closes_its_connection_is_written_before_the_close() -> None:
    answers, writes = asyncio.run(serve_and_ask(["/a", "/b"], keep_alive=False))
    assert answers == [SMALL, SMALL]
    assert len(writes[0]) == 2, writes
