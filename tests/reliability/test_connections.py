"""Hostile connections: a header block over its cap is 431, a connection that does not finish its
headers in time or idles past keep-alive is closed, connections past the cap are answered 503 at
once, and slowloris plus unfinished 8 MB headers leave the gateway serving with bounded memory.
gRPC holds its own bounds: metadata size and a handshake timeout."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from gateway.tools.hostile import HostileConnections, PeakRss
from tests.support import RunningGateway, grpc_server, start_gateway

MIB = 2**20
GOOD = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
HEADER_TIMEOUT_S = 2.0
KEEPALIVE_S = 1.0
MAX_CONNECTIONS = 24
GUARDED_ENV = {
    "MODELYARD_HTTP_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
    "MODELYARD_HTTP_KEEPALIVE_TIMEOUT_S": str(KEEPALIVE_S),
    "MODELYARD_HTTP_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    "MODELYARD_GRPC_HANDSHAKE_TIMEOUT_S": str(HEADER_TIMEOUT_S),
}


@pytest.fixture(scope="module")
def guarded(small_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    log = tmp_path_factory.mktemp("guarded") / "gateway.log"
    running = start_gateway(small_repo, log, env=GUARDED_ENV)
    yield running
    assert running.stop() == 0
    assert "Traceback" not in running.output(), running.output()[-3000:]


def connect(gateway: RunningGateway) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gateway.http_port), timeout=10)


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """Sends what the gateway will take: it may answer and close before the client is done."""
    with contextlib.suppress(OSError):
        sock.sendall(data)


def read_answer(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything the gateway sends until it closes the connection (or `timeout` passes)."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    return b"".join(chunks)


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the gateway closed the connection, or None if it still holds it."""
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - started


CLOSED = "modelyard_connections_closed_total"


def closed_count(gateway: RunningGateway, protocol: str, reason: str) -> float:
    """How many connections the gateway says it shut on `protocol` for `reason`."""
    return gateway.metric(CLOSED, protocol=protocol, reason=reason)


def assert_still_serving(gateway: RunningGateway) -> None:
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        assert client.post("/v2/models/affine/infer", json=GOOD).status_code == 200


