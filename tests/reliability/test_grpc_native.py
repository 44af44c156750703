"""The gRPC connection limits on both servers, and the native server's watch on its own: an idle
connection is closed, the cap keeps the oldest connections and shuts the newest, a connection that
sends no HTTP/2 preface is shut at the handshake timeout, and the native server refuses TLS and
says what to install where pygrpc-native is missing; `auto` picks it unless TLS is on or it is
missing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pygrpc_native.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from gateway.context import deadline_after
from gateway.grpc_native import HANDSHAKE_BYTES, MISSING, ConnectionWatch
from gateway.settings import Settings
from tests.support import ROOT, free_port, start_gateway

# The client's connection preface, then an empty SETTINGS frame: a handshake and nothing more.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
IDLE_S = 1.0


def closed_within(sock: socket.socket, limit_s: float) -> float | None:
    """Seconds until the peer closed `sock` (what it sends read and dropped), or None."""
    started = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - started < limit_s:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - started
    return None


@pytest.mark.parametrize("server", ["grpcio", "native"])
def test_an_idle_grpc_connection_is_closed(small_repo: Path, tmp_path: Path, server: str) -> None:
    running = start_gateway(
        small_repo,
        tmp_path / "gateway.log",
        env={"MODELYARD_GRPC_SERVER": server, "MODELYARD_GRPC_MAX_CONNECTION_IDLE_S": str(IDLE_S)},
    )
    try:
        with socket.create_connection(("127.0.0.1", running.grpc_port), timeout=10) as sock:
            sock.sendall(PREFACE)
            waited = closed_within(sock, IDLE_S + 8)
        assert waited is not None and IDLE_S - 0.2 <= waited < IDLE_S + 4, waited
        # The status says which server runs, in its JSON and on its page.
        assert httpx.get(f"{running.url}/status", timeout=10).json()["grpc_server"] == server
        assert f"gRPC server {server}" in httpx.get(f"{running.url}/", timeout=10).text
        # The native server's closes are the gateway's own, and counted; grpcio's core keeps its own.
        idle = running.metric("modelyard_connections_closed_total", protocol="grpc", reason="idle")
        assert idle == (1 if server == "native" else 0)
    finally:
        assert running.stop() == 0


def test_the_native_server_refuses_tls(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("")
    with pytest.raises(ValidationError, match="native gRPC server has no TLS"):
        Settings(grpc_server="native", tls_certfile=pem, tls_keyfile=pem)


def test_auto_is_the_native_server_unless_tls_is_on(tmp_path: Path) -> None:
    assert Settings(grpc_server="auto").grpc_server == "native"
    pem = tmp_path / "x.pem"
    pem.write_text("")
    assert Settings(grpc_server="auto", tls_certfile=pem, tls_keyfile=pem).grpc_server == "grpcio"
    assert Settings(grpc_server="grpcio").grpc_server == "grpcio"


def without_pygrpc_native(tmp_path: Path) -> dict[str, str]:
    """An environment in which `import pygrpc_native` fails, as where no wheel was installed."""
    shim = tmp_path / "shim" / "pygrpc_native"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'pygrpc_native'\")\n")
    return {"PYTHONPATH": str(shim.parent)}


def test_without_pygrpc_native_auto_serves_grpc_on_grpcio(small_repo: Path, tmp_path: Path) -> None:
    env = {**without_pygrpc_native(tmp_path), "MODELYARD_GRPC_SERVER": "auto"}
    running = start_gateway(small_repo, tmp_path / "gateway.log", env=env)
    try:
        assert httpx.get(f"{running.url}/status", timeout=10).json()["grpc_server"] == "grpcio"
        with grpc.insecure_channel(f"127.0.0.1:{running.grpc_port}") as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        assert running.stop() == 0


def test_without_pygrpc_native_the_gateway_says_what_to_install(small_repo: Path, tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--model-repo",
        str(small_repo),
        "--host",
        "127.0.0.1",
    ]
    command += ["--http-port", str(free_port()), "--grpc-port", str(free_port())]
    env = {**os.environ, **without_pygrpc_native(tmp_path), "MODELYARD_GRPC_SERVER": "native"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert MISSING in done.stderr + done.stdout, (done.stderr + done.stdout)[-2000:]


def test_no_deadline_from_a_server_reads_as_none() -> None:
    # pygrpc-native reports sys.maxsize seconds where a call has no deadline.
    assert deadline_after(float(2**63 - 1)) is None
    deadline = deadline_after(5.0)
    assert deadline is not None and 4.9 < deadline - time.monotonic() <= 5.0


# The watch, on sockets of this process --------------------------------------------------------


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock


def connect(listener: socket.socket, greeting: bytes) -> tuple[socket.socket, socket.socket]:
    """(client, accepted) of one connection that has sent `greeting`."""
    client = socket.create_connection(listener.getsockname(), timeout=5)
    accepted, _ = listener.accept()
    if greeting:
        client.sendall(greeting)
    return client, accepted


def is_shut(client: socket.socket) -> bool:
    return closed_within(client, 1.0) is not None


def test_the_watch_keeps_the_oldest_connections_up_to_the_cap(listener: socket.socket) -> None:
    watch = ConnectionWatch(max_connections=2, handshake_timeout_s=60, idle_s=60)
    watch.port = listener.getsockname()[1]
    pairs = [connect(listener, PREFACE) for _ in range(2)]
    watch.sweep()
    late = connect(listener, PREFACE)
    pairs.append(late)
    try:
        watch.sweep()
        assert [is_shut(client) for client, _ in pairs] == [False, False, True]
        assert watch.closed["cap"] == 1 and watch.open_connections == 2
        # A call on a held connection is admitted; one from the shut connection is refused.
        watch.admit(f"ipv4:127.0.0.1:{pairs[0][0].getsockname()[1]}")
        with pytest.raises(Exception, match="holds its 2 gRPC connections"):
            watch.admit(f"ipv4:127.0.0.1:{late[0].getsockname()[1]}")
    finally:
        for client, accepted in pairs:
            client.close()
            accepted.close()


def test_the_watch_shuts_a_connection_without_a_handshake(listener: socket.socket) -> None:
    watch = ConnectionWatch(max_connections=10, handshake_timeout_s=0.5, idle_s=60)
    watch.port = listener.getsockname()[1]
    greeted = connect(listener, PREFACE)
    half = connect(listener, PREFACE[: HANDSHAKE_BYTES - 10])
    try:
        watch.sweep()
        assert watch.closed["handshake"] == 0  # not yet: the timeout has not passed
        time.sleep(0.6)
        watch.sweep()
        assert (is_shut(greeted[0]), is_shut(half[0])) == (False, True)
        assert watch.closed == {"cap": 0, "handshake": 1, "idle": 0}
    finally:
        for client, accepted in (greeted, half):
            client.close()
            accepted.close()


def test_the_watch_shuts_a_quiet_connection_and_keeps_a_busy_one(listener: socket.socket) -> None:
    watch = ConnectionWatch(max_connections=10, handshake_timeout_s=60, idle_s=0.5)
    watch.port = listener.getsockname()[1]
    quiet, busy = connect(listener, PREFACE), connect(listener, PREFACE)
    try:
        watch.sweep()
        for _ in range(4):
            time.sleep(0.2)
            busy[0].sendall(b"\0")  # any bytes count as activity
        watch.sweep()
        assert (is_shut(quiet[0]), is_shut(busy[0])) == (True, False)
        assert watch.closed == {"cap": 0, "handshake": 0, "idle": 1}
    finally:
        for client, accepted in (quiet, busy):
            client.close()
            accepted.close()


def test_the_watch_leaves_other_sockets_alone(listener: socket.socket) -> None:
    """Sockets on another port, and those the process opened itself, are not the watch's."""
    watch = ConnectionWatch(max_connections=1, handshake_timeout_s=0, idle_s=0)
    with socket.create_server(("127.0.0.1", 0)) as other:
        watch.port = listener.getsockname()[1]
        client, accepted = connect(other, b"")
        try:
            watch.sweep()
            assert watch.open_connections == 0 and not is_shut(client)
        finally:
            client.close()
            accepted.close()


