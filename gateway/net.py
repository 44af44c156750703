"""Loopback helpers shared by the managed backends, the tools, the benchmarks and the tests: a
free port to listen on, and the wait for a started server to answer ready."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Mapping

import httpx

READY_PATH = "/v2/health/ready"


class NotReady(RuntimeError):
    """A started server exited, or did not answer ready in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now. Another process may take it before the caller binds it, so
    callers bind soon after."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_ready(
    url: str,
    timeout_s: float,
    *,
    process: subprocess.Popen[bytes] | None = None,
    path: str = READY_PATH,
    verify: ssl.SSLContext | bool = True,
    headers: Mapping[str, str] | None = None,
    interval_s: float = 0.1,
) -> None:
    """Returns once `GET url+path` answers 200; raises NotReady if `process` exits first or the
    time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            raise NotReady(f"the server exited with {process.returncode} before it was ready")
        try:
            if httpx.get(url + path, timeout=1.0, verify=verify, headers=headers).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise NotReady(f"{url} was not ready within {timeout_s:.0f} s")
        time.sleep(interval_s)
