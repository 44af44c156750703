"""The per-request metric series of one (model, version, backend, protocol), and how they hold
their observations.

Each observation is appended to its series and added to prometheus-client's values in bulk: at
every scrape of the process (Metrics.flush, so its /metrics and status page are exact), at most
FLUSH_S after the first one held (so under `--workers` the other workers' figures are that late
at most), and whenever a series holds BUFFER_MAX. A request pays a list append per observation
instead of prometheus-client's lock and scan of the bounds; a series never holds more than
BUFFER_MAX, so no add is long enough to stall the event loop.
"""

from __future__ import annotations

import asyncio
import bisect
from typing import TYPE_CHECKING, Protocol

from prometheus_client import Counter, Histogram

if TYPE_CHECKING:
    from gateway.metrics import Metrics

# The longest a per-request observation waits before it is in prometheus-client's values.
FLUSH_S = 0.1
# The most observations one series holds before it adds them at once.
BUFFER_MAX = 64


class Flusher:
    """The buffered series holding observations, and the one timer that adds them all.

    Used from the event loop's thread only, as the data plane is. Outside a running loop (a
    script, a test) each observation is added at once."""

    def __init__(self) -> None:
        self._held: list[_Buffered] = []
        self._timer: asyncio.TimerHandle | None = None

    def hold(self, series: _Buffered) -> None:
        """`series` has just held its first observation since it was last added."""
        self._held.append(series)
        if self._timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._timer = loop.call_later(FLUSH_S, self.flush)

    def flush(self) -> None:
        """Every held observation, into prometheus-client's values."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        held, self._held = self._held, []
        for series in held:
            series.flush()


class _Buffered(Protocol):
    def flush(self) -> None: ...


class BufferedHistogram:
    """One histogram child's observations, held and then added in bulk: one `inc` per bucket
    touched and one for the sum, instead of a lock and a scan of the bounds per observation."""

    __slots__ = ("_child", "_flusher", "_values")

    def __init__(self, child: Histogram, flusher: Flusher) -> None:
        self._child = child
        self._flusher = flusher
        self._values: list[float] = []

    def observe(self, amount: float) -> None:
        values = self._values
        values.append(amount)
        if len(values) == 1:
            self._flusher.hold(self)
        elif len(values) >= BUFFER_MAX:
            self.flush()

    def flush(self) -> None:
        values, self._values = self._values, []
        if not values:
            return
        child = self._child
        # prometheus-client's own fields, as its observe() uses them: a bucket per upper bound
        # (counted apart, made cumulative at collection), the first bound >= the amount.
        bounds, buckets = child._upper_bounds, child._buckets
        counts: dict[int, int] = {}
        for amount in values:
            index = bisect.bisect_left(bounds, amount)
            counts[index] = counts.get(index, 0) + 1
        child._sum.inc(sum(values))
        for index, count in counts.items():
            buckets[index].inc(count)


class BufferedCounter:
    """One counter child's increments, held and then added as one."""

    __slots__ = ("_child", "_count", "_flusher")

    def __init__(self, child: Counter, flusher: Flusher) -> None:
        self._child = child
        self._flusher = flusher
        self._count = 0

    def inc(self) -> None:
        self._count += 1
        if self._count == 1:
            self._flusher.hold(self)
        elif self._count >= BUFFER_MAX:
            self.flush()

    def flush(self) -> None:
        count, self._count = self._count, 0
        if count:
            self._child.inc(count)


class RequestSeries:
    """The per-request series of one (model, version, backend, protocol), looked up once."""

    __slots__ = (
        "_codes",
        "_flusher",
        "_labels",
        "_phase_duration",
        "_phases",
        "_requests",
        "compute",
        "duration",
        "queue",
    )

    def __init__(self, metrics: Metrics, labels: tuple[str, str, str, str]) -> None:
        flusher = self._flusher = metrics.flusher
        self._requests = metrics.requests
        self._codes: dict[str, BufferedCounter] = {}
        self._phase_duration = metrics.phase_duration
        self._phases: dict[str, BufferedHistogram] = {}
        self.duration = BufferedHistogram(metrics.request_duration.labels(*labels), flusher)
        self.queue = BufferedHistogram(metrics.queue_duration.labels(*labels), flusher)
        self.compute = BufferedHistogram(metrics.compute_duration.labels(*labels), flusher)
        self._labels = labels

    def count(self, code: str) -> None:
        """One answered request, with its HTTP status (REST) or gRPC code name (gRPC)."""
        self.count_child(code).inc()

    def count_child(self, code: str) -> BufferedCounter:
        """The requests counter's child for `code`, made at its first use."""
        counter = self._codes.get(code)
        if counter is None:
            child = self._requests.labels(*self._labels, code)
            counter = self._codes[code] = BufferedCounter(child, self._flusher)
        return counter

    def phase(self, name: str) -> BufferedHistogram:
        """The phase histogram's child for one phase (gateway.timing.PHASES), made at its first use."""
        child = self._phases.get(name)
        if child is None:
            made = self._phase_duration.labels(*self._labels, name)
            child = self._phases[name] = BufferedHistogram(made, self._flusher)
        return child
