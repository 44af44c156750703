"""Payload logging: a sampled share of a model's requests and responses, written as CloudEvents in
the shape KServe's inference logger sends (type org.kubeflow.serving.inference.request and
.response, the request id as the event id), for the models whose config.yaml asks for it.

The data plane only draws the sample and puts the request's tensors on the model's bounded queue;
a request never waits for a sink. When the queue is full the event pair is dropped and counted.
One task per model takes events off the queue, encodes them in a worker thread (tensor data as
JSON lists; past `max_tensor_bytes` a summary: shape, datatype, size and sha256; redacted names:
no data at all), then POSTs each to the HTTP sink (binary mode: ce-* headers, the data as the
body) and appends it to the JSONL file (structured mode: one event a line), which rotates by size.
A sink that fails or answers too slowly loses the event, counted as a drop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import httpx
import numpy as np
import orjson

from gateway.config import PayloadLog
from gateway.context import RequestContext
from gateway.metrics import Metrics
from gateway.types import Datatype, Tensor

log = logging.getLogger("modelyard.payload_log")

REQUEST_TYPE = "org.kubeflow.serving.inference.request"
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"
SPEC_VERSION = "1.0"
# Seconds a closing gateway gives the queued events to reach their sinks.
CLOSE_GRACE_S = 2.0
# One warning a minute per model about a failing sink, not one per event.
_WARN_EVERY_S = 60.0


@dataclass(frozen=True, slots=True)
class _Pending:
    """What a request leaves on the queue: its tensors as they were, encoded later."""

    request_id: str
    model: str
    version: str
    protocol: str
    at: float
    inputs: Sequence[Tensor] | None
    outputs: Sequence[Tensor] | None

    @property
    def events(self) -> int:
        return (self.inputs is not None) + (self.outputs is not None)


@dataclass(frozen=True, slots=True)
class Event:
    type: str
    id: str
    source: str
    time: str
    model: str
    version: str
    data: bytes  # the event's data, JSON

    def headers(self) -> dict[str, str]:
        """Binary-mode CloudEvents headers, with KServe's `inferenceservicename` extension."""
        return {
            "ce-specversion": SPEC_VERSION,
            "ce-id": self.id,
            "ce-source": self.source,
            "ce-type": self.type,
            "ce-time": self.time,
            "ce-inferenceservicename": self.model,
            "ce-modelversion": self.version,
            "content-type": "application/json",
        }

    def line(self) -> bytes:
        """The structured-mode event, one JSON line."""
        head = orjson.dumps(
            {
                "specversion": SPEC_VERSION,
                "id": self.id,
                "source": self.source,
                "type": self.type,
                "time": self.time,
                "datacontenttype": "application/json",
                "inferenceservicename": self.model,
                "modelversion": self.version,
            }
        )
        return head[:-1] + b',"data":' + self.data + b"}\n"


def tensor_json(tensor: Tensor, options: PayloadLog) -> dict[str, Any]:
    """A tensor as v2 JSON, or its summary when it is larger than `max_tensor_bytes`, or without
    its data when its name is redacted."""
    entry: dict[str, Any] = {
        "name": tensor.name,
        "datatype": tensor.datatype.value,
        "shape": list(tensor.shape),
    }
    if tensor.name in options.redact:
        entry["redacted"] = True
        return entry
    array = np.asarray(tensor.data)
    if tensor.datatype == Datatype.BYTES:
        elements = [bytes(e) if not isinstance(e, str) else e.encode() for e in array.reshape(-1)]
        size = sum(len(e) for e in elements)
        if size > options.max_tensor_bytes:
            # The hash of the elements as v2's binary form lays them out: a 4-byte length each.
            digest = hashlib.sha256()
            for element in elements:
                digest.update(struct.pack("<I", len(element)))
                digest.update(element)
            entry["summary"] = {"bytes": size, "sha256": digest.hexdigest()}
        else:
            entry["data"] = [e.decode("utf-8", "backslashreplace") for e in elements]
        return entry
    if array.nbytes > options.max_tensor_bytes:
        raw = np.ascontiguousarray(array).tobytes()
        entry["summary"] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    else:
        entry["data"] = array.reshape(-1).tolist()
    return entry


def encode(pending: _Pending, options: PayloadLog) -> list[Event]:
    stamp = datetime.fromtimestamp(pending.at, UTC).isoformat().replace("+00:00", "Z")
    events = []
    for kind, field, tensors in (
        (REQUEST_TYPE, "inputs", pending.inputs),
        (RESPONSE_TYPE, "outputs", pending.outputs),
    ):
        if tensors is None:
            continue
        data = {
            "id": pending.request_id,
            "model_name": pending.model,
            "model_version": pending.version,
            field: [tensor_json(t, options) for t in tensors],
        }
        events.append(
            Event(
                kind,
                pending.request_id,
                options.source,
                stamp,
                pending.model,
                pending.version,
                orjson.dumps(data),
            )
        )
    return events


