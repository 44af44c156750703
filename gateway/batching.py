"""Dynamic batching: a visible wrapper around an adapter, built when a model with a `batching`
section loads.

Requests queue; a batcher takes the first, waits up to `max_queue_delay_us` for more (or until
`max_batch_size` rows, or a preferred size, are there), merges the requests whose inputs fit
together along the first dimension, runs the inner adapter once, and splits the outputs back to
each request in order. A batch that fails is retried request by request, so one bad request
fails alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from adapters.base import ModelAdapter
from gateway.breaker import EndpointGuard
from gateway.config import Batching
from gateway.errors import DeadlineExceeded, GatewayError
from gateway.timing import current_timing
from gateway.tracing import current_trace
from gateway.types import ModelSignature

log = logging.getLogger("modelyard.batching")

Arrays = dict[str, np.ndarray[Any, Any]]
# Called once per batch run with (batch size in rows, seconds the first request waited).
BatchObserver = Callable[[int, float], None]


@dataclass(eq=False)
class _Pending:
    inputs: Mapping[str, np.ndarray[Any, Any]]
    output_names: tuple[str, ...]
    rows: int
    key: tuple[Any, ...]
    deadline: float | None
    enqueued: float = field(default_factory=time.monotonic)
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)
    # When its batch began to run (perf_counter_ns); 0 until then.
    started_ns: int = 0
    # perf_counter_ns() stamps of a traced request: queued, and taken into a batch (0: not yet).
    traced_at: int = 0
    taken_at: int = 0
    batch_rows: int = 0
    future: asyncio.Future[Arrays] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


def _batch_key(
    inputs: Mapping[str, np.ndarray[Any, Any]], output_names: Sequence[str]
) -> tuple[Any, ...] | None:
    """Requests with equal keys can be stacked; None means this request cannot join a batch."""
    parts: list[Any] = [tuple(output_names)]
    rows = None
    for name in sorted(inputs):
        array = inputs[name]
        if array.ndim == 0 or array.dtype == object or (rows is not None and array.shape[0] != rows):
            return None
        rows = array.shape[0]
        parts.append((name, array.dtype.str, array.shape[1:]))
    return tuple(parts)


class BatchingAdapter(ModelAdapter):
    """Wraps an adapter with a batching queue; everything but `infer` passes straight through."""

    backend: ClassVar[str] = "batching"

    def __init__(self, inner: ModelAdapter, options: Batching, observe: BatchObserver | None = None) -> None:
        super().__init__(inner.spec)
        self.inner = inner
        self.options = options
        self._observe = observe
        self._queue: list[_Pending] = []
        self._arrived = asyncio.Event()
        self._running = asyncio.Semaphore(options.max_concurrent_batches)
        self._batcher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def load(self) -> None:
        await self.inner.load()
        self._batcher = asyncio.create_task(self._run_forever(), name=f"batcher {self.spec.label}")

    async def metadata(self) -> ModelSignature:
        return await self.inner.metadata()

    async def ready(self) -> bool:
        return await self.inner.ready()

    def process_id(self) -> int | None:
        return self.inner.process_id()

    def breaker(self) -> EndpointGuard | None:
        return self.inner.breaker()

    async def infer(
        self,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        output_names: Sequence[str],
        *,
        deadline: float | None = None,
    ) -> dict[str, np.ndarray[Any, Any]]:
        key = _batch_key(inputs, output_names)
        if key is None or self._batcher is None:
            return await self.inner.infer(inputs, output_names, deadline=deadline)
        rows = next(iter(inputs.values())).shape[0]
        if rows >= self.options.max_batch_size:
            return await self.inner.infer(inputs, output_names, deadline=deadline)
        pending = _Pending(inputs, tuple(output_names), rows, key, deadline)
        trace = current_trace.get()
        if trace is not None:
            pending.traced_at = time.perf_counter_ns()
        self._queue.append(pending)
        self._arrived.set()
        if trace is None:
            result = await asyncio.shield(pending.future)
        else:
            try:
                result = await asyncio.shield(pending.future)
            finally:
                if pending.taken_at:
                    trace.phase(
                        "batch_wait",
                        pending.traced_at,
                        pending.taken_at,
                        {"modelyard.batch.rows": pending.batch_rows, "modelyard.request.rows": pending.rows},
                    )
        timing = current_timing.get()
        if timing is not None and pending.started_ns:
            timing.batch_ns = pending.started_ns - pending.enqueued_ns
        return result

    async def _run_forever(self) -> None:
        delay = self.options.max_queue_delay_us / 1e6
        preferred = set(self.options.preferred_batch_sizes)
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            while self._queue:
                first = self._queue[0]
                # Wait for company until the first request has waited its delay, or a batch is full.
                while True:
                    batch = self._take(first.key, dry_run=True)
                    rows = sum(p.rows for p in batch)
                    remaining = first.enqueued + delay - time.monotonic()
                    if rows >= self.options.max_batch_size or rows in preferred or remaining <= 0:
                        break
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._arrived.wait(), remaining)
                    self._arrived.clear()
                await self._running.acquire()
                batch = self._take(first.key, dry_run=False)
                if not batch:
                    self._running.release()
                    continue
                task = asyncio.create_task(self._run_batch(batch))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _take(self, key: tuple[Any, ...], dry_run: bool) -> list[_Pending]:
        """The oldest requests with this key, in order, up to max_batch_size rows."""
        batch: list[_Pending] = []
        rows = 0
        for pending in self._queue:
            if pending.key == key and rows + pending.rows <= self.options.max_batch_size:
                batch.append(pending)
                rows += pending.rows
        if not dry_run:
            self._queue = [p for p in self._queue if p not in batch]
            taken_at = 0
            for pending in batch:
                if pending.traced_at:
                    pending.taken_at = taken_at = taken_at or time.perf_counter_ns()
                    pending.batch_rows = rows
            batch = self._drop_expired(batch)
        return batch

    def _drop_expired(self, batch: list[_Pending]) -> list[_Pending]:
        """Requests whose deadline passed in the queue never reach the backend."""
        now = time.monotonic()
        live = []
        for pending in batch:
            if pending.deadline is not None and pending.deadline <= now:
                if not pending.future.done():
                    pending.future.set_exception(
                        DeadlineExceeded(
                            f"{self.spec.label}: the deadline passed in the batch queue", stage="batch_queue"
                        )
                    )
            else:
                live.append(pending)
        return live

    async def _run_batch(self, batch: list[_Pending]) -> None:
        started = time.perf_counter_ns()
        for pending in batch:
            pending.started_ns = started
        try:
            if self._observe is not None:
                self._observe(sum(p.rows for p in batch), time.monotonic() - batch[0].enqueued)
            if len(batch) == 1:
                await self._run_alone(batch[0])
                return
            names = list(batch[0].inputs)
            merged = {name: np.concatenate([p.inputs[name] for p in batch]) for name in names}
            # The batch serves its latest deadline; each request's own is kept by the data plane.
            deadlines = [p.deadline for p in batch]
            deadline = None if None in deadlines else max(d for d in deadlines if d is not None)
            try:
                outputs = await self.inner.infer(merged, batch[0].output_names, deadline=deadline)
            except GatewayError:
                outputs = None
            total = sum(p.rows for p in batch)
            if outputs is None or any(o.ndim == 0 or o.shape[0] != total for o in outputs.values()):
                # The batch failed, or its outputs are not row-aligned: run each request alone.
                await asyncio.gather(*(self._run_alone(p) for p in batch))
                return
            bounds = np.cumsum([0, *(p.rows for p in batch)])
            for index, pending in enumerate(batch):
                if not pending.future.done():
                    pending.future.set_result(
                        {n: o[bounds[index] : bounds[index + 1]] for n, o in outputs.items()}
                    )
        finally:
            self._running.release()

    async def _run_alone(self, pending: _Pending) -> None:
        try:
            result = await self.inner.infer(pending.inputs, pending.output_names, deadline=pending.deadline)
        except Exception as exc:
            if not pending.future.done():
                pending.future.set_exception(exc)
            return
        if not pending.future.done():
            pending.future.set_result(result)

    async def aclose(self) -> None:
        if self._batcher is not None:
            self._batcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._batcher
            self._batcher = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for pending in self._queue:
            if not pending.future.done():
                pending.future.set_exception(
                    GatewayError(f"{self.spec.label} was unloaded while the request was queued")
                )
        self._queue.clear()
        await self.inner.aclose()
