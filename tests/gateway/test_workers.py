"""`modelyard serve --workers 2`, as users run it: two worker processes on the same ports under a
supervisor. Which worker holds a connection is read from the workers' own sockets (psutil), so
each test knows that both served, which one a request ran on, and which one it killed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import psutil
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from gateway.native_logs import is_noise
from gateway.request_series import FLUSH_S
from scripts.build_models import _save, build_affine
from tests.reliability.test_drain import (
    GRPC_CLIENTS,
    KEEPALIVE_CLIENTS,
    LONG_N,
    STEADY_N,
    Answer,
    grpc_client,
    rest_keepalive_client,
    spin_body,
)
from tests.reliability.test_faults import metric
from tests.reliability.test_overload import expected_sum
from tests.support import ROOT, RunningGateway, free_port, start_gateway, torchserve_missing
from tests.support.model_builders import build_spin

WORKERS = 2
# Times a load client sends a request that met a reset connection (50 ms apart).
RESENDS = 40
# How long the tests wait for the workers to start (two of them share this machine's cores).
START_S = 120


def build_repo(repo: Path) -> Path:
    _save(build_affine(1), repo / "affine" / "1" / "model.onnx")
    _save(build_spin(), repo / "spin" / "1" / "model.onnx")
    (repo / "spin" / "config.yaml").write_text(
        "backend: onnxruntime\nlimits: {max_inflight: 2, max_queue: 64}\n"
    )
    return repo


def start_workers(repo: Path, log: Path, *, from_environment: bool = False) -> RunningGateway:
    """`--workers 2`, or MODELYARD_WORKERS=2."""
    env = {"MODELYARD_SHUTDOWN_GRACE_S": "20"}
    if from_environment:
        gateway = start_gateway(repo, log, env={**env, "MODELYARD_WORKERS": str(WORKERS)})
    else:
        gateway = start_gateway(repo, log, "--workers", str(WORKERS), env=env)
    wait_workers(gateway, lambda rows: all(row["ready"] for row in rows))
    return gateway


@pytest.fixture(scope="module")
def workers_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    repo = build_repo(tmp_path_factory.mktemp("workers_repo"))
    gateway = start_workers(repo, tmp_path_factory.mktemp("workers") / "gateway.log")
    yield gateway
    assert gateway.stop(60) == 0, gateway.output()[-3000:]
    assert "Traceback" not in gateway.output(), gateway.output()[-3000:]
    # Each worker imports TensorFlow (TF Serving's front door) inside the start-up filter too.
    noise = [line for line in gateway.output().splitlines() if is_noise(line)]
    assert not noise, noise


def wait_workers(
    gateway: RunningGateway, holds: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    """The status's workers once there are WORKERS of them and `holds` is true of them."""
    deadline = time.monotonic() + START_S
    while True:
        try:
            rows: list[dict[str, Any]] = httpx.get(f"{gateway.url}/status", timeout=10).json()["workers"]
        except (httpx.ConnectError, httpx.ReadError):  # see the killed worker's test
            assert time.monotonic() < deadline
            time.sleep(0.05)
            continue
        if len(rows) == WORKERS and holds(rows):
            return rows
        assert time.monotonic() < deadline, rows
        time.sleep(0.1)


def peers(pids: list[int], port: int) -> dict[int, set[int]]:
    """For each worker, the client ports of its established connections on `port`."""
    found: dict[int, set[int]] = {}
    for pid in pids:
        connections = psutil.Process(pid).net_connections(kind="tcp")
        found[pid] = {
            c.raddr.port
            for c in connections
            if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port and c.raddr
        }
    return found


