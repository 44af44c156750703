"""The circuit breaker and retry budget of one backend endpoint (gateway/breaker.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.breaker import Breakers, BreakerState, GuardOptions
from gateway.errors import BackendUnavailable, ConnectionRefused, DeadlineExceeded, InvalidInput

FAST = GuardOptions(failures=3, open_s=0.1, retries=2, backoff_ms=1, retry_budget_percent=50)


class Backend:
    """Fails with the queued errors, one per call, then answers "ok"; counts its calls."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.timeouts: list[float | None] = []

    async def __call__(self, timeout: float | None) -> str:
        self.calls += 1
        self.timeouts.append(timeout)
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def board() -> tuple[Breakers, list[tuple[str, str]]]:
    events: list[tuple[str, str]] = []
    breakers = Breakers(lambda backend, endpoint, event, detail: events.append((endpoint, event)))
    return breakers, events


async def test_consecutive_failures_open_then_a_probe_closes() -> None:
    breakers, events = board()
    guard = breakers.guard("torchserve", "http://ts", FAST)
    backend = Backend(*(BackendUnavailable("down") for _ in range(3)))
    for _ in range(3):
        with pytest.raises(BackendUnavailable):
            await guard.call(backend, None)
    assert guard.state is BreakerState.OPEN and not guard.allows_traffic()
    with pytest.raises(BackendUnavailable, match="circuit breaker open"):
        await guard.call(backend, None)
    assert backend.calls == 3  # refused without a call
    await asyncio.sleep(0.12)
    assert guard.state is BreakerState.HALF_OPEN and guard.allows_traffic()
    assert await guard.call(backend, None) == "ok"
    assert guard.state is BreakerState.CLOSED
    assert [e for _, e in events] == ["open", "half_open", "closed"]
    assert [s.state for s in breakers.statuses()] == [BreakerState.CLOSED]


async def test_a_failed_probe_opens_again_and_only_one_probe_goes_at_a_time() -> None:
    guard = Breakers().guard("tfserving", "tfs:8500", FAST)
    backend = Backend(*(DeadlineExceeded("slow") for _ in range(4)))
    for _ in range(3):
        with pytest.raises(DeadlineExceeded):
            await guard.call(backend, None)
    await asyncio.sleep(0.12)
    gate = asyncio.Event()

    async def slow_probe(timeout: float | None) -> str:
        await gate.wait()
        raise DeadlineExceeded("still slow")

    probe = asyncio.create_task(guard.call(slow_probe, None))
    await asyncio.sleep(0)
    with pytest.raises(BackendUnavailable, match="circuit breaker open"):
        await guard.call(backend, None)  # a second caller while the probe runs
    gate.set()
    with pytest.raises(DeadlineExceeded):
        await probe
    assert guard.state is BreakerState.OPEN


async def test_errors_about_the_request_do_not_count_as_backend_failures() -> None:
    guard = Breakers().guard("torchserve", "http://ts", FAST)
    backend = Backend(*(InvalidInput("bad shape") for _ in range(5)))
    for _ in range(5):
        with pytest.raises(InvalidInput):
            await guard.call(backend, None)
    assert guard.state is BreakerState.CLOSED


async def test_refused_connections_are_retried_within_the_budget() -> None:
    breakers, events = board()
    guard = breakers.guard("torchserve", "http://ts", GuardOptions(failures=100, retries=2, backoff_ms=1))
    backend = Backend(ConnectionRefused("refused"), ConnectionRefused("refused"))
    assert await guard.call(backend, None) == "ok"
    assert backend.calls == 3 and [e for _, e in events] == ["retry", "retry"]
    # The budget starts at 3 retries and grows by a fifth of a retry per success: one more
    # retry is left now, so a backend that keeps refusing sees 1 + 1 calls, then 1.
    backend = Backend(*(ConnectionRefused("refused") for _ in range(10)))
    with pytest.raises(ConnectionRefused):
        await guard.call(backend, None)
    with pytest.raises(ConnectionRefused):
        await guard.call(backend, None)
    assert backend.calls == 3


async def test_other_failures_are_never_retried() -> None:
    guard = Breakers().guard("torchserve", "http://ts", GuardOptions(failures=100))
    backend = Backend(BackendUnavailable("reset mid-answer"))
    with pytest.raises(BackendUnavailable):
        await guard.call(backend, None)
    assert backend.calls == 1


async def test_the_deadline_becomes_the_call_timeout_and_bounds_retries() -> None:
    guard = Breakers().guard("torchserve", "http://ts", GuardOptions(failures=100, backoff_ms=500))
    backend = Backend(ConnectionRefused("refused"))
    with pytest.raises(ConnectionRefused):
        # The backoff (250 ms or more) would pass the deadline: no retry.
        await guard.call(backend, time.monotonic() + 0.2)
    assert backend.calls == 1
    timeout = backend.timeouts[0]
    assert timeout is not None and 0 < timeout <= 0.2
    with pytest.raises(DeadlineExceeded):
        await guard.call(backend, time.monotonic() - 1)
    assert backend.calls == 1
