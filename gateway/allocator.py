"""glibc's malloc, set for a server that allocates a tensor's buffer per request.

By default glibc serves an allocation of 128 KiB or more (a threshold it then raises to the
largest block freed) with a fresh `mmap`, and gives memory at the heap's top back to the kernel
past twice that. A gateway receiving tensors of a MiB allocates and frees buffers that size on every
request: gRPC's received message, REST bodies, the copies of shared-memory inputs. Each fresh
mapping is then faulted in page by page as it is written, and unmapped once freed. With a 1 MiB
input over gRPC, page faults took 40% of the gateway's CPU.

So each serving process fixes the threshold (`MODELYARD_MALLOC_MMAP_THRESHOLD_MB`, 8 by default)
and keeps up to twice that free at the heap's top: buffers up to the threshold are reused from
the heap. Larger ones (a model's weights) are still mapped, and given back when freed. 0 leaves
glibc's own behaviour. An operator's own MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or
GLIBC_TUNABLES decide instead, and a C library that is not glibc is left alone.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

# mallopt's parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold over HEAP_MAX / 2: 32 MiB on 64-bit.
MAX_THRESHOLD_MB = 32
OPERATOR_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def tune_malloc(threshold_mb: int) -> bool:
    """Sets malloc's mmap threshold to `threshold_mb` MiB and its trim threshold to twice that;
    whether it did."""
    if threshold_mb <= 0 or any(name in os.environ for name in OPERATOR_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    size = min(threshold_mb, MAX_THRESHOLD_MB) << 20
    done = bool(mallopt(M_MMAP_THRESHOLD, size)) and bool(mallopt(M_TRIM_THRESHOLD, 2 * size))
    if not done:
        log.warning("could not set malloc's thresholds to %d MiB; glibc's own apply", threshold_mb)
    return done