def running(pid: int) -> bool:
    """Neither gone nor a zombie (dead, its sockets closed, not yet reaped)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def owner_of_new_connection(pids: list[int], port: int, before: dict[int, set[int]]) -> int | None:
    after = peers(pids, port)
    owners = [pid for pid in pids if after[pid] - before[pid]]
    assert len(owners) <= 1, (before, after)
    return owners[0] if owners else None


def affine_expected(repo: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(repo / "affine" / "1" / "model.onnx"))
    result: np.ndarray = session.run(None, {"x": x})[0]
    return result


def affine_json(x: np.ndarray) -> dict[str, object]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}


def test_two_workers_serve_rest_and_grpc_and_metrics_count_both(workers_gateway: RunningGateway) -> None:
    gateway = workers_gateway
    pids = [row["pid"] for row in wait_workers(gateway, lambda rows: True)]
    assert len(set(pids)) == WORKERS and workers_gateway.process.pid not in pids
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    expected = affine_expected(gateway.repo, x)
    base = metric(gateway, "modelyard_requests_total", model="affine")
    sent = 0

    # REST: kept-alive clients, opened until each worker holds at least one of them.
    rest: dict[int, list[httpx.Client]] = {pid: [] for pid in pids}
    while any(not clients for clients in rest.values()):
        assert sum(map(len, rest.values())) < 40, "the kernel sent every connection to one worker"
        client = httpx.Client(base_url=gateway.url, timeout=30)
        before = peers(pids, gateway.http_port)
        answer = client.post("/v2/models/affine/infer", json=affine_json(x))
        sent += 1
        assert answer.status_code == 200, answer.text
        owner = owner_of_new_connection(pids, gateway.http_port, before)
        assert owner is not None
        rest[owner].append(client)
    for clients in rest.values():
        for client in clients:
            for _ in range(5):
                answer = client.post("/v2/models/affine/infer", json=affine_json(x))
                sent += 1
                got = np.array(answer.json()["outputs"][0]["data"], dtype=np.float32).reshape(2, 3)
                np.testing.assert_allclose(got, expected, rtol=1e-6)
            client.close()

    # gRPC: tritonclient's channels, one connection each, the same way.
    grpc: dict[int, list[triton_grpc.InferenceServerClient]] = {pid: [] for pid in pids}
    tensor = triton_grpc.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    while any(not clients for clients in grpc.values()):
        assert sum(map(len, grpc.values())) < 40, "the kernel sent every gRPC connection to one worker"
        # A subchannel pool of its own: a new channel is a new connection.
        grpc_client_ = triton_grpc.InferenceServerClient(
            gateway.grpc, channel_args=[("grpc.use_local_subchannel_pool", 1)]
        )
        before = peers(pids, gateway.grpc_port)
        np.testing.assert_allclose(grpc_client_.infer("affine", [tensor]).as_numpy("y"), expected, rtol=1e-6)
        sent += 1
        owner = owner_of_new_connection(pids, gateway.grpc_port, before)
        assert owner is not None
        grpc[owner].append(grpc_client_)
    for grpc_clients in grpc.values():
        for grpc_client_ in grpc_clients:
            for _ in range(5):
                np.testing.assert_allclose(
                    grpc_client_.infer("affine", [tensor]).as_numpy("y"), expected, rtol=1e-6
                )
                sent += 1
            grpc_client_.close()

    # Any worker's /metrics counts every worker's requests: the sum is all that were sent, once
    # each worker has written its last ones (at most FLUSH_S after they were answered).
    deadline = time.monotonic() + 10 * FLUSH_S
    while (counted := metric(gateway, "modelyard_requests_total", model="affine") - base) < sent:
        assert time.monotonic() < deadline, (counted, sent)
        time.sleep(FLUSH_S / 4)
    assert counted == sent
    assert metric(gateway, "modelyard_model_ready", model="affine") == 1
    page = httpx.get(f"{gateway.url}/").text
    assert 'id="workers"' in page and all(f"<td>{pid}</td>" in page for pid in pids)


def test_a_killed_worker_is_restarted_and_the_other_serves_on(workers_gateway: RunningGateway) -> None:
    gateway = workers_gateway
    rows = wait_workers(gateway, lambda rows: all(row["ready"] for row in rows))
    pids = [row["pid"] for row in rows]
    x = np.ones((1, 4), dtype=np.float32)
    expected = affine_expected(gateway.repo, x)

    # A long request runs on one worker (the survivor); the other is killed while it runs.
    long_client = httpx.Client(base_url=gateway.url, timeout=120)
    long_answer: dict[str, httpx.Response] = {}
    before = peers(pids, gateway.http_port)
    runner = threading.Thread(
        target=lambda: long_answer.update(r=long_client.post("/v2/models/spin/infer", json=spin_body(LONG_N)))
    )
    runner.start()
    deadline = time.monotonic() + 10
    while (survivor := owner_of_new_connection(pids, gateway.http_port, before)) is None:
        assert time.monotonic() < deadline, "the long request's connection did not appear"
        time.sleep(0.01)
    # Any worker's /metrics (each read on a new connection) shows it running, and the one
    # request only: the other worker's figures add nothing.
    deadline = time.monotonic() + 10
    while metric(gateway, "modelyard_inflight_requests", model="spin") != 1:
        assert time.monotonic() < deadline, "the long request is not in the in-flight gauge"
        time.sleep(0.05)
    assert [metric(gateway, "modelyard_inflight_requests", model="spin") for _ in range(6)] == [1.0] * 6
    victim = next(pid for pid in pids if pid != survivor)
    victim_index = next(row["index"] for row in rows if row["pid"] == victim)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    # Dead once a zombie: its sockets are closed, new connections go to the survivor alone.
    while running(victim):
        time.sleep(0.01)

    outcomes: list[str] = []
    # Requests that met a reset connection first and were sent again, as a client retries one.
    resent: list[str] = []
    restarted = threading.Event()

    def note_resent(why: str, attempt: int) -> None:
        if attempt == 0:
            resent.append(why)

    def rest_load() -> None:
        while not restarted.is_set():
            for attempt in range(RESENDS):
                try:
                    answer = httpx.post(
                        f"{gateway.url}/v2/models/affine/infer", json=affine_json(x), timeout=30
                    )
                    break
                except (httpx.ConnectError, httpx.ReadError) as exc:
                    note_resent(f"{time.monotonic() - killed_at:.2f} s after the kill: {exc!r}", attempt)
                    time.sleep(0.05)
            else:
                outcomes.append("never answered")
                continue
            got = np.array(answer.json()["outputs"][0]["data"], dtype=np.float32).reshape(1, 3)
            outcomes.append("ok" if answer.status_code == 200 and np.allclose(got, expected) else answer.text)

    def grpc_load() -> None:
        client = triton_grpc.InferenceServerClient(gateway.grpc)
        tensor = triton_grpc.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(x)
        while not restarted.is_set():
            for attempt in range(RESENDS):
                try:
                    got = client.infer("affine", [tensor], client_timeout=30).as_numpy("y")
                    break
                except InferenceServerException as exc:
                    if exc.status() != "StatusCode.UNAVAILABLE":
                        raise
                    note_resent(f"{time.monotonic() - killed_at:.2f} s after the kill: {exc}", attempt)
                    time.sleep(0.05)
            else:
                outcomes.append("never answered")
                continue
            outcomes.append("ok" if np.allclose(got, expected) else "wrong")
        client.close()

    load = [threading.Thread(target=rest_load), threading.Thread(target=grpc_load)]
    for thread in load:
        thread.start()
    try:
        rows = wait_workers(
            gateway,
            lambda rows: any(
                row["index"] == victim_index and row["pid"] != victim and row["ready"] for row in rows
            ),
        )
        time.sleep(0.5)  # requests on, with the new worker listening
    finally:
        restarted.set()
        for thread in load:
            thread.join(30)
    runner.join(120)
    long_client.close()

    replaced = next(row for row in rows if row["index"] == victim_index)
    assert replaced["restarts"] == 1 and replaced["pid"] not in pids
    assert next(row for row in rows if row["pid"] == survivor)["restarts"] == 0
    # The request in flight on the other worker got its full answer; every request sent after
    # the kill was answered, correctly.
    answer = long_answer["r"]
    assert answer.status_code == 200
    assert np.isclose(answer.json()["outputs"][0]["data"][0], expected_sum(LONG_N), rtol=1e-5)
    assert outcomes and set(outcomes) == {"ok"}, [o for o in outcomes if o != "ok"][:3]
    # Now and then the kernel resets a new connection made while it closes the dead worker's
    # listener (about 0.1 s after the kill, here): a client's retry gets its answer. Any more
    # than a few would be a fault.
    assert len(resent) <= max(5, len(outcomes) // 20), resent[:5]
    assert f"event=worker_exited worker={victim_index} pid={victim} code=-9" in gateway.output()

    # The new worker serves too.
    new_pids = [row["pid"] for row in rows]
    for _ in range(40):
        with httpx.Client(base_url=gateway.url, timeout=30) as client:
            before = peers(new_pids, gateway.http_port)
            assert client.post("/v2/models/affine/infer", json=affine_json(x)).status_code == 200
            if owner_of_new_connection(new_pids, gateway.http_port, before) == replaced["pid"]:
                break
    else:
        raise AssertionError("no connection reached the restarted worker")


def test_sigterm_drains_every_worker_losing_no_request(tmp_path: Path) -> None:
    """SIGTERM to the supervisor: each worker drains as a single gateway does; every request any
    of them received is answered, and the supervisor exits 0 once they all have."""
    gateway = start_workers(build_repo(tmp_path / "repo"), tmp_path / "gateway.log", from_environment=True)
    # Both serving before the clients connect: the kernel spreads connections only over the
    # listeners there are when they arrive.
    pids = [row["pid"] for row in wait_workers(gateway, lambda rows: all(row["ready"] for row in rows))]
    url = f"{gateway.url}/v2/models/spin/infer"
    # Twice the single gateway's clients: the kernel puts each connection on a worker by a hash
    # of its address, and with 6 all of them landed on one worker in about one run in 32.
    rest: list[list[Answer]] = [[] for _ in range(2 * KEEPALIVE_CLIENTS)]
    grpcs: list[list[Answer]] = [[] for _ in range(GRPC_CLIENTS)]
    go = threading.Event()
    threads = [
        *(
            threading.Thread(target=rest_keepalive_client, args=(url, spin_body(STEADY_N), a, go))
            for a in rest
        ),
        *(threading.Thread(target=grpc_client, args=(gateway.grpc, a, go)) for a in grpcs),
    ]
    try:
        for thread in threads:
            thread.start()
        go.set()
        time.sleep(1.5)
        served_by = peers(pids, gateway.http_port)
        signalled = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(60)
        assert gateway.process.wait(60) == 0
    finally:
        gateway.stop()
    # The load reached both workers, and both drained.
    assert all(served_by[pid] for pid in pids), served_by
    log = gateway.output()
    assert all(f"[worker {index}]: event=drained" in log for index in range(WORKERS)), log[-3000:]
    assert not any(running(pid) for pid in pids)
    answers = [a for client in (*rest, *grpcs) for a in client]
    lost = [a.outcome for a in answers if a.outcome.startswith(("lost", "wrong"))]
    assert not lost, f"{len(lost)} of {len(answers)} requests lost or wrong: {lost[:5]}"
    assert sum(1 for a in answers if a.outcome == "200" and a.sent < signalled) > 20
    assert all(client[-1].outcome == "503 draining" for client in rest), [c[-1] for c in rest]


def test_a_killed_supervisor_leaves_no_worker_serving(tmp_path: Path) -> None:
    """SIGKILL to the supervisor, which cannot pass anything on: each worker sees it gone, drains
    and exits, and the ports are free again."""
    gateway = start_workers(build_repo(tmp_path / "repo"), tmp_path / "gateway.log")
    pids = [row["pid"] for row in wait_workers(gateway, lambda rows: True)]
    gateway.process.kill()
    gateway.process.wait(10)
    deadline = time.monotonic() + 30
    while any(running(pid) for pid in pids):
        assert time.monotonic() < deadline, "a worker outlived its supervisor"
        time.sleep(0.1)
    log = gateway.output()
    assert all(f"[worker {index}]: event=drained" in log for index in range(WORKERS)), log[-3000:]
    for port in (gateway.http_port, gateway.grpc_port):
        with socket.create_server(("127.0.0.1", port)):
            pass


async def test_a_worker_does_not_start_a_managed_torchserve() -> None:
    """A managed model that appears after the start (polling) fails to load in a worker, with why."""
    from adapters import create_adapter
    from adapters.base import LoadSpec, SharedResources
    from gateway.config import load_model_config
    from gateway.errors import ModelNotReady

    folder = ROOT / "model_repo" / "mlp_torch"
    spec = LoadSpec(
        "mlp_torch",
        1,
        folder / "1",
        folder / "1" / "model.pt",
        load_model_config(folder / "config.yaml"),
        shared=SharedResources(may_start_servers=False),
    )
    if missing := torchserve_missing():
        pytest.skip(missing)
    with pytest.raises(ModelNotReady, match="a managed TorchServe cannot run under --workers"):
        await create_adapter("torchserve", spec).load()


@pytest.mark.parametrize(
    "what",
    [
        "repository API",
        "client shared memory",
        "managed TorchServe",
        "a worker that cannot start",
        "a shared port taken",
    ],
)
def test_what_must_exist_once_is_refused_with_workers(tmp_path: Path, what: str) -> None:
    repo = tmp_path / "repo"
    _save(build_affine(1), repo / "affine" / "1" / "model.onnx")
    args = ["--workers", "2"]
    http_port = free_port()
    holder = None
    env = None
    if what == "a shared port taken":
        # Another server listening with SO_REUSEPORT would share the port with the workers
        # unnoticed: the supervisor refuses it.
        holder = socket.socket()
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        http_port = holder.getsockname()[1]
        expected = f"cannot listen for HTTP on 127.0.0.1:{http_port}"
    elif what == "repository API":
        args.append("--enable-repository-api")
        expected = "the repository API cannot be enabled with --workers"
    elif what == "client shared memory":
        env = {**os.environ, "MODELYARD_ALLOW_CLIENT_SHM": "true"}
        expected = "client shared memory (MODELYARD_ALLOW_CLIENT_SHM) cannot be allowed with --workers"
    elif what == "managed TorchServe":
        # A TorchScript file: served by a managed TorchServe unless its config says remote.
        (repo / "scripted" / "1").mkdir(parents=True)
        (repo / "scripted" / "1" / "model.pt").write_bytes(b"not read before the refusal")
        expected = "cannot start a managed TorchServe, which model(s) scripted need"
    else:
        # Checked by each worker as it builds its gateway: the supervisor reports the first failure.
        keys = tmp_path / "keys.yaml"
        keys.write_text("keys: [{name: short, key: tooshort, models: ['*']}]\n")
        args += ["--api-keys-file", str(keys)]
        expected = "modelyard: worker "
    try:
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--model-repo", str(repo), *args,
             "--http-port", str(http_port), "--grpc-port", str(free_port())],
            capture_output=True, text=True, timeout=60, cwd=ROOT, env=env,
        )  # fmt: skip
    finally:
        if holder is not None:
            holder.close()
    assert done.returncode == 1, done.stderr
    assert expected in done.stderr
    assert "Traceback" not in done.stderr
    if what == "a worker that cannot start":
        assert "API keys in" in done.stderr and "tooshort" not in done.stderr
