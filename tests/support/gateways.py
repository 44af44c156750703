"""Real gateway processes for the tests: `modelyard serve` on free loopback ports, or the real
Gateway in a thread of the test process for tests that give it their own adapters."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from gateway.net import NotReady, free_port, wait_ready

ROOT = Path(__file__).resolve().parent.parent.parent
STARTUP_TIMEOUT_S = 180  # generous: a loaded 2-core machine starts TorchServe and TensorFlow slowly


def grpc_server() -> str:
    """The gRPC server the gateways under test run: MODELYARD_GRPC_SERVER's, resolved as the gateway
    resolves it (`auto`, the default, is "native" here; `make pytest` runs the gRPC tests once more
    with "grpcio")."""
    from gateway.settings import Settings

    return Settings().grpc_server


@dataclass
class RunningGateway:
    process: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int
    repo: Path
    log: Path
    # The CA file that verifies the gateway's certificate, when it serves TLS.
    tls_ca: Path | None = None

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_ca else 'http'}://{self.http}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` in /metrics whose labels include `labels`."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", verify=self._verify(), timeout=30).text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        )

    def _verify(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=str(self.tls_ca)) if self.tls_ca else True

    def stop(self, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_gateway(
    repo: Path,
    log: Path,
    *args: str,
    env: dict[str, str] | None = None,
    tls_ca: Path | None = None,
    ready_headers: dict[str, str] | None = None,
) -> RunningGateway:
    """Run `modelyard serve` as users do, and wait until it answers ready (over HTTPS, verified
    by `tls_ca`, when the arguments turn TLS on; with `ready_headers` where health needs a key)."""
    http_port, grpc_port = free_port(), free_port()
    command = [
        sys.executable, "-m", "gateway", "serve", "--model-repo", str(repo),
        "--http-port", str(http_port), "--grpc-port", str(grpc_port), *args,
    ]  # fmt: skip
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})}
        )
    gateway = RunningGateway(process, http_port, grpc_port, repo, log, tls_ca)
    verify = ssl.create_default_context(cafile=str(tls_ca)) if tls_ca else True
    try:
        wait_ready(gateway.url, STARTUP_TIMEOUT_S, process=process, verify=verify, headers=ready_headers)
    except NotReady as exc:
        gateway.stop()
        raise RuntimeError(f"{exc}:\n{gateway.output()}") from None
    return gateway


# Small input limits (tests/reliability): crossed by ordinary test requests, and often by fuzzing.
LIMITED_ENV = {
    "MODELYARD_MAX_REQUEST_BODY_MB": str(64 / 1024),
    "MODELYARD_MAX_TENSOR_ELEMENTS": "1024",
    "MODELYARD_MAX_JSON_DEPTH": "8",
    "MODELYARD_MAX_BYTES_ELEMENT_MB": str(1000 / (1 << 20)),
    "MODELYARD_GRPC_MAX_MESSAGE_MB": "1",
}


class InProcessGateway:
    """The real Gateway in a thread of this process, for tests that give it their own adapters."""

    def __init__(self, repo: Path, adapter_factory: Any, **settings: Any) -> None:
        from gateway.settings import Settings

        self.settings = Settings(
            model_repo=repo, http_port=free_port(), grpc_port=free_port(), log_level="warning", **settings
        )
        self._factory = adapter_factory
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.settings.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.settings.grpc_port}"

    async def _main(self) -> None:
        from gateway.server import Gateway

        gateway = Gateway(self.settings, self._factory)
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        try:
            await gateway.start()
        except BaseException as exc:
            self._error = exc
            self._started.set()
            raise
        self._started.set()
        await self._stop.wait()
        await gateway.stop()

    def __enter__(self) -> InProcessGateway:
        self._thread.start()
        if not self._started.wait(STARTUP_TIMEOUT_S) or self._error is not None:
            raise RuntimeError(f"in-process gateway did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
