"""Triton's system shared-memory extension, below both v2 front doors: the regions clients
register, and tensors read from and written to them.

A client creates a POSIX shared-memory object (`/dev/shm/<key>`), registers a region of it by name
(key, offset, byte size), and then names the region in an input's or output's parameters
(`shared_memory_region`, `shared_memory_offset`, `shared_memory_byte_size`) instead of sending the
data. The front door reads such an input into a numpy tensor straight from the mapping, and
writes such an output into it; the data plane sees ordinary tensors.

What the gateway will map: only objects directly in the shared-memory folder (a key is one name,
never a path), regular files, never through a symbolic link, and only what a client registered;
every offset and size is checked against the region, and the region against the object's size,
which is checked again at each use (a client that shrinks its object must not crash the gateway).
Registration is off unless `MODELYARD_ALLOW_CLIENT_SHM` is on, as Triton's `--allow-client-shm`:
a client that may register can make the gateway read and write the shared memory of any process
of its user.

Errors begin with Triton's words for the same fault (its src/shared_memory_manager.cc), which
clients and tritonclient's examples match on, and go on with what the gateway knows of it.

CUDA shared memory needs a GPU, which this gateway does not use: its registration is refused with
a clear error; its status lists nothing and its unregister has nothing to do.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gateway.codec import DEFAULT_LIMITS, InputLimits, serialize_bytes, tensor_from_buffer
from gateway.errors import RegionExists, RegionNotFound, SharedMemoryError, Unsupported
from gateway.types import Datatype, Tensor, numpy_dtype, quoted

SHM_ROOT = Path("/dev/shm")
# Regions registered at once: each holds an open file and a mapping.
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


class _Region:
    def __init__(self, status: RegionStatus, fd: int, mapping: mmap.mmap) -> None:
        self.status = status
        self.fd = fd
        self.mapping = mapping

    def check(self, owner: str, place: TensorPlace) -> None:
        """`place` lies inside the region as registered (no system call: a request's decoding
        checks each of its places with this; the object's own size is checked at each use)."""
        status = self.status
        if place.offset + place.byte_size > status.byte_size:
            # Triton tells an offset past the region's end from a place that runs past it.
            what = "offset" if place.offset >= status.byte_size else "offset + byte size"
            raise SharedMemoryError(
                f"Invalid {what} for shared memory region: {quoted(status.name)}: {owner} asks for offset "
                f"{place.offset} and byte size {place.byte_size}, and the region has {status.byte_size} bytes"
            )

    def view(self, owner: str, place: TensorPlace) -> memoryview:
        """The bytes of `place`, once they lie inside the region and the object still holds them.
        The object's size takes an fstat, which gives up the GIL: under load, each one can wait
        tens of µs to get it back, so a request makes one per tensor."""
        self.check(owner, place)
        start = self.status.offset + place.offset
        if os.fstat(self.fd).st_size < start + place.byte_size:
            raise SharedMemoryError(
                f"{owner}: the shared memory object of region {quoted(self.status.name)} is now smaller than the "
                "region; register it again"
            )
        return memoryview(self.mapping)[start : start + place.byte_size]

    def close(self) -> None:
        # A request still reading an input's array holds the mapping: it unmaps once that is done.
        with contextlib.suppress(BufferError):
            self.mapping.close()
        os.close(self.fd)


class SharedMemoryRegions:
    """The system shared-memory regions clients registered, by name; one per gateway, shared by
    the REST and gRPC front doors (one namespace, as Triton's)."""

    def __init__(self, enabled: bool = False, root: Path = SHM_ROOT, max_regions: int = MAX_REGIONS) -> None:
        self.enabled = enabled
        self.root = root
        self.max_regions = max_regions
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
            mapping = mmap.mmap(fd, offset + byte_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self._regions[name] = _Region(RegionStatus(name, key, offset, byte_size), fd, mapping)

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
    ) -> Tensor:
        """An input's tensor from its place, without a copy (BYTES elements are copied out)."""
        owner = f"input {quoted(name)}"
        view = self._get(place.region, owner).view(owner, place)
        return tensor_from_buffer(name, datatype, shape, view, limits)

    def write(self, tensor: Tensor, place: TensorPlace) -> int:
        """An output's tensor into its place; the bytes it took."""
        owner = f"output {quoted(tensor.name)}"
        view = self._get(place.region, owner).view(owner, place)
        if tensor.datatype is Datatype.BYTES:
            data = serialize_bytes(tensor.data)
            size = len(data)
        else:
            dtype = numpy_dtype(tensor.datatype)
            size = math.prod(tensor.shape) * dtype.itemsize
        if size > place.byte_size:
            raise SharedMemoryError(
                f"{owner} needs {size} bytes, more than the {place.byte_size} its shared memory byte size gives"
            )
        if tensor.datatype is Datatype.BYTES:
            view[:size] = data
        else:
            np.frombuffer(view, dtype=dtype, count=math.prod(tensor.shape)).reshape(tensor.shape)[...] = (
                tensor.data
            )
        return size


# For front doors built without shared memory: any region a request names is refused.
NO_SHARED_MEMORY = SharedMemoryRegions()
