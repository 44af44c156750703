"""Which model versions are resident in memory, and the budget they share.

A version's resident bytes are measured, never guessed: the resident set of the gateway's process
and every process below it (a managed TorchServe and its workers) just before its load and just
after it (warmup included), with the peak in between (the kernel's high-water mark). Under a
budget every load runs alone, under one lock, so no other load moves those figures; requests that
run on other versions meanwhile move them by their transient buffers only. Without a budget, loads
run side by side as they always have, and a figure can include another load's memory.

Before a load, the least recently used versions that no request is running on unload until the
others' resident bytes plus the load's peak fit the budget. The peak is the version's own from its
last load; a version never loaded yet is assumed to peak at its files' size times the largest
ratio of peak to files that its backend has shown so far (twice, before it has shown one: ONNX
Runtime, for one, holds the file's bytes and the tensors built from them at once). After the load,
freed heap pages go back to the system, its measured resident bytes take the place of the
estimate, and idle versions unload again if the total is over.

An unload is measured too. The first version a backend loads also carries its runtime's one-time
start (thread pools, allocators): what that version's first unload does not give back is the
runtime's, part of the gateway's base from then on. What any later unload does not give back
(pages a backend keeps) stays counted against the budget as retained memory: the largest such
shortfall of each backend, above a noise floor.

Under a budget, allocations of 1 MiB and more get pages of their own (glibc's M_MMAP_THRESHOLD,
which otherwise rises to 32 MiB as the process runs): the memory an unloaded model frees then goes
back to the system at once, and the next measurement sees the same process the budget counts.

A version that requests are running on is never unloaded: the data plane counts a request on its
version before it waits for anything, and the count and the unload are checked and made in one
step of the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import re
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from gateway.errors import ModelNotReady, NoRoom
from gateway.loaded import Footprint, LoadedVersion

if TYPE_CHECKING:
    from gateway.metrics import Metrics

log = logging.getLogger("modelyard.residency")

# How long a load waits for versions that requests are running on to become idle and make room.
ROOM_WAIT_S = 30.0
# A version never loaded is assumed to peak at this many times the size of its files, until its
# backend has loaded files of at least LEARN_FROM_BYTES and shown its own ratio.
FIRST_LOAD_FACTOR = 2.0
LEARN_FROM_BYTES = 2**20
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


class _Peak:
    """The highest resident set of this process and the processes below it while a block runs: the
    kernel's own high-water mark (VmHWM, reset through /proc/PID/clear_refs) where the system keeps
    one, else sampled in a thread every few milliseconds, which can miss a short spike."""

    def __init__(self, meter: _Meter) -> None:
        self._meter = meter
        self.bytes = meter()
        self._pids = [p.pid for p in meter.members()]
        self._kernel = all(_reset_high_water(pid) for pid in self._pids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(_SAMPLE_S):
            self.bytes = max(self.bytes, self._meter())

    def __enter__(self) -> _Peak:
        if not self._kernel:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._kernel:
            marks = [_high_water(p.pid) for p in self._meter.members()]
            self.bytes = max(self.bytes, sum(mark for mark in marks if mark is not None))
        else:
            self._stop.set()
            self._thread.join()
        self.bytes = max(self.bytes, self._meter())


def _reset_high_water(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _high_water(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class _Meter:
    """Resident bytes of this process and every process below it. The list of child processes is
    read again every 100 ms, not at every call, since finding them walks every process there is."""

    def __init__(self) -> None:
        self._me = psutil.Process()
        self._children: list[psutil.Process] = []
        self._listed = 0.0

    def members(self) -> list[psutil.Process]:
        now = time.monotonic()
        if now - self._listed > 0.1:
            with contextlib.suppress(psutil.Error):
                self._children = self._me.children(recursive=True)
            self._listed = now
        return [self._me, *self._children]

    def __call__(self) -> int:
        total = 0
        for member in self.members():
            with contextlib.suppress(psutil.Error):
                total += member.memory_info().rss
        return total


def _return_freed_memory() -> None:
    """Hands freed heap pages back to the system, so the next measurement sees what a load or an
    unload really left. (No gc.collect: the backends' objects go by their reference counts, and a
    full collection of a process that has TensorFlow's modules in it takes some 150 ms.)"""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _map_large_allocations() -> None:
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, _MAPPED_FROM_BYTES)


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
_M_MMAP_THRESHOLD = -3
_MAPPED_FROM_BYTES = 2**20