@pytest.mark.parametrize(
    "header",
    [b"X-Big: " + b"a" * MIB + b"\r\n", b"X-Big: " + b"a" * (8 * MIB) + b"\r\n",
     b"".join(b"X-Header-%05d: value\r\n" % i for i in range(10_000))],
    ids=["1 MB header", "8 MB header", "10000 headers"],
)  # fmt: skip
def test_a_header_block_over_its_cap_is_431(guarded: RunningGateway, header: bytes) -> None:
    counted = closed_count(guarded, "http", "headers_too_large")
    sock = connect(guarded)
    with sock:
        sender = threading.Thread(
            target=send_quietly,
            args=(sock, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n"),
        )
        sender.start()
        answer = read_answer(sock)
        sender.join(30)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 431 Request Header Fields Too Large", answer[:300]
    assert b"connection: close" in rest.lower()
    assert b"MODELYARD_HTTP_MAX_HEADER" in rest
    assert closed_count(guarded, "http", "headers_too_large") == counted + 1
    assert_still_serving(guarded)


def test_a_header_block_under_the_cap_is_served(guarded: RunningGateway) -> None:
    with httpx.Client(base_url=guarded.url, timeout=30) as client:
        answer = client.get("/v2/health/live", headers={"X-Big": "a" * 60_000})
        assert answer.status_code == 200
        many = client.get("/v2/health/live", headers=[(f"x-h{i}", "v") for i in range(200)])
        assert many.status_code == 200


def test_a_connection_that_does_not_finish_its_headers_is_closed(guarded: RunningGateway) -> None:
    counted = closed_count(guarded, "http", "header_timeout")
    silent = connect(guarded)
    trickling = connect(guarded)
    with silent, trickling:
        trickling.sendall(b"POST /v2/models/affine/infer HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        closed = None
        # One byte every 0.3 s: every byte would reset a keep-alive timer, not the header timeout.
        trickling.settimeout(0.3)
        while time.monotonic() - started < HEADER_TIMEOUT_S + 5:
            try:
                trickling.send(b"a")
                if not trickling.recv(65536):
                    closed = time.monotonic() - started
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = time.monotonic() - started
                break
        assert closed is not None and closed < HEADER_TIMEOUT_S + 2, closed
        # The one that sent nothing at all is closed too.
        assert closed_within(silent, 3) is not None
    # Both are counted, under the limit that shut them.
    assert closed_count(guarded, "http", "header_timeout") == counted + 2
    assert_still_serving(guarded)


def test_an_idle_kept_alive_connection_is_closed_after_keep_alive(guarded: RunningGateway) -> None:
    with connect(guarded) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(10)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        waited = closed_within(sock, KEEPALIVE_S + 5)
        assert waited is not None and waited < KEEPALIVE_S + 2, waited


def test_connections_past_the_cap_are_answered_503_at_once(guarded: RunningGateway) -> None:
    counted = closed_count(guarded, "http", "cap")
    held = [connect(guarded) for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in held:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\n")  # unfinished: each holds its place
        time.sleep(0.2)
        started = time.monotonic()
        with connect(guarded) as extra:
            send_quietly(extra, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = read_answer(extra, 5)
        assert time.monotonic() - started < 1.5
        assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
        assert b"MODELYARD_HTTP_MAX_CONNECTIONS" in answer
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    # Read with the held connections gone: the metrics' own request would be over the cap.
    assert closed_count(guarded, "http", "cap") == counted + 1
    assert_still_serving(guarded)


# How each gRPC server refuses metadata over its cap: grpcio ends the call; pygrpc-native's HTTP/2
# ends the connection (GOAWAY ENHANCE_YOUR_CALM), which the client reads as UNAVAILABLE.
METADATA_REFUSED = {
    "grpcio": ("StatusCode.RESOURCE_EXHAUSTED", "StatusCode.INTERNAL"),
    "native": ("StatusCode.UNAVAILABLE",),
}


def test_grpc_metadata_over_its_cap_is_refused_and_serving_goes_on(guarded: RunningGateway) -> None:
    client = triton_grpc.InferenceServerClient(guarded.grpc)
    tensor = triton_grpc.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
    try:
        with pytest.raises(InferenceServerException) as caught:
            client.infer("affine", [tensor], headers={"x-big": "a" * MIB})
        assert caught.value.status() in METADATA_REFUSED[grpc_server()]
        assert client.infer("affine", [tensor]).as_numpy("y").shape == (1, 3)
    finally:
        client.close()


def test_a_grpc_connection_that_never_handshakes_is_closed(guarded: RunningGateway) -> None:
    with socket.create_connection(("127.0.0.1", guarded.grpc_port), timeout=10) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n")  # half of the HTTP/2 preface, then nothing
        waited = closed_within(sock, HEADER_TIMEOUT_S + 8)
        assert waited is not None and waited < HEADER_TIMEOUT_S + 4, waited
    with grpc.insecure_channel(guarded.grpc) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)


GRPC_CAP = 3


def grpc_live(target: str) -> tuple[grpc.Channel, str]:
    """A channel of its own (its own connection) and the outcome of one ServerLive call on it."""
    channel = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    try:
        stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=5)
    except grpc.RpcError as exc:
        return channel, exc.code().name
    return channel, "OK"


def test_grpc_connections_past_the_cap_are_refused_and_the_held_ones_serve_on(
    small_repo: Path, tmp_path: Path
) -> None:
    running = start_gateway(
        small_repo, tmp_path / "gateway.log", env={"MODELYARD_GRPC_MAX_CONNECTIONS": str(GRPC_CAP)}
    )
    channels: list[grpc.Channel] = []
    try:
        held = [grpc_live(running.grpc) for _ in range(GRPC_CAP)]
        channels += [channel for channel, _ in held]
        assert [outcome for _, outcome in held] == ["OK"] * GRPC_CAP
        extra, outcome = grpc_live(running.grpc)
        channels.append(extra)
        assert outcome == "UNAVAILABLE"
        # The native server's cap is the gateway's own, and counted; grpcio's core keeps its own.
        shut = closed_count(running, "grpc", "cap")
        assert shut >= 1 if grpc_server() == "native" else shut == 0
        # The connections held still serve, and the gateway's REST side never noticed.
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channels[0])
        assert stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=5).live
        assert httpx.get(f"{running.url}/v2/health/ready", timeout=10).status_code == 200
    finally:
        for channel in channels:
            channel.close()
        assert running.stop() == 0


# The figure: slowloris and unfinished 8 MB headers together ------------------------------------

SLOWLORIS = 500
BIG_HEADERS = 200
ATTACK_S = 6.0


@pytest.fixture(scope="module")
def attacked(small_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """Default limits, but a header timeout short enough to watch the slowloris connections go."""
    log = tmp_path_factory.mktemp("attacked") / "gateway.log"
    running = start_gateway(small_repo, log, env={"MODELYARD_HTTP_HEADER_TIMEOUT_S": "3"})
    yield running
    assert running.stop() == 0


def test_slowloris_and_unfinished_big_headers_leave_serving_and_memory_alone(
    attacked: RunningGateway,
) -> None:
    """500 connections trickling a header byte each second and 200 each sending an 8 MB header
    that never ends: normal requests go on being answered, RSS grows by at most 64 MiB, each
    slowloris connection is closed at the header timeout and each big header answered 431."""
    with httpx.Client(base_url=attacked.url, timeout=30) as client:
        for _ in range(20):
            assert client.post("/v2/models/affine/infer", json=GOOD).status_code == 200
        answers: Counter[int | str] = Counter()
        attack = HostileConnections(attacked.http_port, SLOWLORIS, BIG_HEADERS, trickle_s=1.0)
        with PeakRss(attacked.process.pid) as memory, attack:
            until = time.monotonic() + ATTACK_S
            while time.monotonic() < until:
                try:
                    answers[client.post("/v2/models/affine/infer", json=GOOD).status_code] += 1
                except httpx.TransportError as exc:
                    answers[type(exc).__name__] += 1
                time.sleep(0.05)
            outcome = attack.outcome()
    assert set(answers) == {200} and answers[200] > 20, answers
    growth = (memory.peak - memory.before) / MIB
    assert growth <= 64, f"RSS grew {growth:.1f} MiB under the attack"
    assert outcome == {"slowloris still held": 0, "big headers answered 431": BIG_HEADERS}, outcome
