"""The composition root: builds every part from one Settings object and runs REST and gRPC
in one event loop, with a graceful shutdown. Under `--workers N` the supervisor
(gateway/supervisor.py) runs N of these, each a worker that shares the two ports."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import service_pb2_grpc

from adapters import SharedResources, create_adapter
from gateway.allocator import tune_malloc
from gateway.auth import Authorizer
from gateway.breaker import Breakers, guard_observer
from gateway.codec import InputLimits
from gateway.context import ContextBuilder
from gateway.dataplane import DataPlane
from gateway.grpc_native import ConnectionWatch, native_server
from gateway.limits import BodyBudget, Limiter
from gateway.metrics import Metrics
from gateway.native_logs import quiet_start
from gateway.payload_log import PayloadLogs
from gateway.protocols import tfserving_grpc
from gateway.protocols.connections import ConnectionGuard, ConnectionLimits
from gateway.protocols.http import create_app
from gateway.protocols.shared_memory import SharedMemoryRegions
from gateway.protocols.v2_grpc import (
    INFER_DESERIALIZERS,
    SERVICE_NAME,
    ErrorInterceptor,
    GuardedServer,
    InferenceServicer,
)
from gateway.recording import Recorder
from gateway.registry import AdapterFactory, Registry
from gateway.residency import Residency
from gateway.routing import Router
from gateway.settings import Settings
from gateway.status import StatusReader
from gateway.tracing import Tracer
from gateway.workers import LOAD_REFRESH_S, WorkerRole, reuse_port_socket

log = logging.getLogger("modelyard")

# Seconds the servers get, once every accepted request has its answer, to send them.
SEND_GRACE_S = 2.0


class StartupError(Exception):
    """The gateway cannot start as configured: a message for the operator; the CLI exits with it."""


class _UvicornServer(uvicorn.Server):
    """uvicorn without its own signal handling: the gateway stops REST and gRPC together."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Gateway:
    def __init__(
        self,
        settings: Settings,
        adapter_factory: AdapterFactory = create_adapter,
        worker: WorkerRole | None = None,
    ) -> None:
        """`worker`: this gateway is one of `--workers N`, started by the supervisor."""
        self.settings = settings
        self.worker = worker
        self.metrics = Metrics(multiprocess_dir=worker.metrics_dir if worker is not None else None)
        shared = SharedResources(
            Breakers(observe=guard_observer(self.metrics)),
            may_start_servers=worker is None,
            idle_stop_s=settings.torchserve_idle_stop_s,
        )
        self.registry = Registry(
            settings.model_repo,
            adapter_factory,
            self.metrics,
            shared,
            model_name=settings.model_name,
            load_mode=settings.load_mode,
            residency=Residency(settings.model_memory_budget_bytes, self.metrics),
        )
        global_limiter = None
        if settings.global_max_inflight is not None:
            global_limiter = Limiter(
                settings.global_max_inflight, settings.global_max_queue, "the gateway", scope="global"
            )
        self._global_limiter = global_limiter
        try:
            self.tracer = Tracer.from_settings(settings)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        self.dataplane = DataPlane(
            self.registry,
            Router(),
            self.metrics,
            global_limiter=global_limiter,
            enable_repository_api=settings.enable_repository_api,
            tracer=self.tracer,
            payloads=PayloadLogs(self.metrics),
            recorder=Recorder(settings.record_dir, self.metrics, settings.workers),
        )
        self.metrics.watch_load(self.registry.load_levels, self._gateway_load)
        self.status = StatusReader(
            self.dataplane,
            self.metrics,
            settings.enable_repository_api,
            worker_table=worker.table if worker is not None else None,
            grpc_server=settings.grpc_server,
        )
        self.limits = InputLimits.from_settings(settings)
        self.connections = ConnectionGuard(
            ConnectionLimits.from_settings(settings), on_close=self._count_closed("http")
        )
        self.body_budget = BodyBudget(settings.max_inflight_body_bytes)
        # Every front door builds its requests' contexts with this one builder.
        self.contexts = ContextBuilder(settings.priority_header)
        try:
            self.authorizer = Authorizer.from_settings(settings)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        # The system shared-memory regions clients register, one namespace for REST and gRPC.
        self.shared_memory = SharedMemoryRegions(settings.allow_client_shm, budget=self.body_budget)
        self.app = create_app(
            self.dataplane,
            self.metrics,
            self.status,
            self.contexts,
            self.limits,
            self.authorizer,
            self.body_budget,
            regions=self.shared_memory,
        )
        self._health = health.aio.HealthServicer()
        self._grpc: grpc.aio.Server | None = None
        # The native gRPC server's connection limits, and the task that keeps them.
        self._watch: ConnectionWatch | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._http: _UvicornServer | None = None
        self._http_task: asyncio.Task[None] | None = None
        self._poller: asyncio.Task[None] | None = None
        self._load_writer: asyncio.Task[None] | None = None
        self._services: list[str] = [SERVICE_NAME]

    def _gateway_load(self) -> tuple[int, int]:
        """(requests accepted and not yet answered, requests queued across models and the global cap)."""
        waiting = sum(model.limiter.queued for model in self.registry.models())
        if self._global_limiter is not None:
            waiting += self._global_limiter.queued
        return self.dataplane.accepted, waiting

    async def start(self) -> None:
        settings = self.settings
        if not settings.model_repo.is_dir():
            raise StartupError(f"model repository {settings.model_repo} is not a folder")
        await self.dataplane.load_all()
        if settings.poll_interval_s is not None:
            self._poller = asyncio.create_task(self._poll_forever(settings.poll_interval_s))
        if self.worker is not None:
            self._load_writer = asyncio.create_task(self._write_load_forever())
        await self._start_grpc()
        await self._start_http()
        self.dataplane.mark_started()
        for service in ("", *self._services):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "modelyard ready: HTTP on %s:%d, gRPC on %s:%d, models from %s",
            settings.host,
            settings.http_port,
            settings.host,
            settings.grpc_port,
            settings.model_repo,
        )

    async def _poll_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.registry.poll()
            except Exception:  # one bad scan must not end polling
                log.exception("polling the model repository failed")

    async def _write_load_forever(self) -> None:
        while True:
            self.metrics.refresh_load()
            await asyncio.sleep(LOAD_REFRESH_S)

    def _grpc_options(self) -> list[tuple[str, int]]:
        settings = self.settings
        message = settings.grpc_max_message_mb * 1024 * 1024
        metadata = settings.grpc_max_metadata_kb * 1024
        return [
            ("grpc.max_receive_message_length", message),
            ("grpc.max_send_message_length", message),
            # gRPC's soft limit refuses some calls past it and its hard one all: one bound here.
            ("grpc.max_metadata_size", metadata),
            ("grpc.absolute_max_metadata_size", metadata),
            ("grpc.max_allowed_incoming_connections", settings.grpc_max_connections),
            ("grpc.server_handshake_timeout_ms", int(settings.grpc_handshake_timeout_s * 1000)),
            ("grpc.max_connection_idle_ms", int(settings.grpc_max_connection_idle_s * 1000)),
            ("grpc.max_concurrent_streams", settings.grpc_max_concurrent_streams),
            # On by default on Linux; the workers' shared port depends on it, so it is said.
            ("grpc.so_reuseport", 1),
        ]

    def _count_closed(self, protocol: str) -> Callable[[str], None]:
        """What a front door's connection limits call with the reason of each connection they shut."""
        counter = self.metrics.connections_closed

        def count(reason: str) -> None:
            counter.labels(protocol, reason).inc()

        return count

    def _grpc_server(self) -> grpc.aio.Server:
        if self.settings.grpc_server == "grpcio":
            return grpc.aio.server(options=self._grpc_options())
        try:
            server = native_server(self._grpc_options())
        except ImportError as exc:
            raise StartupError(str(exc)) from exc
        settings = self.settings
        self._watch = ConnectionWatch(
            settings.grpc_max_connections,
            settings.grpc_handshake_timeout_s,
            settings.grpc_max_connection_idle_s,
            on_close=self._count_closed("grpc"),
        )
        return server

    async def _start_grpc(self) -> None:
        server = self._grpc_server()
        watch = self._watch
        # The unary services register through the guard, which maps errors and checks access.
        guarded = ErrorInterceptor(
            self.authorizer, INFER_DESERIALIZERS, admission=None if watch is None else watch.admit
        ).guarding(server)
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(
                self.dataplane,
                self.contexts,
                self.limits,
                authorizer=self.authorizer,
                stream_concurrency=self.settings.grpc_stream_max_inflight,
                server_timing=self.settings.grpc_server_timing,
                regions=self.shared_memory,
            ),
            guarded,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, guarded)
        self._services = [SERVICE_NAME, *self._add_tfserving_services(guarded)]
        # Reflection is a streaming service, which the guard leaves alone; it tells an aio server
        # from a sync one by its type, so it registers on the server itself.
        reflection.enable_server_reflection(
            (
                *self._services,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        address = f"{self.settings.host}:{self.settings.grpc_port}"
        try:
            credentials = self._grpc_credentials()
            if credentials is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, credentials)
        except (RuntimeError, OSError) as exc:
            raise StartupError(f"cannot listen for gRPC on {address}: {exc}") from exc
        await server.start()
        self._grpc = server
        if watch is not None:
            watch.port = port
            self._watch_task = asyncio.create_task(watch.run())

    def _grpc_credentials(self) -> grpc.ServerCredentials | None:
        certfile, keyfile = self.settings.tls_certfile, self.settings.tls_keyfile
        if certfile is None or keyfile is None:
            return None
        try:
            pair = (keyfile.read_bytes(), certfile.read_bytes())
        except OSError as exc:
            raise StartupError(f"cannot read the TLS certificate or key: {exc}") from exc
        return grpc.ssl_server_credentials([pair])

    def _add_tfserving_services(self, server: GuardedServer) -> list[str]:
        """TF Serving's gRPC services, where the tensorflow extra is installed; else none."""
        missing = tfserving_grpc.missing()
        if missing is not None:
            log.info("TF Serving gRPC API not served: no %s (pip install 'modelyard[tensorflow]')", missing)
            return []
        return tfserving_grpc.add_to_server(
            self.dataplane, self.contexts, server, self.limits, self.settings.grpc_server_timing
        )

    async def _start_http(self) -> None:
        config = uvicorn.Config(
            self.app,
            host=self.settings.host,
            port=self.settings.http_port,
            log_level=self.settings.log_level,
            access_log=False,
            # Nothing in the gateway reads the client's address, so uvicorn's X-Forwarded-For
            # middleware would only be a layer every request passes through.
            proxy_headers=False,
            # No `server: uvicorn` on every answer: it names the stack to a scanner, and each
            # header an answer carries is checked and lowered by uvicorn per request.
            server_header=False,
            lifespan="off",
            loop="none",
            http=self.connections.protocol_class(),
            timeout_keep_alive=self.settings.http_keepalive_timeout_s,  # type: ignore[arg-type]
            ssl_certfile=self.settings.tls_certfile,
            ssl_keyfile=self.settings.tls_keyfile,
        )
        self._http = _UvicornServer(config)
        address = f"{self.settings.host}:{self.settings.http_port}"
        sockets = None
        if self.worker is not None:
            # Each worker listens on a socket of its own on the shared port.
            try:
                sockets = [reuse_port_socket(self.settings.host, self.settings.http_port)]
            except OSError as exc:
                raise StartupError(f"cannot listen for HTTP on {address}: {exc}") from exc
        self._http_task = asyncio.create_task(self._http.serve(sockets))
        while not self._http.started:
            if self._http_task.done():
                raise StartupError(f"cannot listen for HTTP on {address}")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Drains, then stops, losing no request the gateway has received:
        1. readiness turns false and new inference requests get 503 at once; every answer from
           now on says `Connection: close`, so no client sends another on its connection;
        2. the accepted requests finish (within `shutdown_grace_s` in all);
        3. the HTTP connections close: each once its answer is sent, an idle kept-alive one
           when its keep-alive timeout ends (as it always does), within the same grace;
        4. only then do the listeners close, gRPC's with a GOAWAY that lets its last calls finish;
        5. the backends close (a managed TorchServe with them)."""
        started = time.monotonic()
        grace = self.settings.shutdown_grace_s
        self.dataplane.begin_drain()
        self.connections.begin_drain()
        if self._poller is not None:
            self._poller.cancel()
        await self._health.enter_graceful_shutdown()
        running = self.dataplane.accepted
        if not await self.dataplane.drained(grace):
            log.warning(
                "event=drain_timeout running=%d detail='%d requests still running after %gs'",
                self.dataplane.accepted,
                self.dataplane.accepted,
                grace,
            )
        else:
            log.info("event=drained finished=%d seconds=%.3f", running, time.monotonic() - started)
        quiet_by = min(started + grace, time.monotonic() + self.settings.http_keepalive_timeout_s + 0.5)
        while self.connections.open_connections and time.monotonic() < quiet_by:
            await asyncio.sleep(0.05)
        if self.connections.open_connections:
            log.info("event=connections_closed open=%d", self.connections.open_connections)
        # The answers are ready; a moment more lets the servers write them out.
        if self._http is not None:
            self._http.should_exit = True
        if self._grpc is not None:
            await self._grpc.stop(SEND_GRACE_S)
        if self._watch_task is not None:
            self._watch_task.cancel()
        if self._http_task is not None:
            with contextlib.suppress(asyncio.TimeoutError, SystemExit):
                await asyncio.wait_for(self._http_task, SEND_GRACE_S + 1)
        await self.registry.aclose()
        self.shared_memory.close()
        # Under --workers the drain's figures went on being written for the others to read.
        if self._load_writer is not None:
            self._load_writer.cancel()
        if self.dataplane.payloads is not None:
            await self.dataplane.payloads.aclose()
        if self.dataplane.recorder is not None:
            await self.dataplane.recorder.aclose()
        if self.tracer is not None:
            # Flushes the spans still queued for export.
            await asyncio.to_thread(self.tracer.shutdown)
        # The last requests' held observations: under --workers, into the files the others read.
        self.metrics.flush()
        log.info("modelyard stopped")


async def serve(
    settings: Settings,
    worker: WorkerRole | None = None,
    on_started: Callable[[], None] | None = None,
) -> None:
    gateway = Gateway(settings, worker=worker)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await gateway.start()
        if on_started is not None:
            on_started()
        await stop.wait()
        log.info("shutting down")
    finally:
        await gateway.stop()


def configure_logging(settings: Settings, name: str = "") -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s{name}: %(message)s",
    )
    # httpx logs every backend request at INFO: far too loud for a gateway's hot path.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    # TensorFlow's Python side logs each SavedModel's variables at INFO: the gateway logs the load.
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") != "0":
        logging.getLogger("tensorflow").setLevel(max(logging.WARNING, logging.getLogger().level))


def run(settings: Settings) -> None:
    if settings.workers > 1:
        from gateway.supervisor import supervise

        configure_logging(settings, "[supervisor]")
        code = supervise(settings)
        if code:
            raise SystemExit(code)
        return
    quiet_start()
    configure_logging(settings)
    run_loop(serve(settings), settings)


def run_loop(main: Coroutine[Any, Any, None], settings: Settings) -> None:
    """`main` on the event loop the settings name, in a process that serves (a worker, or the one
    gateway), its allocator set for per-request tensor buffers first."""
    tune_malloc(settings.malloc_mmap_threshold_mb)
    use_uvloop = settings.event_loop != "asyncio"
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            if settings.event_loop == "uvloop":
                raise
            use_uvloop = False
    if use_uvloop:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main)
    else:
        asyncio.run(main)
