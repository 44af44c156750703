"""Many replicas, one behaviour: two gateway processes on one repository make the same routing
decision for every keyed request, and a reload (polling, or the repository API called on each)
reaches both."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from scripts.build_models import _save, build_affine
from tests.support import RunningGateway, start_gateway
from tests.support.model_builders import ROUTED

# ROUTED: a sticky 50/50 split of versions 1 and 2, x-canary: yes -> 2, x-beta-tester -> stable (1).
KEYS = [f"user-{i}" for i in range(40)]
BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
# The split moves most keys to version 2.
SHIFTED = ROUTED.replace("traffic: {1: 50, 2: 50}", "traffic: {1: 10, 2: 90}")
# Version 3 takes the canary's place and half the traffic.
WITH_3 = (
    ROUTED.replace("canary: 2}", "canary: 3}")
    .replace("2: 50}", "3: 50}")
    .replace("version: 2}", "version: 3}")
)
Decisions = dict[tuple[str, str], str | None]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shared_repo")
    for version in (1, 2):
        _save(build_affine(version), root / "routed" / str(version) / "model.onnx")
    (root / "routed" / "config.yaml").write_text(ROUTED)
    return root


@pytest.fixture(scope="module")
def replicas(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RunningGateway]]:
    logs = tmp_path_factory.mktemp("replica_logs")
    flags = ("--poll-interval", "0.2", "--enable-repository-api")
    with ThreadPoolExecutor(2) as pool:  # started side by side, as a Deployment's pods are
        started = list(pool.map(lambda i: start_gateway(repo, logs / f"replica-{i}.log", *flags), range(2)))
    yield started
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(RunningGateway.stop, started))


def decide(http: httpx.Client, headers: dict[str, str]) -> str | None:
    """The version that answered (REST's X-Model-Version header), or None when none did."""
    answer = http.post("/v2/models/routed/infer", json=BODY, headers=headers)
    return answer.headers["X-Model-Version"] if answer.status_code == 200 else None


def rest_decisions(gateway: RunningGateway) -> Decisions:
    """Every key, plain and with each canary header."""
    cases = {"plain": {}, "canary": {"x-canary": "yes"}, "beta": {"x-beta-tester": "1"}}
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        return {
            (key, case): decide(http, {"X-User-Id": key, **extra})
            for key in KEYS
            for case, extra in cases.items()
        }


def grpc_decisions(gateway: RunningGateway) -> Decisions:
    client = triton_grpc.InferenceServerClient(gateway.grpc)
    tensor = triton_grpc.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.array([[1, 2, 3, 4]], dtype=np.float32))
    try:
        found: Decisions = {}
        for key in KEYS:
            result = client.infer("routed", [tensor], headers={"x-user-id": key})
            found[(key, "plain")] = result.get_response(as_json=True)["model_version"]
        return found
    finally:
        client.close()


def eventually(check: Callable[[], bool], gateways: list[RunningGateway]) -> None:
    for _ in range(200):  # bounded: 20 s at most
        if check():
            return
        time.sleep(0.1)
    raise AssertionError("\n".join(g.output()[-1500:] for g in gateways))


def test_replicas_agree_on_every_routing_decision(replicas: list[RunningGateway]) -> None:
    first, second = (rest_decisions(g) for g in replicas)
    assert first == second
    plain = {first[(key, "plain")] for key in KEYS}
    assert plain == {"1", "2"}, "a 50/50 split over 40 keys uses both versions"
    assert {first[(key, "canary")] for key in KEYS} == {"2"}
    assert {first[(key, "beta")] for key in KEYS} == {"1"}
    # gRPC metadata is the same header: the same key gets the same version there too.
    over_grpc = [grpc_decisions(g) for g in replicas]
    assert over_grpc[0] == over_grpc[1] == {k: v for k, v in first.items() if k[1] == "plain"}


def test_a_polled_change_reaches_both(replicas: list[RunningGateway], repo: Path) -> None:
    before = rest_decisions(replicas[0])
    (repo / "routed" / "config.yaml").write_text(SHIFTED)
    seen: list[Decisions] = []

    def converged() -> bool:
        seen[:] = [rest_decisions(g) for g in replicas]
        return seen[0] == seen[1] != before

    try:
        eventually(converged, replicas)
        moved = [key for key in KEYS if seen[0][(key, "plain")] != before[(key, "plain")]]
        assert moved and all(seen[0][(key, "plain")] == "2" for key in moved)
    finally:
        (repo / "routed" / "config.yaml").write_text(ROUTED)
        eventually(lambda: rest_decisions(replicas[0]) == rest_decisions(replicas[1]) == before, replicas)


def test_the_repository_api_reaches_only_the_replica_it_is_called_on(
    replicas: list[RunningGateway], repo: Path
) -> None:
    urls = [g.url for g in replicas]
    for url in urls:  # unloaded through the API: polling leaves it alone from now on
        assert httpx.post(f"{url}/v2/repository/models/routed/unload").status_code == 200
    _save(build_affine(3), repo / "routed" / "3" / "model.onnx")
    (repo / "routed" / "config.yaml").write_text(WITH_3)
    try:
        time.sleep(0.6)  # three polls
        assert all(httpx.get(f"{url}/v2/models/routed/ready").status_code == 503 for url in urls)
        assert httpx.post(f"{urls[0]}/v2/repository/models/routed/load").status_code == 200
        loaded, other = rest_decisions(replicas[0]), rest_decisions(replicas[1])
        assert {loaded[(key, "canary")] for key in KEYS} == {"3"}
        assert set(other.values()) == {None}, "the other replica did not hear of the load"
        assert httpx.post(f"{urls[1]}/v2/repository/models/routed/load").status_code == 200
        assert rest_decisions(replicas[1]) == loaded
    finally:
        shutil.rmtree(repo / "routed" / "3")
        (repo / "routed" / "config.yaml").write_text(ROUTED)
        for url in urls:
            httpx.post(f"{url}/v2/repository/models/routed/load")
