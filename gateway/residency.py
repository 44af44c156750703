"""Which model versions are resident in memory, and the budget they share.

A version's resident bytes are measured, never guessed: the resident set of the gateway's process
and every process below it (a managed TorchServe and its workers) just before its load and just
after it (warmup included), with the peak in between sampled every few milliseconds. Every load
the budget covers runs alone, under one lock, so no other load moves those figures; requests that
run on other versions meanwhile move them by their transient buffers only.

Before a load, the least recently used versions that no request is running on unload until the
others' resident bytes plus the load's peak fit the budget. The peak is the version's own from its
last load; a version never loaded yet is assumed to peak at twice its files (ONNX Runtime, for
one, holds the file's bytes and the tensors built from them at once). After the load, its measured
resident bytes take the place of the estimate, and idle versions unload again if the total is over.

An unload is measured too. What it gives back short of the version's figure (a runtime's one-time
start, which the first version it loaded carried, or pages a backend keeps) stays counted against
the budget as retained memory: the largest such shortfall of each backend, above a noise floor.

A version that requests are running on is never unloaded: the data plane counts a request on its
version before it waits for anything, and the count and the unload are checked and made in one
step of the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import re
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from gateway.errors import ModelNotReady, NoRoom

if TYPE_CHECKING:
    from gateway.metrics import Metrics
    from gateway.registry import LoadedVersion

log = logging.getLogger("modelyard.residency")

# How long a load waits for versions that requests are running on to become idle and make room.
ROOM_WAIT_S = 30.0
# A version never loaded is assumed to peak at this many times the size of its files.
FIRST_LOAD_FACTOR = 2
# An unload that gives back this much less than the version's figure (or this share of it) has
# left memory behind; less is the noise of other requests' buffers.
RETAINED_FLOOR_BYTES = 4 * 2**20
RETAINED_FLOOR_SHARE = 0.1
_SAMPLE_S = 0.005
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%|[a-zA-Z]*)\s*$")


def parse_budget(text: str, machine_bytes: int | None = None) -> int:
    """Bytes from "2GiB", "1500MB", "1073741824", or a share of the machine's memory: "50%"."""
    match = _BUDGET.match(text)
    unit = match[2].lower() if match else ""
    if match is None or (unit != "%" and unit not in _UNITS):
        raise ValueError(
            f"memory budget {text!r}: write bytes (2GiB, 1500MB, 1073741824) or a share of the "
            "machine's memory (50%)"
        )
    number = float(match[1])
    if unit == "%":
        if not 0 < number <= 100:
            raise ValueError(f"memory budget {text!r}: a share of the machine is over 0% and at most 100%")
        total = psutil.virtual_memory().total if machine_bytes is None else machine_bytes
        return int(total * number / 100)
    value = int(number * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"memory budget {text!r} must be more than 0 bytes")
    return value


def family_rss() -> int:
    """Resident bytes of this process and every process below it."""
    return _rss_of(psutil.Process(), recursive=True)


def _rss_of(process: psutil.Process, recursive: bool, children: list[psutil.Process] | None = None) -> int:
    members = [process, *(children if children is not None else process.children(recursive=recursive))]
    total = 0
    for member in members:
        with contextlib.suppress(psutil.Error):
            total += member.memory_info().rss
    return total


def artifact_bytes(path: Path | None) -> int:
    """The size of a version's files on disk: its first load's estimate."""
    if path is None:
        return 0
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except OSError:
        return 0


@dataclass(frozen=True, slots=True)
class Footprint:
    """What a version added to the resident set at its last load."""

    # From just before the load to just after it, warmup included: what it holds while resident.
    resident: int
    # The most it added at any moment of the load.
    peak: int


class _PeakSampler:
    """The highest resident set of this process and its children while a load runs, sampled in a
    thread (the load itself runs in a worker thread or another process, so this one gets turns)."""

    def __init__(self, measure: Callable[[], int]) -> None:
        self._measure = measure
        self._stop = threading.Event()
        self.peak = measure()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(_SAMPLE_S):
            self.peak = max(self.peak, self._measure())

    def __enter__(self) -> _PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._measure())


class _FamilyMeter:
    """family_rss for a sampler: the list of child processes is read again every 100 ms, not at
    every sample, since finding them walks every process on the machine."""

    def __init__(self) -> None:
        self._me = psutil.Process()
        self._children: list[psutil.Process] = []
        self._listed = 0.0

    def __call__(self) -> int:
        now = time.monotonic()
        if now - self._listed > 0.1:
            with contextlib.suppress(psutil.Error):
                self._children = self._me.children(recursive=True)
            self._listed = now
        return _rss_of(self._me, True, self._children)


