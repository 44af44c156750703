"""Guarding calls to a remote backend endpoint: a circuit breaker, safe retries with a budget, and
the per-call timeout that follows from the request's deadline.

One `EndpointGuard` stands for one backend endpoint (a TorchServe or TF Serving address). The
registry keeps them all in a `Breakers` board, so the data plane (and a status page) can list their
states, and so every change of state reaches the metrics and the log.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field

from gateway.context import current_request_id
from gateway.errors import BackendUnavailable, ConnectionRefused, DeadlineExceeded
from gateway.metrics import Metrics

log = logging.getLogger("modelyard.breaker")

T = TypeVar("T")


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class GuardOptions(BaseModel):
    """The `breaker` and `retry` keys of a remote backend's config section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Consecutive failures (unreachable, or no answer in time) that open the breaker.
    failures: int = Field(default=5, ge=1)
    # How long it stays open before one probe request may try the backend again.
    open_s: float = Field(default=5.0, gt=0)
    # Extra attempts for a request the backend refused to connect for (nothing was sent).
    retries: int = Field(default=2, ge=0)
    # First backoff; each later one doubles, and every one is jittered by +-50%.
    backoff_ms: float = Field(default=50.0, ge=0)
    # Retries may add at most this share of the endpoint's successful calls, so a dead backend
    # never sees a retry storm.
    retry_budget_percent: float = Field(default=20.0, ge=0, le=100)


# An event of a guard: (backend, endpoint, event, detail). Events: "retry", "open", "half_open", "closed".
GuardObserver = Callable[[str, str, str, str], None]


@dataclass(frozen=True, slots=True)
class BreakerStatus:
    backend: str
    endpoint: str
    state: BreakerState
    consecutive_failures: int


class EndpointGuard:
    """The circuit breaker and retry budget of one backend endpoint."""

    # Retry tokens an endpoint starts with, and the most it can save up.
    _MIN_BUDGET = 3.0
    _MAX_BUDGET = 10.0

    def __init__(
        self, backend: str, endpoint: str, options: GuardOptions, observe: GuardObserver | None = None
    ) -> None:
        self.backend = backend
        self.endpoint = endpoint
        self.options = options
        self._observe = observe
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self._tokens = self._MIN_BUDGET

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and time.monotonic() - self._opened_at >= self.options.open_s:
            self._change(BreakerState.HALF_OPEN, "probing")
        return self._state

    def status(self) -> BreakerStatus:
        return BreakerStatus(self.backend, self.endpoint, self.state, self._failures)

    def allows_traffic(self) -> bool:
        """False while open: readiness reports the backend down, and calls fail at once."""
        return self.state is not BreakerState.OPEN

    async def call(self, attempt: Callable[[float | None], Awaitable[T]], deadline: float | None) -> T:
        """Run `attempt(timeout_s)`, with the breaker's leave, retrying refused connections.

        `timeout_s` is what remains until the deadline (None without one); an attempt raises
        only gateway errors.
        """
        retries = 0
        while True:
            self._admit()
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                self._release_probe()
                raise DeadlineExceeded(f"{self.backend}: the deadline passed before the call").located(
                    self.endpoint
                )
            try:
                result = await attempt(timeout)
            except ConnectionRefused as exc:
                self._record_failure(exc.logged)
                backoff = self._backoff(retries)
                if not self._may_retry(retries, backoff, deadline):
                    raise
                retries += 1
                self._tokens -= 1
                self._emit("retry", f"attempt {retries + 1} in {backoff * 1000:.0f} ms: {exc}")
                await asyncio.sleep(backoff)
                continue
            except (BackendUnavailable, DeadlineExceeded) as exc:
                self._record_failure(exc.logged)
                raise
            except BaseException:
                # The backend answered (with an error about the request), or the caller gave up.
                self._release_probe()
                raise
            self._record_success()
            return result

    def _admit(self) -> None:
        state = self.state
        if state is BreakerState.OPEN or (state is BreakerState.HALF_OPEN and self._probing):
            raise BackendUnavailable(
                f"{self.backend}: circuit breaker open after {self._failures} "
                f"consecutive failures; the next probe is within {self.options.open_s:g}s"
            ).located(self.endpoint)
        if state is BreakerState.HALF_OPEN:
            self._probing = True

    def _release_probe(self) -> None:
        self._probing = False

    def _backoff(self, retries: int) -> float:
        return float(self.options.backoff_ms / 1000 * 2**retries * random.uniform(0.5, 1.5))

    def _may_retry(self, retries: int, backoff: float, deadline: float | None) -> bool:
        if retries >= self.options.retries or self._tokens < 1 or self._state is BreakerState.OPEN:
            return False
        return deadline is None or time.monotonic() + backoff < deadline

    def _record_success(self) -> None:
        self._probing = False
        self._failures = 0
        budget = self.options.retry_budget_percent / 100
        self._tokens = min(self._MAX_BUDGET, self._tokens + budget)
        if self._state is not BreakerState.CLOSED:
            self._change(BreakerState.CLOSED, "a call succeeded")

    def _record_failure(self, reason: str) -> None:
        self._failures += 1
        was_probe, self._probing = self._probing, False
        if self._state is BreakerState.OPEN:
            return
        if was_probe or self._failures >= self.options.failures:
            self._opened_at = time.monotonic()
            self._change(BreakerState.OPEN, f"{self._failures} consecutive failures, the last: {reason}")

    def _change(self, state: BreakerState, why: str) -> None:
        self._state = state
        self._emit(state.value, why)

    def _emit(self, event: str, detail: str) -> None:
        if self._observe is not None:
            self._observe(self.backend, self.endpoint, event, detail)


class Breakers:
    """Every endpoint guard the adapters made, one per (backend, endpoint)."""

    def __init__(self, observe: GuardObserver | None = None) -> None:
        self.observe = observe
        self._guards: dict[tuple[str, str], EndpointGuard] = {}

    def guard(self, backend: str, endpoint: str, options: GuardOptions) -> EndpointGuard:
        key = (backend, endpoint)
        if key not in self._guards:
            self._guards[key] = EndpointGuard(backend, endpoint, options, self._emit)
        return self._guards[key]

    def statuses(self) -> list[BreakerStatus]:
        return [guard.status() for guard in self._guards.values()]

    def _emit(self, backend: str, endpoint: str, event: str, detail: str) -> None:
        if self.observe is not None:
            self.observe(backend, endpoint, event, detail)
        else:
            log.warning("event=breaker_%s backend=%s endpoint=%s detail=%r", event, backend, endpoint, detail)


# modelyard_breaker_state's value for each state a breaker enters.
_BREAKER_LEVEL = {"closed": 0, "half_open": 1, "open": 2}


def guard_observer(metrics: Metrics) -> GuardObserver:
    """What each guard event does: its metric, and its log line with the request being served."""

    def observe(backend: str, endpoint: str, event: str, detail: str) -> None:
        if event == "retry":
            metrics.backend_retries.labels(backend, endpoint).inc()
        else:
            metrics.breaker_transitions.labels(backend, endpoint, event).inc()
            metrics.breaker_state.labels(backend, endpoint).set(_BREAKER_LEVEL[event])
        log.warning(
            "event=%s request_id=%s backend=%s endpoint=%s detail=%r",
            event if event == "retry" else f"breaker_{event}",
            current_request_id.get() or "",
            backend,
            endpoint,
            detail,
        )

    return observe