class Residency:
    """The versions resident under the budget, least recently used first out. Versions of remote
    backends are never here: their memory is another machine's."""

    def __init__(
        self,
        budget: int | None = None,
        metrics: Metrics | None = None,
        room_wait_s: float = ROOM_WAIT_S,
    ) -> None:
        self.budget = budget
        self._metrics = metrics
        self._measure = _Meter()
        self._room_wait_s = room_wait_s
        self._lock = asyncio.Lock()
        # id(version) -> (model name, version): identity, since a reload makes new versions.
        self._resident: dict[int, tuple[str, LoadedVersion]] = {}
        # backend -> bytes its unloads did not give back, counted against the budget.
        self._retained: dict[str, int] = {}
        # backend -> the version that loaded its runtime, until that version first unloads; then
        # what the runtime kept, which is the gateway's base and not the budget's.
        self._first: dict[str, int] = {}
        self._runtime: dict[str, int] = {}
        # backend -> the largest peak / files ratio its loads have shown.
        self._peak_ratio: dict[str, float] = {}
        self.evictions = 0
        if budget is not None:
            _map_large_allocations()
            if metrics is not None:
                metrics.memory_budget.set(budget)

    @property
    def resident_bytes(self) -> int:
        return sum(_bytes(loaded) for _, loaded in self._resident.values())

    @property
    def retained_bytes(self) -> int:
        return sum(self._retained.values())

    @property
    def runtime_bytes(self) -> int:
        """What backends' runtimes kept of their first load: the gateway's base, not the budget's."""
        return sum(self._runtime.values())

    def holds(self, loaded: LoadedVersion) -> bool:
        return id(loaded) in self._resident

    async def load(
        self, model: str, loaded: LoadedVersion, files: int, open_version: Callable[[], Awaitable[None]]
    ) -> None:
        """Runs `open_version` (which leaves `loaded` ready) alone, after making room for it, and
        records what it measured. `files` is the size of the version's files on disk."""
        label = f"model '{model}' version {loaded.version}"
        # Without a budget nothing depends on the figures: loads run side by side, as before.
        exclusive = self._lock if self.budget is not None else contextlib.nullcontext()
        async with exclusive:
            known = loaded.footprint
            if self.budget is not None:
                if known is not None and known.resident > self.budget - self.retained_bytes:
                    raise ModelNotReady(_too_large(label, known.resident, self.budget))
                estimate = int(files * self._peak_ratio.get(loaded.backend, FIRST_LOAD_FACTOR))
                await self._make_room(loaded, known.peak if known is not None else estimate, label)
            meter = self._measure
            before = meter()
            with _Peak(meter) as peak:
                await open_version()
            # What the load freed (the file's bytes, parse buffers) leaves the figure.
            await asyncio.to_thread(_return_freed_memory)
            after = meter()
            loaded.footprint = Footprint(max(0, after - before), max(0, peak.bytes - before, after - before))
            if files >= LEARN_FROM_BYTES and loaded.backend in self._runtime.keys() | self._first.keys():
                # Not the load that started the runtime: its peak holds the runtime's start too.
                ratio = loaded.footprint.peak / files
                self._peak_ratio[loaded.backend] = max(ratio, self._peak_ratio.get(loaded.backend, 0.0))
            self._resident[id(loaded)] = (model, loaded)
            if loaded.backend not in self._runtime:
                self._first.setdefault(loaded.backend, id(loaded))
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
        if self._first.get(loaded.backend) == id(loaded):
            del self._first[loaded.backend]
        if self._resident.pop(id(loaded), None) is not None and self._metrics is not None:
            self._metrics.forget_resident(model, str(loaded.version), loaded.backend)

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
        if self._first.get(victim.backend) == id(victim):
            del self._first[victim.backend]
            self._runtime[victim.backend] = max(0, shortfall)
        elif shortfall > max(RETAINED_FLOOR_BYTES, RETAINED_FLOOR_SHARE * _bytes(victim)):
            self._retained[victim.backend] = max(self._retained.get(victim.backend, 0), shortfall)
        self.evictions += 1
        victim.evictions += 1
        if self._metrics is not None:
            labels = (model, str(victim.version), victim.backend)
            self._metrics.evictions.labels(*labels).inc()
            self._metrics.resident_bytes.labels(*labels).set(0)
            self._metrics.model_ready.labels(*labels).set(0)
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
