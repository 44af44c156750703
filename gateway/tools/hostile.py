"""Hostile clients and a memory probe, for the benchmarks and the reliability tests: connections
that trickle or flood a header block, and the peak RSS of a process while something runs.

Nothing on the serving path imports this; it drives a gateway from outside, over loopback.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time

import psutil

MIB = 2**20
BIG_HEADER_BYTES = 8 * MIB


class PeakRss(threading.Thread):
    """Samples a process' RSS every few milliseconds until stopped; keeps the highest."""

    def __init__(self, pid: int, interval_s: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.interval_s = interval_s
        # The RSS when it was made: what the peak grew from.
        self.before = self.process.memory_info().rss
        self.peak = self.before
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self.halt.wait(self.interval_s)

    def __enter__(self) -> PeakRss:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.halt.set()
        self.join()


class HostileConnections:
    """`slowloris` connections that trickle a header byte every `trickle_s` and `big_headers`
    connections that each send an 8 MB header that never ends, all driven by one thread with
    non-blocking sockets; `outcome()` says what the gateway did with them."""

    def __init__(self, port: int, slowloris: int, big_headers: int, trickle_s: float = 3.0) -> None:
        self.port = port
        self.counts = (slowloris, big_headers)
        self.trickle_s = trickle_s
        self.slow: list[socket.socket] = []
        self.big: dict[socket.socket, int] = {}
        self.halt = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HostileConnections:
        slowloris, big = self.counts
        for _ in range(slowloris):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            sock.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\n")
            self.slow.append(sock)
        for _ in range(big):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nX-Big: ")
            sock.setblocking(False)
            self.big[sock] = 0
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.halt.set()
        self.thread.join(30)
        for sock in [*self.slow, *self.big]:
            sock.close()

    def _run(self) -> None:
        chunk = b"a" * 65536
        trickled = time.monotonic()
        while not self.halt.is_set():
            sending = [sock for sock, sent in self.big.items() if 0 <= sent < BIG_HEADER_BYTES]
            if sending:
                _, writable, _ = select.select([], sending, [], 0.05)
                for sock in writable:
                    try:
                        self.big[sock] += sock.send(chunk)
                    except OSError:
                        self.big[sock] = -1  # the gateway closed it
            else:
                self.halt.wait(0.05)
            if time.monotonic() - trickled >= self.trickle_s:
                trickled = time.monotonic()
                for sock in self.slow:
                    with contextlib.suppress(OSError):
                        sock.send(b"a")

    def outcome(self) -> dict[str, int]:
        """How many slowloris connections the gateway still holds, and how many big headers it
        answered 431. Call it once, after the gateway had time to act."""
        held = 0
        for sock in self.slow:
            sock.setblocking(False)
            try:
                while sock.recv(65536):
                    pass
            except BlockingIOError:
                held += 1
            except OSError:
                continue
        answered = 0
        for sock in self.big:
            sock.setblocking(True)
            sock.settimeout(5)
            answer = b""
            with contextlib.suppress(OSError):
                while chunk := sock.recv(65536):
                    answer += chunk
            answered += answer.startswith(b"HTTP/1.1 431")
        return {"slowloris still held": held, "big headers answered 431": answered}
