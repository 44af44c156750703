"""What a worker process and its supervisor share under `--workers N`: the worker's role, given
when it starts, and the table of workers the supervisor keeps, which every worker's status reads.

The supervisor owns one temporary folder for the run: `metrics/` holds every worker's metric
values (prometheus-client's multiprocess mode) and `workers.json` the table, rewritten whole
(write, then rename) at every change.
"""

from __future__ import annotations

import glob
import json
import os
import socket
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prometheus_client.multiprocess import MultiProcessCollector

TABLE_FILE = "workers.json"
METRICS_DIR = "metrics"
# Seconds between a worker's writes of its in-flight and queued figures, which the others read.
LOAD_REFRESH_S = 0.25


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """One worker's place: its index (0..N-1, kept across restarts) and the supervisor's folder."""

    index: int
    state_dir: Path

    @property
    def metrics_dir(self) -> Path:
        return self.state_dir / METRICS_DIR

    @property
    def table(self) -> Path:
        return self.state_dir / TABLE_FILE


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    index: int
    pid: int
    # Wall-clock time (Unix seconds) this worker process started.
    started_at: float
    # Times the supervisor started this index again after its process ended.
    restarts: int
    # It has answered the supervisor that it serves.
    ready: bool


@dataclass(frozen=True, slots=True)
class WorkerTable:
    supervisor_pid: int
    workers: list[WorkerRecord]

    def write(self, path: Path) -> None:
        scratch = path.with_suffix(".tmp")
        scratch.write_text(json.dumps(asdict(self)))
        os.replace(scratch, path)

    @classmethod
    def read(cls, path: Path) -> WorkerTable | None:
        """The table as last written; None where there is none (yet)."""
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return cls(data["supervisor_pid"], [WorkerRecord(**row) for row in data["workers"]])


def reuse_port_socket(host: str, port: int, *, share: bool = True) -> socket.socket:
    """A TCP socket bound to host:port with SO_REUSEPORT, so that every worker's listener shares
    the port and the kernel spreads new connections over them. Until it listens it only holds
    the port: connections go to listening sockets alone. With `share` False, without
    SO_REUSEPORT: its bind fails where any other socket has the port."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if share:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


class WorkerMetricFiles(MultiProcessCollector):
    """Every worker's metric files, read as prometheus-client does, less the files a worker has
    just created and not yet sized: prometheus-client opens a value file (empty) before it
    sizes it, and reading an empty one raises, so a scrape or a status read that came in that
    moment, as a worker started or restarted, failed whole."""

    def __init__(self, registry: Any, path: str) -> None:
        super().__init__(registry, path)  # type: ignore[no-untyped-call]

    def collect(self) -> Iterable[Any]:
        files = [f for f in glob.glob(os.path.join(self._path, "*.db")) if _sized(f)]
        merged: Iterable[Any] = self.merge(files, accumulate=True)  # type: ignore[no-untyped-call]
        return merged


def _sized(path: str) -> bool:
    # A file is empty only between its creation and its sizing, which never shrinks it back.
    try:
        return os.path.getsize(path) > 0
    except FileNotFoundError:  # a dead worker's, removed by the supervisor
        return False