class _Health(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """Health checks that note each call's peer as the native server reports it."""

    def __init__(self) -> None:
        self.peers: list[str] = []

    async def Check(self, request: Any, context: Any) -> Any:
        self.peers.append(context.peer())
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


@pytest.mark.parametrize("host", ["127.0.0.1", "[::]"])
async def test_the_watch_names_peers_as_the_native_server_does(host: str) -> None:
    """Admission matches a call's `context.peer()` against the sockets' peers, on IPv4 and on a
    dual-stack listener (where an IPv4 client is a mapped IPv6 address)."""
    health = _Health()
    server = pygrpc_native.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    watch = ConnectionWatch(max_connections=1, handshake_timeout_s=60, idle_s=60)
    watch.port = server.add_insecure_port(f"{host}:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{watch.port}") as channel:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            watch.sweep()
            assert watch.open_connections == 1
            watch.admit(health.peers[0])  # held: admitted
            watch.admit(health.peers[0])
    finally:
        await server.stop(0)
    assert len(health.peers) == 1 and health.peers[0].startswith(
        "ipv6:[::ffff:" if host == "[::]" else "ipv4:"
    )


SILENT = 300


@pytest.mark.parametrize("server", ["grpcio", "native"])
def test_hundreds_of_silent_connections_are_closed_and_calls_go_on(
    small_repo: Path, tmp_path: Path, server: str
) -> None:
    """300 connections that never send a byte: each is closed at the handshake timeout (the native
    server's watch sees them all in one sweep), while calls on a real channel are answered."""
    timeout_s = 2.0
    running = start_gateway(
        small_repo,
        tmp_path / "gateway.log",
        env={"MODELYARD_GRPC_SERVER": server, "MODELYARD_GRPC_HANDSHAKE_TIMEOUT_S": str(timeout_s)},
    )
    silent: list[socket.socket] = []
    try:
        silent = [
            socket.create_connection(("127.0.0.1", running.grpc_port), timeout=10) for _ in range(SILENT)
        ]
        opened = time.monotonic()
        with grpc.insecure_channel(running.grpc) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            answered = 0
            while time.monotonic() - opened < timeout_s + 1:
                answered += stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
                time.sleep(0.05)
        assert answered > 20
        # Each server sends its SETTINGS first; then the connection must end.
        held = sum(
            closed_within(sock, max(0.2, opened + timeout_s + 4 - time.monotonic())) is None
            for sock in silent
        )
        assert held == 0 and time.monotonic() - opened < timeout_s + 4.5
    finally:
        for sock in silent:
            sock.close()
        assert running.stop() == 0
