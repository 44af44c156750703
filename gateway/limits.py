"""Admission control: a cap on requests running at once and a bounded queue behind it, per model
and across all models, with priority levels."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from enum import IntEnum
from typing import Any

from gateway.errors import DeadlineExceeded, Overloaded


class Priority(IntEnum):
    """A request's priority, from the priority header; lower values are served first."""

    HIGH = 0
    NORMAL = 1
    LOW = 2


class Limiter:
    """A semaphore with a bounded queue that refuses at once when full and gives up at a deadline.

    Queued requests are served by priority, first come first served within one. Low-priority
    requests may fill only half the queue, so a burst of them cannot shut out the others.
    """

    def __init__(self, max_inflight: int, max_queue: int, label: str, scope: str = "model") -> None:
        self.max_inflight = max_inflight
        self.max_queue = max_queue
        self.label = label
        self.scope = scope
        self.inflight = 0
        self._waiters: tuple[deque[asyncio.Future[None]], ...] = tuple(deque() for _ in Priority)
        self._queued = 0

    @property
    def queued(self) -> int:
        return self._queued

    def _queue_limit(self, priority: Priority) -> int:
        return self.max_queue // 2 if priority is Priority.LOW else self.max_queue

    async def acquire(self, deadline: float | None, priority: Priority = Priority.NORMAL) -> None:
        if self.inflight < self.max_inflight and not self._queued:
            self.inflight += 1
            return
        if self._queued >= self._queue_limit(priority):
            raise Overloaded(
                f"{self.label} is at its limit: {self.inflight} running, {self._queued} queued "
                f"(max_inflight {self.max_inflight}, max_queue {self.max_queue}"
                + (", half of it for low priority)" if priority is Priority.LOW else ")"),
                limit=self.scope,
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._waiters[priority]
        queue.append(waiter)
        self._queued += 1
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot arrived just as we gave up: pass it on
            else:
                waiter.cancel()
                queue.remove(waiter)
                self._queued -= 1
            if isinstance(exc, TimeoutError):
                raise DeadlineExceeded(
                    f"{self.label}: the deadline passed while the request was queued", stage="queue"
                ) from None
            raise

    def release(self) -> None:
        for queue in self._waiters:
            while queue:
                waiter = queue.popleft()
                self._queued -= 1
                if not waiter.done():
                    waiter.set_result(None)  # the slot moves to the next waiter; inflight stays
                    return
        self.inflight -= 1


def take_free(limiters: tuple[Limiter, ...]) -> bool:
    """A slot of each limiter at once, where every one has a slot free and no one queued (what
    acquire_all would do without waiting, minus its coroutines); False, and none taken, else."""
    for limiter in limiters:
        if limiter.inflight >= limiter.max_inflight or limiter._queued:
            return False
    for limiter in limiters:
        limiter.inflight += 1
    return True


async def acquire_all(limiters: tuple[Limiter, ...], deadline: float | None, priority: Priority) -> None:
    """A slot of each limiter in turn (the model's, then the gateway's); on any refusal, none."""
    taken: list[Limiter] = []
    try:
        for limiter in limiters:
            await limiter.acquire(deadline, priority)
            taken.append(limiter)
    except BaseException:
        release_all(tuple(taken))
        raise


def release_late(limiters: tuple[Limiter, ...], task: asyncio.Future[Any]) -> None:
    """Frees a call's slots when a call its request stopped waiting for really finishes."""
    release_all(limiters)
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it as lost


def release_all(limiters: tuple[Limiter, ...]) -> None:
    for limiter in reversed(limiters):
        limiter.release()


class BodyBudget:
    """The bytes of request bodies in flight across the gateway, under one cap: a body that would
    pass it is refused (429) before it is read, so a burst of large bodies cannot exhaust memory."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.in_flight = 0

    def reserve(self, size: int, what: str = "request bodies in flight") -> None:
        """Takes `size` bytes of the budget, or raises Overloaded when they do not fit; `what`
        names what would pass it, for the error."""
        if self.in_flight + size > self.max_bytes:
            raise Overloaded(
                f"{what} would pass {self.max_bytes} bytes (MODELYARD_MAX_INFLIGHT_BODY_MB); retry shortly",
                limit="memory",
            )
        self.in_flight += size

    def release(self, size: int) -> None:
        self.in_flight -= size
