"""Triton's system shared-memory extension, below both v2 front doors: the regions clients
register, and tensors read from and written to them.

A client creates a POSIX shared-memory object (`/dev/shm/<key>`), registers a region of it by name
(key, offset, byte size), and then names the region in an input's or output's parameters
(`shared_memory_region`, `shared_memory_offset`, `shared_memory_byte_size`) instead of sending the
data. The front door copies such an input out of the object with one read, and writes such an
output into it with one write; the data plane sees ordinary tensors.

Why reads and writes, not a mapping: a mapping read past its object's end raises SIGBUS, which
kills the process, and a client can shrink its object at any moment, also after any check of its
size. A read of a shrunk object comes back short and is refused; a write past its end grows it
again. So no client can crash the gateway through its object, and a request in flight keeps the
input it was sent, whatever the client writes to the region afterwards. The read copies the input
once, as decoding raw contents does. Up to GIL_HELD_MAX_BYTES the read and the write keep the GIL
(ctypes.PyDLL): giving it up around a system call of a few µs costs tens of µs under load, waiting
to get it back.

What the gateway will open: only objects directly in the shared-memory folder (a key is one name,
never a path), regular files, never through a symbolic link, and only what a client registered;
every offset and size is checked against the region, and the region against the object's size
when it is registered.
Registration is off unless `MODELYARD_ALLOW_CLIENT_SHM` is on, as Triton's `--allow-client-shm`:
a client that may register can make the gateway read and write the shared memory of any process
of its user.

Errors begin with Triton's words for the same fault (its src/shared_memory_manager.cc), which
clients and tritonclient's examples match on, and go on with what the gateway knows of it.

CUDA shared memory needs a GPU, which this gateway does not use: its registration is refused with
a clear error; its status lists nothing and its unregister has nothing to do.
"""

from __future__ import annotations

import ctypes
import math
import os
import stat
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gateway.codec import DEFAULT_LIMITS, InputLimits, check_shape, serialize_bytes, tensor_from_buffer
from gateway.errors import (
    InvalidInput,
    PayloadTooLarge,
    RegionExists,
    RegionNotFound,
    SharedMemoryError,
    Unsupported,
)
from gateway.limits import BodyBudget
from gateway.types import Datatype, Tensor, numpy_dtype, quoted

SHM_ROOT = Path("/dev/shm")
# Regions registered at once: each holds an open file.
MAX_REGIONS = 256
_MAX_KEY = 255
REGION = "shared_memory_region"
OFFSET = "shared_memory_offset"
BYTE_SIZE = "shared_memory_byte_size"
SHARED_MEMORY_PARAMETERS = (REGION, OFFSET, BYTE_SIZE)
CUDA_REFUSED = (
    "CUDA shared memory needs a GPU, and this gateway computes on none: register the region as "
    "system shared memory instead"
)


def no_cuda_region(name: str) -> RegionNotFound:
    """A CUDA region's status asked by name: none can be registered here."""
    return RegionNotFound(f"Unable to find cuda shared memory region: {quoted(name)}: {CUDA_REFUSED}")


@dataclass(frozen=True, slots=True)
class RegionStatus:
    name: str
    key: str
    offset: int
    byte_size: int


@dataclass(frozen=True, slots=True)
class TensorPlace:
    """Where one tensor's bytes lie: a registered region, and an offset and size inside it."""

    region: str
    offset: int
    byte_size: int


# Copies up to this size keep the GIL; a longer one gives it up and lets other threads run.
GIL_HELD_MAX_BYTES = 1 << 20


def _gil_held_calls() -> tuple[Any, Any]:
    """libc's pread64 and pwrite64 called without giving up the GIL; (None, None) where the C
    library has neither (os.preadv and os.pwrite serve instead)."""
    try:
        libc = ctypes.PyDLL(None)
        calls = (libc.pread64, libc.pwrite64)
    except (OSError, AttributeError):
        return None, None
    for call in calls:
        call.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64)
        call.restype = ctypes.c_ssize_t
    return calls


_PREAD, _PWRITE = _gil_held_calls()


def read_at(fd: int, size: int, offset: int) -> np.ndarray[Any, Any]:
    """`size` bytes of the file from `offset` (fewer where the file ends sooner), as uint8."""
    buffer = np.empty(size, dtype=np.uint8)
    got = -1
    if _PREAD is not None and size <= GIL_HELD_MAX_BYTES:
        got = _PREAD(fd, buffer.ctypes.data, size, offset)
    if got < 0:  # not tried, or failed: os.preadv raises the error (and retries a signal's EINTR)
        got = os.preadv(fd, [buffer.data], offset)
    while 0 < got < size:  # a read that stopped short before the file's end: the rest
        more = os.preadv(fd, [buffer[got:].data], offset + got)
        if more == 0:
            break
        got += more
    return buffer if got == size else buffer[:got]


