"""The per-model admission limiter: a bounded FIFO queue in front of a concurrency cap."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.errors import DeadlineExceeded, Overloaded
from gateway.limits import Limiter, Priority, release_all, take_free


async def test_admits_up_to_the_cap_then_queues_in_order() -> None:
    limiter = Limiter(max_inflight=2, max_queue=2, label="model 'm'")
    await limiter.acquire(None)
    await limiter.acquire(None)
    order: list[int] = []

    async def waiter(index: int) -> None:
        await limiter.acquire(None)
        order.append(index)

    tasks = [asyncio.create_task(waiter(i)) for i in range(2)]
    await asyncio.sleep(0)
    assert limiter.queued == 2 and order == []
    limiter.release()
    limiter.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1]
    assert limiter.inflight == 2


async def test_refuses_at_once_when_the_queue_is_full() -> None:
    limiter = Limiter(max_inflight=1, max_queue=0, label="model 'm'")
    await limiter.acquire(None)
    with pytest.raises(Overloaded, match="max_inflight 1, max_queue 0"):
        await limiter.acquire(None)
    limiter.release()
    assert limiter.inflight == 0


async def test_deadline_while_queued_leaves_the_queue() -> None:
    limiter = Limiter(max_inflight=1, max_queue=4, label="model 'm'")
    await limiter.acquire(None)
    with pytest.raises(DeadlineExceeded):
        await limiter.acquire(time.monotonic() + 0.01)
    assert limiter.queued == 0
    limiter.release()
    assert limiter.inflight == 0


async def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    limiter = Limiter(max_inflight=1, max_queue=4, label="model 'm'")
    await limiter.acquire(None)
    task = asyncio.create_task(limiter.acquire(None))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    limiter.release()
    assert limiter.inflight == 0 and limiter.queued == 0


async def test_queued_requests_are_served_by_priority() -> None:
    limiter = Limiter(max_inflight=1, max_queue=4, label="model 'm'")
    await limiter.acquire(None)
    order: list[str] = []

    async def waiter(name: str, level: Priority) -> None:
        await limiter.acquire(None, level)
        order.append(name)
        limiter.release()

    tasks = [
        asyncio.create_task(waiter(name, level))
        for name, level in (("low", Priority.LOW), ("normal", Priority.NORMAL), ("high", Priority.HIGH))
    ]
    await asyncio.sleep(0)
    limiter.release()
    await asyncio.gather(*tasks)
    assert order == ["high", "normal", "low"]
    assert limiter.inflight == 0 and limiter.queued == 0


async def test_low_priority_fills_only_half_the_queue() -> None:
    limiter = Limiter(max_inflight=1, max_queue=2, label="the gateway", scope="global")
    await limiter.acquire(None)
    first = asyncio.create_task(limiter.acquire(None, Priority.LOW))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded, match="half of it for low priority") as refused:
        await limiter.acquire(None, Priority.LOW)
    assert refused.value.limit == "global"
    second = asyncio.create_task(limiter.acquire(None, Priority.NORMAL))
    await asyncio.sleep(0)
    assert limiter.queued == 2
    limiter.release()
    limiter.release()
    await asyncio.gather(first, second)


async def test_take_free_takes_every_slot_or_none_and_never_passes_a_queue() -> None:
    model = Limiter(max_inflight=1, max_queue=2, label="model 'm'")
    gateway = Limiter(max_inflight=2, max_queue=2, label="the gateway", scope="gateway")
    assert take_free((model, gateway))
    assert (model.inflight, gateway.inflight) == (1, 1)
    # The model's one slot is taken: nothing is taken from the gateway's either.
    assert not take_free((model, gateway))
    assert (model.inflight, gateway.inflight) == (1, 1)
    # A request queued on the model keeps its turn: it is handed the slot released, and a
    # request that finds a queue (even beside a free slot) waits behind it.
    queued = asyncio.create_task(model.acquire(None))
    await asyncio.sleep(0)
    assert model.queued == 1
    model.max_inflight = 2
    assert not take_free((model,))
    release_all((model, gateway))
    await queued
    assert (model.inflight, model.queued, gateway.inflight) == (1, 0, 0)
    assert take_free((model, gateway)) and (model.inflight, gateway.inflight) == (2, 1)
