"""A stand-in for a remote TorchServe that can be made to fail on purpose.

A real TorchServe cannot be told to hang, answer late or refuse connections on cue, so the fault
tests use this small HTTP/1.1 server instead (docs/operations/reliability.md says so). It speaks the part of
TorchServe's inference API the gateway uses: `GET /ping`, and `POST /predictions/<model>` with
modelyard's tensor format, answering y = 2 * x for every input x. Every other behaviour the
tests check (timeouts, breakers, retries, readiness) is the gateway's own, against a real socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from typing import Literal

from adapters.torchserve import modelyard_handler as wire

Mode = Literal["ok", "hang"]


class FailingTorchServe:
    """Runs in a thread of its own; `mode`, `delay_s` and `listening` change its behaviour live."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.mode: Mode = "ok"
        self.delay_s = 0.0
        self.predictions = 0  # prediction requests received
        self.abandoned = 0  # of those, how many the gateway gave up on before the answer
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self, coroutine: object) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)  # type: ignore[arg-type]

    def start_listening(self) -> None:
        self._run(self._start())

    def stop_listening(self) -> None:
        """Closes the port and every open connection: the next connect is refused."""
        self._run(self._stop())

    def close(self) -> None:
        self.stop_listening()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._connections):
            writer.transport.abort()
        self._connections.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                path = request_line.split(" ")[1]
                headers = dict(line.split(":", 1) for line in header_lines if ":" in line)
                length = int(next((v for k, v in headers.items() if k.lower() == "content-length"), "0"))
                body = await reader.readexactly(length)
                if path == "/ping":
                    self._answer(writer, 200, "application/json", json.dumps({"status": "Healthy"}).encode())
                elif path.startswith("/predictions/"):
                    self.predictions += 1
                    if not await self._wait_before_answering(reader):
                        self.abandoned += 1
                        return
                    _, inputs = wire.decode(body, "inputs")
                    outputs = {"y": inputs["x"] * 2}
                    self._answer(writer, 200, wire.CONTENT_TYPE, wire.encode_tensors("outputs", outputs))
                else:
                    self._answer(writer, 404, "application/json", b'{"message": "no such path"}')
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._connections.discard(writer)
            writer.close()

    async def _wait_before_answering(self, reader: asyncio.StreamReader) -> bool:
        """False when the client closes the connection first (it stopped waiting)."""
        timeout = None if self.mode == "hang" else self.delay_s
        if timeout == 0:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader.read(1), timeout)
            return False  # end of stream: the client hung up
        return True

    @staticmethod
    def _answer(writer: asyncio.StreamWriter, status: int, content_type: str, body: bytes) -> None:
        head = (
            f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode("latin-1") + body)
