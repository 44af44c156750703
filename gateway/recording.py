"""Recorded traffic: the inputs of a sampled share of a model's answered requests, kept so a
parity check (`modelyard migrate check --recorded`) runs on what users actually send.

Opt-in per model (`record:` in config.yaml); the folder is the gateway's (`--record-dir`), never a
request's or a model's to choose. Each request is one `.npz` of its inputs keyed by input name,
written by a thread to a temporary name and renamed, so a reader never sees half a file. Writing
stops, counted, at the model's caps; under `--workers N` each worker keeps to its share of them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gateway.config import Record
from gateway.metrics import Metrics
from gateway.types import Datatype, Tensor

log = logging.getLogger("modelyard.recording")

# Files being written at once; a request drawn while they all are is not recorded (counted busy).
MAX_WRITES_IN_FLIGHT = 4
SUFFIX = ".npz"


@dataclass(slots=True)
class _Kept:
    """What one model's folder holds: counted once from disk, then by this process's writes."""

    files: int
    bytes: int


class Recorder:
    def __init__(
        self, root: Path, metrics: Metrics, workers: int = 1, rng: random.Random | None = None
    ) -> None:
        self.root = root
        self.metrics = metrics
        self._share = 1 / max(1, workers)
        self._rng = rng or random.Random()
        self._kept: dict[str, _Kept] = {}
        self._writes: set[asyncio.Task[None]] = set()
        self._sequence = 0

    def offer(self, config: Record, model: str, tensors: list[Tensor]) -> None:
        """Draws the request against the model's sample; when drawn and there is room, its inputs
        are written in the background. The request never waits for the file."""
        if self._rng.random() >= config.sample:
            return
        counted = self.metrics.recorded_requests
        kept = self._kept.get(model)
        if kept is None:
            kept = self._kept[model] = _scan(self.root / model)
        arrays = {t.name: _array(t) for t in tensors}
        size = sum(a.nbytes for a in arrays.values())
        if (
            kept.files + 1 > config.max_requests * self._share
            or kept.bytes + size > config.max_bytes * self._share
        ):
            counted.labels(model, "full").inc()
            return
        if len(self._writes) >= MAX_WRITES_IN_FLIGHT:
            counted.labels(model, "busy").inc()
            return
        kept.files += 1
        kept.bytes += size
        self._sequence += 1
        path = self.root / model / f"{os.getpid()}-{self._sequence:08d}{SUFFIX}"
        task = asyncio.create_task(self._write(model, path, arrays, kept, size))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(
        self, model: str, path: Path, arrays: dict[str, np.ndarray[Any, Any]], kept: _Kept, size: int
    ) -> None:
        try:
            await asyncio.to_thread(_save, path, arrays)
        except OSError as exc:
            kept.files -= 1
            kept.bytes -= size
            self.metrics.recorded_requests.labels(model, "error").inc()
            log.warning("cannot record a request of model '%s' in %s: %s", model, path.parent, exc)
            return
        self.metrics.recorded_requests.labels(model, "kept").inc()

    async def aclose(self) -> None:
        """Waits for the files being written."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)


def _array(tensor: Tensor) -> np.ndarray[Any, Any]:
    data = np.asarray(tensor.data)
    if tensor.datatype is Datatype.BYTES or data.dtype == object:
        # .npz files are read without pickle: BYTES elements become fixed-width bytes.
        return np.array(data.tolist(), dtype=np.bytes_).reshape(data.shape)
    return data


def _save(path: Path, arrays: dict[str, np.ndarray[Any, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("wb") as file:
        np.savez(file, **arrays)  # type: ignore[arg-type]
    os.replace(temporary, path)


def _scan(folder: Path) -> _Kept:
    try:
        sizes = [p.stat().st_size for p in folder.glob(f"*{SUFFIX}")]
    except OSError:
        sizes = []
    return _Kept(len(sizes), sum(sizes))
