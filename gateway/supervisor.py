"""`modelyard serve --workers N`: a supervisor process and N serving processes (workers) on the
same HTTP and gRPC ports.

The supervisor serves nothing itself. It owns what must exist once:
- the two ports: it checks them and holds them (bound, never listening) for the whole run, so a
  worker's restart cannot lose them; each worker listens on the shared port with SO_REUSEPORT,
  and the kernel spreads new connections over the workers that listen;
- the run's folder: every worker's metric values (prometheus-client's multiprocess mode, so any
  worker's /metrics shows the whole gateway) and the table of workers the status shows;
- the workers' lives: one that exits is started again after a bounded backoff, the others serve
  on untouched;
- the drain: SIGTERM (or SIGINT) is passed to every worker, each drains as a single gateway does,
  and the supervisor exits once all have, 0 when all exited 0.

A managed TorchServe must exist once: the supervisor refuses to start with a model that needs
one (such a model can be served from a remote TorchServe instead). The repository API changes the
models of the one worker that answers it, so it is refused too. Each worker scans the repository
on its own poll timer.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from prometheus_client.multiprocess import mark_process_dead

from gateway.repository import Repository, starts_server
from gateway.server import StartupError
from gateway.settings import Settings
from gateway.workers import WorkerRecord, WorkerRole, WorkerTable, reuse_port_socket

log = logging.getLogger("modelyard.supervisor")

# The delay before each consecutive restart of the same worker; past the last, the last.
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
# A worker that served this long has its backoff start again from the first step.
STABLE_AFTER_S = 30.0
# Beyond the drain's own grace: what a worker may take to close its backends and exit.
EXIT_GRACE_S = 15.0
# The longest the supervisor sleeps between looks at its workers.
TICK_S = 0.2


@dataclass(slots=True)
class _Slot:
    """One worker index and the process that serves it now."""

    index: int
    process: BaseProcess | None = None
    messages: Connection | None = None
    started_at: float = 0.0
    started_monotonic: float = 0.0
    ready: bool = False
    restarts: int = 0
    # Consecutive starts that did not last STABLE_AFTER_S.
    failures: int = 0
    restart_at: float | None = None
    # Why its process could not start, as it said before it exited.
    failure: str | None = None


def supervise(settings: Settings) -> int:
    """Runs the workers until a signal ends them; returns the exit status."""
    refuse_what_runs_once(settings)
    http = _reserve(settings.host, settings.http_port, "HTTP")
    grpc = _reserve(settings.host, settings.grpc_port, "gRPC")
    # A port of 0 means any free one: every worker gets the one the supervisor holds.
    settings = settings.model_copy(
        update={"http_port": http.getsockname()[1], "grpc_port": grpc.getsockname()[1]}
    )
    state_dir = Path(tempfile.mkdtemp(prefix="modelyard-workers-"))
    try:
        (state_dir / "metrics").mkdir()
        return Supervisor(settings, state_dir).run()
    finally:
        http.close()
        grpc.close()
        shutil.rmtree(state_dir, ignore_errors=True)


def refuse_what_runs_once(settings: Settings) -> None:
    if settings.enable_repository_api:
        raise StartupError(
            "the repository API cannot be enabled with --workers above 1: a load or unload would "
            "change only the worker that answered it; use --poll-interval to pick up changes"
        )
    if settings.allow_client_shm:
        raise StartupError(
            "client shared memory (MODELYARD_ALLOW_CLIENT_SHM) cannot be allowed with --workers above 1: "
            "a region registers with the worker that answered, and a client's next request may reach "
            "another; serve with one worker to use it"
        )
    repository = Repository(settings.model_repo, settings.model_name)
    needs_server = [
        name for name in repository.names() if starts_server((e := repository.scan(name)).config, e.backend)
    ]
    if needs_server:
        raise StartupError(
            f"--workers above 1 cannot start a managed TorchServe, which model(s) {', '.join(needs_server)} "
            "need: run TorchServe yourself and give each model `torchserve: {mode: remote, ...}`, "
            "or serve with one worker"
        )


def _reserve(host: str, port: int, what: str) -> socket.socket:
    """Holds host:port for the workers; fails where anything else has it."""
    try:
        if port != 0:
            # Without SO_REUSEPORT: fails where any socket has the port, one that shares it too.
            reuse_port_socket(host, port, share=False).close()
        return reuse_port_socket(host, port)
    except OSError as exc:
        raise StartupError(f"cannot listen for {what} on {host}:{port}: {exc}") from None


class Supervisor:
    def __init__(self, settings: Settings, state_dir: Path) -> None:
        self.settings = settings
        self.state_dir = state_dir
        self.slots = [_Slot(index) for index in range(settings.workers)]
        self._stopping = False
        self._signal: str | None = None
        # The exit status of each worker that ended after the signal.
        self._exit_codes: list[int | None] = []
        self._context = multiprocessing.get_context("spawn")
        # Read by the workers' prometheus-client when it loads: they inherit it at spawn.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(state_dir / "metrics")

    def run(self) -> int:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for slot in self.slots:
                self._start(slot)
            self._await_first_start()
            log.info(
                "modelyard ready: %d workers on HTTP %s:%d and gRPC %s:%d (supervisor pid %d)",
                len(self.slots),
                self.settings.host,
                self.settings.http_port,
                self.settings.host,
                self.settings.grpc_port,
                os.getpid(),
            )
            while not self._stopping:
                self._look(TICK_S)
                self._restart_due()
            return self._drain()
        except BaseException:
            self._kill_all()
            raise
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signal = self._signal or signal.Signals(signum).name
        self._stopping = True

    def _start(self, slot: _Slot) -> None:
        receive, send = self._context.Pipe(duplex=False)
        role = WorkerRole(slot.index, self.state_dir)
        process = self._context.Process(
            target=worker_main, args=(self.settings, role, send), name=f"modelyard-worker-{slot.index}"
        )
        process.start()
        send.close()
        slot.process, slot.messages, slot.ready, slot.restart_at = process, receive, False, None
        slot.failure = None
        slot.started_at, slot.started_monotonic = time.time(), time.monotonic()
        log.info("event=worker_started worker=%d pid=%s restarts=%d", slot.index, process.pid, slot.restarts)
        self._write_table()

    def _await_first_start(self) -> None:
        """Until every worker serves; the first that cannot start stops them all."""
        while not all(slot.ready for slot in self.slots):
            if self._stopping:
                return
            for slot, failure in self._look(TICK_S):
                raise StartupError(failure or f"worker {slot.index} exited before it served")

    def _look(self, timeout: float) -> list[tuple[_Slot, str | None]]:
        """Reads the workers' messages and reaps the ones that exited: (slot, why) for each exit."""
        waiting: dict[Connection | int, _Slot] = {}
        for slot in self.slots:
            if slot.process is not None:
                waiting[slot.process.sentinel] = slot
                if slot.messages is not None:
                    waiting[slot.messages] = slot
        exits: list[tuple[_Slot, str | None]] = []
        for ready in wait(list(waiting), timeout):
            if isinstance(ready, Connection):
                slot = waiting[ready]
                try:
                    kind, *detail = ready.recv()
                except (EOFError, OSError):
                    ready.close()
                    slot.messages = None
                    continue
                if kind == "ready":
                    slot.ready = True
                    self._write_table()
                elif kind == "failed":
                    slot.failure = str(detail[0])
        for slot in self.slots:
            process = slot.process
            if process is None or process.is_alive():
                continue
            process.join()
            exits.append((slot, slot.failure))
            self._reap(slot, process)
        return exits

    def _reap(self, slot: _Slot, process: BaseProcess) -> None:
        assert process.pid is not None
        # Its live gauges stop counting; its counters and histograms stay in the totals.
        mark_process_dead(process.pid, str(self.state_dir / "metrics"))  # type: ignore[no-untyped-call]
        if slot.messages is not None:
            slot.messages.close()
        slot.process, slot.messages, slot.ready = None, None, False
        lived = time.monotonic() - slot.started_monotonic
        if self._stopping:
            self._exit_codes.append(process.exitcode)
        slot.failures = 0 if lived >= STABLE_AFTER_S else slot.failures + 1
        if not self._stopping:
            delay = (
                RESTART_BACKOFF_S[min(slot.failures, len(RESTART_BACKOFF_S)) - 1] if slot.failures else 0.0
            )
            slot.restart_at = time.monotonic() + delay
            log.warning(
                "event=worker_exited worker=%d pid=%d code=%s lived_s=%.1f restart_in_s=%.1f",
                slot.index,
                process.pid,
                process.exitcode,
                lived,
                delay,
            )
        self._write_table()

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.process is None and slot.restart_at is not None and slot.restart_at <= now:
                slot.restarts += 1
                self._start(slot)

    def _drain(self) -> int:
        """Every worker drains as a single gateway does; returns 0 when every one exited 0."""
        log.info("event=signal signal=%s workers=%d", self._signal, len(self.slots))
        for slot in self.slots:
            if slot.process is not None and slot.process.pid is not None:
                os.kill(slot.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_grace_s + EXIT_GRACE_S
        while any(slot.process is not None for slot in self.slots):
            if time.monotonic() > deadline:
                log.error("event=workers_killed detail='workers still running after the drain'")
                self._kill_all()
                return 1
            self._look(TICK_S)
        failed = [code for code in self._exit_codes if code != 0]
        log.info(
            "modelyard stopped: %d workers drained, %d exit(s) not 0", len(self._exit_codes), len(failed)
        )
        return 1 if failed else 0

    def _kill_all(self) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.is_alive():
                slot.process.kill()
                slot.process.join(5)

    def _write_table(self) -> None:
        rows = [
            WorkerRecord(s.index, s.process.pid or 0, s.started_at, s.restarts, s.ready)
            for s in self.slots
            if s.process is not None
        ]
        WorkerTable(os.getpid(), rows).write(self.state_dir / "workers.json")


def worker_main(settings: Settings, role: WorkerRole, messages: Connection) -> None:
    """One worker: a gateway on the shared ports that tells the supervisor when it serves, and
    drains if the supervisor is gone."""
    from gateway.native_logs import quiet_start
    from gateway.server import StartupError, configure_logging, run_loop, serve

    quiet_start()
    configure_logging(settings, f"[worker {role.index}]")
    _drain_when_orphaned()
    try:
        run_loop(serve(settings, role, lambda: messages.send(("ready",))), settings)
    except StartupError as exc:
        messages.send(("failed", f"worker {role.index}: {exc}"))
        sys.exit(1)


def _drain_when_orphaned() -> None:
    """A worker whose supervisor died (killed, so it could not pass the signal on) drains itself."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()
