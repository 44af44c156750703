"""The response cache: a version's answers, kept by the bytes of the inputs they answered.

Opt-in per model (`cache:` in config.yaml). Each loaded version has a cache of its own, made when
it is made and dropped with it, so an answer is never shared across versions and a reload (a new
version object) starts empty; an unload to make room empties it too. The key is a BLAKE2b digest
of every input's name, dtype, shape and bytes and of the outputs asked for: what the backend
computes from. The encoding a client asks for (JSON or binary, say) is applied after the cache,
so it is not part of the key. Shadow copies never read or fill it.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gateway.config import CacheConfig

Results = dict[str, np.ndarray[Any, Any]]


def cache_key(inputs: Mapping[str, np.ndarray[Any, Any]], output_names: Sequence[str]) -> bytes:
    digest = hashlib.blake2b(digest_size=32)
    for name in sorted(inputs):
        array = inputs[name]
        digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        if array.dtype == object:  # BYTES tensors: numpy objects, hashed element by element
            for item in array.reshape(-1):
                value = item if isinstance(item, bytes) else str(item).encode()
                digest.update(len(value).to_bytes(8, "little"))
                digest.update(value)
        else:
            digest.update(np.ascontiguousarray(array).data)
    digest.update("\0".join(output_names).encode())
    return digest.digest()


@dataclass(slots=True)
class _Entry:
    results: Results
    size: int
    expires: float | None


class ResponseCache:
    """Least recently used answers, within `max_entries` and `max_bytes`, each for `ttl_s` at most."""

    def __init__(self, config: CacheConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> Results | None:
        entry = self._entries.get(key)
        if entry is not None and entry.expires is not None and self._clock() >= entry.expires:
            self._drop(key)
            entry = None
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry.results

    def put(self, key: bytes, results: Results) -> None:
        size = len(key) + sum(array.nbytes for array in results.values())
        if size > self.config.max_bytes or any(array.dtype == object for array in results.values()):
            return  # too large to keep, or a BYTES output whose size numpy does not know
        for array in results.values():
            array.flags.writeable = False  # shared by every answer it serves from now on
        if key in self._entries:
            self._drop(key)
        ttl = self.config.ttl_s
        self._entries[key] = _Entry(results, size, None if ttl is None else self._clock() + ttl)
        self.bytes += size
        while len(self._entries) > self.config.max_entries or self.bytes > self.config.max_bytes:
            self._drop(next(iter(self._entries)))

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def _drop(self, key: bytes) -> None:
        self.bytes -= self._entries.pop(key).size


def cache_for(config: CacheConfig | None) -> ResponseCache | None:
    return None if config is None else ResponseCache(config)