def write_at(fd: int, data: np.ndarray[Any, Any] | bytes, offset: int) -> None:
    """All of `data` into the file at `offset`."""
    view = (memoryview(data) if isinstance(data, bytes) else data.data).cast("B")
    size = len(view)
    done = -1
    if _PWRITE is not None and size <= GIL_HELD_MAX_BYTES:
        done = _PWRITE(fd, data.ctypes.data if isinstance(data, np.ndarray) else data, size, offset)
    if done < 0:
        done = os.pwrite(fd, view, offset)
    while done < size:
        done += os.pwrite(fd, view[done:], offset + done)


class _Region:
    def __init__(self, status: RegionStatus, fd: int) -> None:
        self.status = status
        self.fd = fd

    def check(self, owner: str, place: TensorPlace) -> None:
        """`place` lies inside the region as registered (no system call: a request's decoding
        checks each of its places with this)."""
        status = self.status
        if place.offset + place.byte_size > status.byte_size:
            # Triton tells an offset past the region's end from a place that runs past it.
            what = "offset" if place.offset >= status.byte_size else "offset + byte size"
            raise SharedMemoryError(
                f"Invalid {what} for shared memory region: {quoted(status.name)}: {owner} asks for offset "
                f"{place.offset} and byte size {place.byte_size}, and the region has {status.byte_size} bytes"
            )

    def read(self, owner: str, place: TensorPlace) -> np.ndarray[Any, Any]:
        """A copy of the bytes of `place`, once they lie inside the region; refused where the
        object no longer holds them all."""
        self.check(owner, place)
        data = read_at(self.fd, place.byte_size, self.status.offset + place.offset)
        if len(data) < place.byte_size:
            raise SharedMemoryError(
                f"{owner}: the shared memory object of region {quoted(self.status.name)} is now smaller than the "
                "region; register it again"
            )
        return data

    def write(self, owner: str, place: TensorPlace, data: np.ndarray[Any, Any] | bytes) -> None:
        self.check(owner, place)
        write_at(self.fd, data, self.status.offset + place.offset)

    def close(self) -> None:
        os.close(self.fd)


class RequestReads:
    """What one request's inputs may copy out of shared memory in all: what one binary body may
    carry (MODELYARD_MAX_REQUEST_BODY_MB). A request's tensors in shared memory are then held to
    the same bound as the same tensors sent in its body."""

    __slots__ = ("left", "limit")

    def __init__(self, limits: InputLimits = DEFAULT_LIMITS) -> None:
        self.limit = self.left = limits.max_body_bytes

    def take(self, owner: str, size: int) -> None:
        if size > self.left:
            raise PayloadTooLarge(
                f"{owner}: its {size} bytes in shared memory take the request's inputs over the limit of "
                f"{self.limit} bytes (MODELYARD_MAX_REQUEST_BODY_MB)"
            )
        self.left -= size