class RotatingFile:
    """A JSONL file that moves to path.1 (path.1 to path.2, and so on, up to `backups`) when the
    next line would take it past `max_bytes`. Used from one thread at a time."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._file: IO[bytes] | None = None
        self._size = 0

    def write(self, lines: Iterable[bytes]) -> None:
        for line in lines:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = self.path.open("ab")
                self._size = self._file.tell()
            if self._size and self._size + len(line) > self.max_bytes:
                self._rotate()
                assert self._file is not None
            self._file.write(line)
            self._size += len(line)
        if self._file is not None:
            self._file.flush()

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        if self.backups:
            for index in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{index}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{index + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._file = self.path.open("wb")
        self._size = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class ModelPayloadLog:
    """One model's queue, its worker task and its sinks."""

    def __init__(self, model: str, options: PayloadLog, metrics: Metrics) -> None:
        self.model = model
        self.options = options
        self._logged = metrics.payloads_logged
        self._dropped = metrics.payloads_dropped
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(options.queue)
        self._http = None if options.sink is None else httpx.AsyncClient(timeout=options.timeout_s)
        self._file = (
            None if options.path is None else RotatingFile(options.path, options.max_bytes, options.backups)
        )
        self._warned = 0.0
        self._worker = asyncio.create_task(self._run(), name=f"payload log {model}")

    def offer(self, pending: _Pending) -> None:
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            self._dropped.labels(self.model, "queue_full").inc(pending.events)

    async def _run(self) -> None:
        while True:
            pending = await self._queue.get()
            try:
                await self._write(pending)
            except Exception:  # one bad event must not end the logging
                log.exception("payload log of %s: an event could not be written", self.model)
            finally:
                self._queue.task_done()

    async def _write(self, pending: _Pending) -> None:
        events = await asyncio.to_thread(encode, pending, self.options)
        if self._file is not None:
            try:
                await asyncio.to_thread(self._file.write, [e.line() for e in events])
            except OSError as exc:
                self._dropped.labels(self.model, "file_error").inc(len(events))
                self._warn(f"cannot write {self.options.path}: {exc}")
            else:
                for event in events:
                    self._logged.labels(self.model, _kind(event), "file").inc()
        if self._http is not None and self.options.sink is not None:
            for event in events:
                try:
                    answer = await self._http.post(
                        self.options.sink, content=event.data, headers=event.headers()
                    )
                    answer.raise_for_status()
                except httpx.HTTPError as exc:
                    self._dropped.labels(self.model, "sink_error").inc()
                    self._warn(f"the sink {self.options.sink} failed: {type(exc).__name__}: {exc}")
                else:
                    self._logged.labels(self.model, _kind(event), "http").inc()

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._warned >= _WARN_EVERY_S:
            self._warned = now
            log.warning("event=payload_log_drop model=%s detail=%r", self.model, message)

    async def aclose(self, grace_s: float = CLOSE_GRACE_S) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), grace_s)
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        if self._http is not None:
            await self._http.aclose()
        if self._file is not None:
            await asyncio.to_thread(self._file.close)


class PayloadLogs:
    """Every model's payload log, made at its first logged request; built by the composition root."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._models: dict[str, ModelPayloadLog] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def offer(
        self,
        options: PayloadLog,
        context: RequestContext,
        model: str,
        version: str,
        inputs: Sequence[Tensor],
        outputs: Sequence[Tensor],
    ) -> None:
        """Called by the data plane for each answered request of a model with `payload_log`."""
        if options.sample < 1 and random.random() >= options.sample:
            return
        logger = self._models.get(model)
        if logger is None or logger.options is not options:
            if logger is not None:  # the model's config changed (a reload): the old log closes
                task = asyncio.create_task(logger.aclose())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
            logger = self._models[model] = ModelPayloadLog(model, options, self.metrics)
        logger.offer(
            _Pending(
                context.request_id,
                model,
                version,
                context.protocol,
                time.time(),
                inputs if options.mode != "response" else None,
                outputs if options.mode != "request" else None,
            )
        )

    async def aclose(self) -> None:
        await asyncio.gather(*(m.aclose() for m in self._models.values()), *self._closing)
        self._models.clear()


def _kind(event: Event) -> str:
    return "request" if event.type == REQUEST_TYPE else "response"
