"""A TorchServe that the gateway starts on loopback ports, supervises (restarting it, and
registering every version again, when it dies) and stops: one per gateway, shared by every
managed-mode version (`SharedResources`)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from adapters.base import LoadSpec, SharedResources
from adapters.torchserve import modelyard_handler as wire
from adapters.torchserve.client import TorchServeClient, error_message
from adapters.torchserve.options import TorchServeOptions
from gateway.errors import BackendUnavailable, GatewayError, ModelNotReady
from gateway.net import free_port

log = logging.getLogger("modelyard.torchserve")

# The handler packed into every archive; it runs inside TorchServe's workers.
HANDLER_FILE = Path(wire.__file__)
STARTUP_TIMEOUT_S = 180.0
RESTART_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)


@dataclass
class Registration:
    name: str
    version: str
    archive: str
    options: TorchServeOptions
    is_default: bool


class ManagedTorchServe:
    """A TorchServe that the gateway runs on loopback ports, restarts when it dies, and stops.

    It runs in a process group of its own, so stopping it ends its Java frontend and every Python
    worker with it: no orphans.
    """

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="modelyard-torchserve-"))
        self.store = self.workdir / "model-store"
        self.store.mkdir()
        self.generation = 0  # bumps on every (re)start; registrations belong to one generation
        self.healthy = False
        self.client: TorchServeClient | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._registrations: dict[tuple[str, str], Registration] = {}
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        self._lock = asyncio.Lock()
        # Versions that hold this TorchServe (from `managed_torchserve` to their `release`); at 0
        # it stops after SharedResources.idle_stop_s, unless a version takes it again.
        self.users = 0
        self._idle_stop: asyncio.Task[None] | None = None

    @classmethod
    async def create(cls) -> ManagedTorchServe:
        runtime = cls()
        try:
            await runtime._start()
        except BaseException:
            await runtime.aclose()
            raise
        runtime.healthy = True
        runtime._supervisor = asyncio.create_task(runtime._supervise())
        return runtime

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def _start(self) -> None:
        if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
            raise ModelNotReady("TorchServe needs Java 17 or later: no `java` on PATH and no JAVA_HOME")
        inference, management, metrics = free_port(), free_port(), free_port()
        config = self.workdir / "config.properties"
        config.write_text(
            "\n".join(
                [
                    f"inference_address=http://127.0.0.1:{inference}",
                    f"management_address=http://127.0.0.1:{management}",
                    f"metrics_address=http://127.0.0.1:{metrics}",
                    # TorchServe also opens gRPC on fixed ports 7070/7071 unless told otherwise:
                    # two TorchServes on one machine would then collide.
                    "grpc_inference_address=127.0.0.1",
                    "grpc_management_address=127.0.0.1",
                    f"grpc_inference_port={free_port()}",
                    f"grpc_management_port={free_port()}",
                    f"model_store={self.store}",
                    "default_workers_per_model=1",
                    "install_py_dep_per_model=false",
                    "disable_system_metrics=true",
                    "enable_envvars_config=false",
                ]
            )
            + "\n"
        )
        tmp = self.workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        log_dir = self.workdir / "logs"
        log_dir.mkdir(exist_ok=True)
        # TorchServe's launcher keeps a machine-wide pid file in TMPDIR: a private TMPDIR lets
        # several gateways (and tests) each run their own.
        env = {
            **os.environ,
            "TMPDIR": str(tmp),
            "LOG_LOCATION": str(log_dir),
            "METRICS_LOCATION": str(log_dir),
        }
        launcher = Path(sys.executable).with_name("torchserve")
        command = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "ts.model_server"]
        command += ["--start", "--foreground", "--ncs", "--ts-config", str(config), "--model-store", str(self.store),
                    "--disable-token-auth", "--enable-model-api"]  # fmt: skip
        with (log_dir / "torchserve.out").open("ab") as sink:
            self._process = await asyncio.create_subprocess_exec(
                *command, cwd=self.workdir, env=env, stdout=sink, stderr=sink, start_new_session=True
            )
        self.client = TorchServeClient(
            f"http://127.0.0.1:{inference}", f"http://127.0.0.1:{management}", None, None, 60.0
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STARTUP_TIMEOUT_S
        while loop.time() < deadline:
            if self._process.returncode is not None:
                raise ModelNotReady(
                    f"TorchServe exited at start with {self._process.returncode}; see {log_dir}"
                )
            if await self.client.healthy():
                self.generation += 1
                log.info("managed TorchServe up (pid %d, inference port %d)", self._process.pid, inference)
                return
            await asyncio.sleep(0.25)
        raise ModelNotReady(
            f"TorchServe did not become healthy within {STARTUP_TIMEOUT_S:.0f}s; see {log_dir}"
        )

    async def _supervise(self) -> None:
        while not self._closing:
            assert self._process is not None
            code = await self._process.wait()
            if self._closing:
                return
            self.healthy = False
            log.error("managed TorchServe exited with %s; restarting", code)
            await self._kill_group()
            for attempt, delay in enumerate([*RESTART_BACKOFF_S, *[RESTART_BACKOFF_S[-1]] * 1000]):
                await asyncio.sleep(delay)
                if self._closing:
                    return
                try:
                    async with self._lock:
                        await self._replace_client()
                        await self._start()
                        for registration in list(self._registrations.values()):
                            await self._register(registration)
                        self.healthy = True
                    log.info(
                        "managed TorchServe restarted after %d attempt(s); models registered again",
                        attempt + 1,
                    )
                    break
                except (GatewayError, OSError) as exc:
                    self.healthy = False
                    log.error("restarting TorchServe failed (attempt %d): %s", attempt + 1, exc)
                    await self._kill_group()

    async def _replace_client(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    async def archive(
        self, spec: LoadSpec, options: TorchServeOptions, inputs: list[str], outputs: list[str]
    ) -> str:
        """The archive file name in the model store for one version, built once per content."""
        assert spec.artifact is not None
        name = f"{spec.model_name}-v{spec.version}"
        if spec.artifact.suffix == ".mar":
            target = self.store / f"{name}.mar"
            await asyncio.to_thread(shutil.copyfile, spec.artifact, target)
            return target.name
        settings = json.dumps({"inputs": inputs, "outputs": outputs, "threads": options.threads})
        digest = hashlib.sha256(spec.artifact.read_bytes() + settings.encode()).hexdigest()[:12]
        archive = f"{name}-{digest}"
        if (self.store / f"{archive}.mar").exists():
            return f"{archive}.mar"
        staging = Path(tempfile.mkdtemp(prefix="stage-", dir=self.workdir))
        (staging / wire.SETTINGS_FILE).write_text(settings)
        command = [
            sys.executable, "-m", "model_archiver.model_packaging", "--model-name", archive,
            "--version", str(spec.version), "--serialized-file", str(spec.artifact), "--handler", str(HANDLER_FILE),
            "--extra-files", str(staging / wire.SETTINGS_FILE), "--export-path", str(self.store), "--force",
        ]  # fmt: skip
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        output, _ = await process.communicate()
        shutil.rmtree(staging, ignore_errors=True)
        if process.returncode != 0:
            raise ModelNotReady(
                f"{spec.label}: torch-model-archiver failed: {output.decode(errors='replace')[-500:]}"
            )
        return f"{archive}.mar"

    async def register(self, registration: Registration, label: str) -> None:
        async with self._lock:
            self._registrations[(registration.name, registration.version)] = registration
            try:
                await self._register(registration)
            except BaseException:
                self._registrations.pop((registration.name, registration.version), None)
                raise

    async def _register(self, registration: Registration) -> None:
        client = self.client
        if client is None:
            raise BackendUnavailable("the managed TorchServe is not running")
        label = f"model '{registration.name}' version {registration.version}"
        options = registration.options
        existing = await client.manage("GET", f"/models/{registration.name}/{registration.version}", label)
        if existing.status_code == 200:
            await client.manage("DELETE", f"/models/{registration.name}/{registration.version}", label)
        response = await client.manage(
            "POST", "/models", label, url=registration.archive, model_name=registration.name,
            initial_workers=options.workers, synchronous="true", batch_size=options.batch_size,
            max_batch_delay=options.max_batch_delay_ms, response_timeout=options.response_timeout_s,
        )  # fmt: skip
        if response.status_code != 200:
            raise ModelNotReady(
                f"{label}: TorchServe would not register it: {error_message(response.content)}"
            )
        if registration.is_default:
            await client.manage(
                "PUT", f"/models/{registration.name}/{registration.version}/set-default", label
            )

    async def unregister(self, registration: Registration) -> None:
        """Removes the registration, unless a reload has since registered the same version anew."""
        name, version = registration.name, registration.version
        async with self._lock:
            if self._registrations.get((name, version)) is not registration:
                return
            del self._registrations[(name, version)]
            if self.healthy and self.client is not None:
                with contextlib.suppress(GatewayError):
                    await self.client.manage(
                        "DELETE", f"/models/{name}/{version}", f"model '{name}' version {version}"
                    )

    async def _kill_group(self) -> None:
        process = self._process
        if process is None:
            return
        for sig, wait_s in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(process.wait(), wait_s)
            if not _group_alive(process.pid):
                break

    def release(self, shared: SharedResources) -> None:
        """One version no longer needs this TorchServe; the last one schedules its stop."""
        self.users -= 1
        if self.users > 0 or self._closing:
            return
        if self._idle_stop is None or self._idle_stop.done():
            self._idle_stop = asyncio.create_task(
                self._stop_when_idle(shared), name="managed TorchServe idle stop"
            )

    async def _stop_when_idle(self, shared: SharedResources) -> None:
        await asyncio.sleep(shared.idle_stop_s)
        if await shared.release(SHARED_KEY, self, lambda: self.users == 0):
            log.info("managed TorchServe stopped: no model version has used it for %g s", shared.idle_stop_s)

    async def aclose(self) -> None:
        self._closing = True
        self.healthy = False
        idle_stop = self._idle_stop
        if idle_stop is not None and idle_stop is not asyncio.current_task():
            idle_stop.cancel()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await self._kill_group()
        await self._replace_client()
        shutil.rmtree(self.workdir, ignore_errors=True)
        log.info("managed TorchServe stopped")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


SHARED_KEY = "torchserve:managed"


async def managed_torchserve(shared: SharedResources) -> ManagedTorchServe:
    """The gateway's one managed TorchServe, started by the first version that needs it. The
    caller is one more of its users, until it calls `release`."""
    runtime = await shared.get(SHARED_KEY, ManagedTorchServe.create)
    # No await between `get` and this: SharedResources.release cannot run in between.
    runtime.users += 1
    return runtime