class SharedMemoryRegions:
    """The system shared-memory regions clients registered, by name; one per gateway, shared by
    the REST and gRPC front doors (one namespace, as Triton's)."""

    def __init__(
        self,
        enabled: bool = False,
        root: Path = SHM_ROOT,
        max_regions: int = MAX_REGIONS,
        budget: BodyBudget | None = None,
    ) -> None:
        self.enabled = enabled
        self.root = root
        self.max_regions = max_regions
        # The gateway's budget of request bytes in flight (MODELYARD_MAX_INFLIGHT_BODY_MB): each
        # input copied out of shared memory holds its bytes of it for as long as its copy lives.
        self.budget = budget
        self._regions: dict[str, _Region] = {}

    def _allowed(self) -> None:
        if not self.enabled:
            raise Unsupported(
                "system shared memory is off on this gateway (MODELYARD_ALLOW_CLIENT_SHM=true turns it on)"
            )

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self._allowed()
        where = f"failed to register shared memory region {quoted(name)}"
        cannot_open = f"Unable to open shared memory region: {quoted(key)}"
        if not name:
            raise SharedMemoryError("a shared memory region needs a name")
        if name in self._regions:
            raise RegionExists(f"shared memory region {quoted(name)} already in manager; unregister it first")
        if len(self._regions) >= self.max_regions:
            raise SharedMemoryError(
                f"{where}: {self.max_regions} regions are registered, the most there may be"
            )
        if offset < 0 or byte_size <= 0:
            raise SharedMemoryError(f"{where}: the offset must be 0 or more and the byte size more than 0")
        object_name = key[1:] if key.startswith("/") else key
        if (
            not object_name
            or len(object_name) > _MAX_KEY
            or "/" in object_name
            or object_name in (".", "..")
            or not object_name.isprintable()
        ):
            raise SharedMemoryError(
                f"{cannot_open}: a key names one shared memory object directly, '/name' "
                f"(registering region {quoted(name)})"
            )
        try:
            fd = os.open(self.root / object_name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise SharedMemoryError(
                f"{cannot_open}: {exc.strerror} (registering region {quoted(name)})"
            ) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise SharedMemoryError(
                    f"{cannot_open}: not a shared memory object (registering region {quoted(name)})"
                )
            if info.st_size < offset + byte_size:
                raise SharedMemoryError(
                    f"{where}: invalid args: offset {offset} and byte size {byte_size} pass the end of "
                    f"{quoted(key)}, which has {info.st_size} bytes"
                )
        except BaseException:
            os.close(fd)
            raise
        self._regions[name] = _Region(RegionStatus(name, key, offset, byte_size), fd)

    def status(self, name: str | None = None) -> list[RegionStatus]:
        """Every region, or the one named (an error if there is none of that name)."""
        if not name:
            return [region.status for region in self._regions.values()]
        self._allowed()
        region = self._regions.get(name)
        if region is None:
            raise RegionNotFound(f"Unable to find system shared memory region: {quoted(name)}")
        return [region.status]

    def unregister(self, name: str | None = None) -> None:
        """The region named, or (no name) every one; a name not registered is no error, as in Triton."""
        names = [name] if name else list(self._regions)
        for each in names:
            region = self._regions.pop(each, None)
            if region is not None:
                region.close()

    def close(self) -> None:
        self.unregister()

    def _get(self, name: str, owner: str) -> _Region:
        self._allowed()
        region = self._regions.get(name)
        if region is None:
            raise RegionNotFound(
                f"Unable to find shared memory region: {quoted(name)}: {owner} names it, and no region "
                "of that name is registered"
            )
        return region

    # Tensors ------------------------------------------------------------------------------------

    def place(self, owner: str, parameters: Mapping[str, Any]) -> TensorPlace | None:
        """Where the parameters of an input or output put its data; None: not in shared memory.
        The region must be registered and the place inside it."""
        region = parameters.get(REGION)
        size = parameters.get(BYTE_SIZE)
        if region is None and size is None:
            if OFFSET in parameters:
                raise SharedMemoryError(f"{owner}: {OFFSET} needs {REGION} and {BYTE_SIZE}")
            return None
        if region is None or size is None:
            raise SharedMemoryError(f"{owner}: {REGION} and {BYTE_SIZE} go together; give both")
        offset = parameters.get(OFFSET, 0)
        if not isinstance(region, str):
            raise SharedMemoryError(f"{owner}: {REGION} must be a string")
        for key, value in ((BYTE_SIZE, size), (OFFSET, offset)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SharedMemoryError(f"{owner}: {key} must be a non-negative integer")
        place = TensorPlace(region, offset, size)
        self._get(region, owner).check(owner, place)
        return place

    def read(
        self,
        name: str,
        datatype: Datatype,
        shape: tuple[int, ...],
        place: TensorPlace,
        limits: InputLimits = DEFAULT_LIMITS,
        reads: RequestReads | None = None,
    ) -> Tensor:
        """An input's tensor from its place: a copy, which the client's later writes to the region
        do not change. Before a byte is copied, a numeric input's byte size must be what its shape
        needs, and every input's must fit what the request may still read (`reads`: the request's
        own account; without one, this input alone is held to a body's limit)."""
        owner = f"input {quoted(name)}"
        region = self._get(place.region, owner)
        if datatype is not Datatype.BYTES:
            needed = math.prod(check_shape(name, shape, limits)) * numpy_dtype(datatype).itemsize
            if place.byte_size != needed:
                raise InvalidInput(
                    f"{owner}: shape {list(shape)} of {datatype} needs {needed} bytes, and its "
                    f"{BYTE_SIZE} is {place.byte_size}"
                )
        (reads if reads is not None else RequestReads(limits)).take(owner, place.byte_size)
        budget, size = self.budget, place.byte_size
        if budget is None:
            return tensor_from_buffer(name, datatype, shape, region.read(owner, place).data, limits)
        budget.reserve(
            size, f"{owner}: its {size} bytes from shared memory, with the request data in flight,"
        )
        try:
            data = region.read(owner, place)
        except BaseException:
            budget.release(size)
            raise
        # Released once the copy is gone: the request done, and whatever kept its inputs (a
        # payload log, a recording) done with them.
        weakref.finalize(data, budget.release, size)
        return tensor_from_buffer(name, datatype, shape, data.data, limits)

    def write(self, tensor: Tensor, place: TensorPlace) -> int:
        """An output's tensor into its place; the bytes it took."""
        owner = f"output {quoted(tensor.name)}"
        region = self._get(place.region, owner)
        data: np.ndarray[Any, Any] | bytes
        if tensor.datatype is Datatype.BYTES:
            data = serialize_bytes(tensor.data)
            size = len(data)
        else:
            data = np.ascontiguousarray(tensor.data, dtype=numpy_dtype(tensor.datatype))
            size = data.nbytes
        if size > place.byte_size:
            raise SharedMemoryError(
                f"{owner} needs {size} bytes, more than the {place.byte_size} its shared memory byte size gives"
            )
        region.write(owner, place, data)
        return size


# For front doors built without shared memory: any region a request names is refused.
NO_SHARED_MEMORY = SharedMemoryRegions()