def _return_freed_memory() -> None:
    """Collects cycles and hands freed heap pages back to the system, so the next measurement sees
    what an unload really freed."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _load_libc()


class Residency:
    """The versions resident under the budget, least recently used first out. Versions of remote
    backends are never here: their memory is another machine's."""

    def __init__(
        self,
        budget: int | None = None,
        metrics: Metrics | None = None,
        measure: Callable[[], int] | None = None,
        room_wait_s: float = ROOM_WAIT_S,
    ) -> None:
        self.budget = budget
        self._metrics = metrics
        self._measure = measure or _FamilyMeter()
        self._room_wait_s = room_wait_s
        self._lock = asyncio.Lock()
        # id(version) -> (model name, version): identity, since a reload makes new versions.
        self._resident: dict[int, tuple[str, LoadedVersion]] = {}
        # backend -> bytes its unloads did not give back, counted against the budget.
        self._retained: dict[str, int] = {}
        self.evictions = 0
        if metrics is not None and budget is not None:
            metrics.memory_budget.set(budget)

    @property
    def resident_bytes(self) -> int:
        return sum(_bytes(loaded) for _, loaded in self._resident.values())

    @property
    def retained_bytes(self) -> int:
        return sum(self._retained.values())

    def holds(self, loaded: LoadedVersion) -> bool:
        return id(loaded) in self._resident

    async def load(
        self, model: str, loaded: LoadedVersion, estimate: int, open_version: Callable[[], Awaitable[None]]
    ) -> None:
        """Runs `open_version` (which leaves `loaded` ready) alone, after making room for it, and
        records what it measured."""
        label = f"model '{model}' version {loaded.version}"
        async with self._lock:
            known = loaded.footprint
            if self.budget is not None:
                if known is not None and known.resident > self.budget - self.retained_bytes:
                    raise ModelNotReady(_too_large(label, known.resident, self.budget))
                await self._make_room(loaded, known.peak if known is not None else estimate, label)
            meter = self._measure
            before = meter()
            with _PeakSampler(meter) as sampler:
                await open_version()
            after = meter()
            loaded.footprint = Footprint(
                max(0, after - before), max(0, sampler.peak - before, after - before)
            )
            self._resident[id(loaded)] = (model, loaded)
            self._publish(model, loaded)
            log.info(
                "event=resident model=%s version=%d resident_mib=%.1f peak_mib=%.1f total_mib=%.1f",
                model,
                loaded.version,
                loaded.footprint.resident / 2**20,
                loaded.footprint.peak / 2**20,
                self.resident_bytes / 2**20,
            )
            if self.budget is None:
                return
            if loaded.footprint.resident > self.budget - self.retained_bytes:
                await self._evict(model, loaded, "over the memory budget by itself")
                raise ModelNotReady(_too_large(label, loaded.footprint.resident, self.budget))
            await self._make_room(loaded, loaded.footprint.resident, label, wait=False)

    def release(self, model: str, loaded: LoadedVersion) -> None:
        """Forgets a version the registry has closed (unloaded or replaced)."""
        if self._resident.pop(id(loaded), None) is not None and self._metrics is not None:
            with contextlib.suppress(KeyError):
                self._metrics.resident_bytes.remove(model, str(loaded.version), loaded.backend)

    async def _make_room(self, loading: LoadedVersion, need: int, label: str, wait: bool = True) -> None:
        """Unloads idle versions, least recently used first, until the others and `need` fit; waits
        (up to ROOM_WAIT_S) for busy ones to turn idle when the idle ones are not enough."""
        assert self.budget is not None
        given_up = time.monotonic() + self._room_wait_s
        while True:
            others = [(m, v) for m, v in self._resident.values() if v is not loading]
            over = sum(_bytes(v) for _, v in others) + self.retained_bytes + need - self.budget
            if over <= 0:
                return
            idle = [(m, v) for m, v in others if v.inflight == 0 and v.adapter is not None]
            if idle:
                name, victim = min(idle, key=lambda pair: pair[1].last_used)
                await self._evict(name, victim, f"unloaded to make room for {label} in the memory budget")
                continue
            if not others:
                return  # nothing to unload: the load measures what it really needs
            busy = ", ".join(f"{m}:{v.version}" for m, v in others)
            if not wait:
                log.warning(
                    "event=over_budget resident_mib=%.1f retained_mib=%.1f budget_mib=%.1f busy=%s",
                    self.resident_bytes / 2**20,
                    self.retained_bytes / 2**20,
                    self.budget / 2**20,
                    busy,
                )
                return
            if time.monotonic() > given_up:
                raise NoRoom(
                    f"{label} cannot load: the memory budget ({self.budget / 2**20:.0f} MiB) is held by "
                    f"versions with requests running ({busy}) and none turned idle in {self._room_wait_s:g} s"
                )
            await asyncio.sleep(0.01)

    async def _evict(self, model: str, victim: LoadedVersion, reason: str) -> None:
        # The adapter leaves the version in the same step that checked it idle: a request that
        # arrives from here on finds it not resident and waits for its next load.
        adapter = victim.detach(f"{reason}; loads again at its next request")
        self._resident.pop(id(victim), None)
        before = self._measure()
        if adapter is not None:
            try:
                await adapter.aclose()
            except Exception:
                log.exception("closing model '%s' version %d", model, victim.version)
        await asyncio.to_thread(_return_freed_memory)
        shortfall = _bytes(victim) - max(0, before - self._measure())
        if shortfall > max(RETAINED_FLOOR_BYTES, RETAINED_FLOOR_SHARE * _bytes(victim)):
            self._retained[victim.backend] = max(self._retained.get(victim.backend, 0), shortfall)
        self.evictions += 1
        victim.evictions += 1
        if self._metrics is not None:
            labels = (model, str(victim.version), victim.backend)
            self._metrics.evictions.labels(*labels).inc()
            self._metrics.resident_bytes.labels(*labels).set(0)
        log.info("event=evicted model=%s version=%d reason='%s'", model, victim.version, reason)

    def _publish(self, model: str, loaded: LoadedVersion) -> None:
        if self._metrics is not None:
            self._metrics.resident_bytes.labels(model, str(loaded.version), loaded.backend).set(
                _bytes(loaded)
            )


def _bytes(loaded: LoadedVersion) -> int:
    return loaded.footprint.resident if loaded.footprint is not None else 0


def _too_large(label: str, resident: int, budget: int) -> str:
    return (
        f"{label} holds {resident / 2**20:.0f} MiB resident, more than the whole memory budget "
        f"({budget / 2**20:.0f} MiB)"
    )
