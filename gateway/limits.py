"""Per-model admission control: a cap on requests running at once and a bounded queue behind it."""

from __future__ import annotations

import asyncio
import time
from collections import deque

from gateway.errors import DeadlineExceeded, Overloaded


class Limiter:
    """A FIFO semaphore that refuses at once when its queue is full, and gives up at a deadline."""

    def __init__(self, max_inflight: int, max_queue: int, label: str) -> None:
        self.max_inflight = max_inflight
        self.max_queue = max_queue
        self.label = label
        self.inflight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self, deadline: float | None) -> None:
        if self.inflight < self.max_inflight and not self._waiters:
            self.inflight += 1
            return
        if len(self._waiters) >= self.max_queue:
            raise Overloaded(
                f"{self.label} is at its limit: {self.inflight} running, {len(self._waiters)} queued "
                f"(max_inflight {self.max_inflight}, max_queue {self.max_queue})"
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot arrived just as we gave up: pass it on
            else:
                waiter.cancel()
                self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise DeadlineExceeded(
                    f"{self.label}: the deadline passed while the request was queued"
                ) from None
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the next waiter; inflight stays
                return
        self.inflight -= 1
