"""Load on demand under a memory budget, against real gateways, ONNX Runtime and tritonclient over
both protocols: round-robin traffic over more models than fit, shared loads, deadlines that pass
while a version loads, and the versions that requests run on staying put."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from tritonclient.utils import InferenceServerException

from gateway.residency import parse_budget
from gateway.settings import Settings
from scripts.build_models import _save, build_affine, build_matmul, matmul_weights
from tests.support import Protocol, RunningGateway, start_gateway, torchserve_missing

ROWS, COLS = 2048, 2048  # 16 MiB of FP32 weights per model
MODEL_MIB = ROWS * COLS * 4 / 2**20
MODELS = [f"w{i}" for i in range(6)]
# Room for two loads at once: ONNX Runtime holds a model's file and the tensors made from it
# while it loads, so a load peaks at twice the weights.
BUDGET_MIB = 4 * MODEL_MIB + 2
X = np.random.default_rng(7).standard_normal((1, ROWS)).astype(np.float32)


def build_weights_repo(repo: Path, names: list[str], config: str = "") -> None:
    for seed, name in enumerate(names):
        _save(build_matmul(ROWS, COLS, seed), repo / name / "1" / "model.onnx")
        if config:
            (repo / name / "config.yaml").write_text(config)
    # Loaded first, so ONNX Runtime's own start is in the gateway's base before the figures.
    _save(build_affine(1), repo / "probe" / "1" / "model.onnx")


def expected(name: str) -> np.ndarray:
    """What model `name` answers to X: wN has the weights of seed N, the others those of w0."""
    seed = int(name[1:]) if name[1:].isdigit() else 0
    return X @ matmul_weights(ROWS, COLS, seed)


def samples(gateway: RunningGateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{gateway.url}/metrics", timeout=30).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(gateway: RunningGateway, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    return sum(
        value
        for (sample, found), value in samples(gateway).items()
        if sample == name and set(labels.items()) <= set(found)
    )


def status(gateway: RunningGateway) -> dict[str, Any]:
    answer: dict[str, Any] = httpx.get(f"{gateway.url}/status", timeout=30).json()
    return answer


def client(protocol: str, gateway: RunningGateway) -> Protocol:
    if protocol == "grpc":
        return Protocol("grpc", triton_grpc, triton_grpc.InferenceServerClient(gateway.grpc))
    return Protocol("rest", triton_http, triton_http.InferenceServerClient(gateway.http, network_timeout=120))


def infer(proto: Protocol, model: str, **options: Any) -> np.ndarray:
    result = proto.client.infer(model, [proto.input("x", X, "FP32")], **options)
    array: np.ndarray = result.as_numpy("y")
    return array


class RssSampler:
    """The gateway process's highest resident set while a block runs, sampled every 5 ms."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def budget_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    repo = tmp_path_factory.mktemp("weights")
    build_weights_repo(repo, MODELS)
    slow = "warmup: {runs: 150}\n"  # a load that takes a while: its warmup runs 150 requests
    for name in ("slow_rest", "slow_grpc", "slow_shared", "fresh"):
        _save(build_matmul(ROWS, COLS, 0), repo / name / "1" / "model.onnx")
        (repo / name / "config.yaml").write_text(slow)
    running = start_gateway(
        repo,
        tmp_path_factory.mktemp("logs") / "budget.log",
        "--load-mode",
        "on_demand",
        "--model-memory-budget",
        f"{BUDGET_MIB}MiB",
        "--enable-repository-api",
    )
    yield running
    assert running.stop() == 0
    assert "Traceback" not in running.output(), running.output()[-3000:]


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_round_robin_over_more_models_than_fit_fails_nothing(
    protocol: str, budget_gateway: RunningGateway
) -> None:
    """Two rounds over six models whose budget holds four: every request is answered, by the model
    it named; the budget's figures and the process's resident set stay within the budget."""
    proto = client(protocol, budget_gateway)
    try:
        proto.client.infer("probe", [proto.input("x", np.ones((1, 4), np.float32), "FP32")])
        base = psutil.Process(budget_gateway.process.pid).memory_info().rss
        evictions = metric(budget_gateway, "modelyard_model_evictions_total")
        loads = metric(budget_gateway, "modelyard_model_loads_total", trigger="request", outcome="ok")
        most_resident = 0
        with RssSampler(budget_gateway.process.pid) as rss:
            for name in MODELS * 2:
                np.testing.assert_allclose(infer(proto, name), expected(name), rtol=1e-3, atol=1e-2)
                memory = status(budget_gateway)["memory"]
                assert memory["resident_bytes"] + memory["retained_bytes"] <= memory["budget_bytes"], memory
                weights = [
                    v
                    for m in status(budget_gateway)["models"]
                    if m["name"] in MODELS
                    for v in m["versions"]
                    if (v["resident_bytes"] or 0) > MODEL_MIB / 2 * 2**20
                ]
                most_resident = max(most_resident, len(weights))
        assert metric(budget_gateway, "modelyard_model_evictions_total") - evictions >= 6
        assert (
            metric(budget_gateway, "modelyard_model_loads_total", trigger="request", outcome="ok") - loads
            >= 6
        )
        assert 1 <= most_resident <= 4
        # What the budget counts is what the process holds: its peak, a load's included, stays
        # within the base and the budget (plus the noise of the requests' own buffers).
        assert (rss.peak - base) / 2**20 <= BUDGET_MIB + 12, (rss.peak - base) / 2**20
    finally:
        proto.client.close()


def test_concurrent_clients_over_every_model_all_succeed(budget_gateway: RunningGateway) -> None:
    """Six clients at once, each on its own model, under a budget for four: loads wait for room
    while the versions that requests run on stay resident, and every request is answered."""

    def run(name: str) -> list[str]:
        failures = []
        with triton_http.InferenceServerClient(budget_gateway.http, network_timeout=120) as http:
            proto = Protocol("rest", triton_http, http)
            for _ in range(4):
                try:
                    np.testing.assert_allclose(infer(proto, name), expected(name), rtol=1e-3, atol=1e-2)
                except (InferenceServerException, AssertionError) as exc:
                    failures.append(f"{name}: {exc}")
        return failures

    with ThreadPoolExecutor(len(MODELS)) as pool:
        failures = [f for result in pool.map(run, MODELS) for f in result]
    assert failures == []


def test_requests_that_arrive_during_one_load_share_it(budget_gateway: RunningGateway) -> None:
    before = metric(budget_gateway, "modelyard_model_loads_total", model="slow_shared", outcome="ok")
    waits = metric(budget_gateway, "modelyard_load_waits_total", model="slow_shared")

    def run(_: int) -> np.ndarray:
        with triton_http.InferenceServerClient(budget_gateway.http, network_timeout=120) as http:
            return infer(Protocol("rest", triton_http, http), "slow_shared")

    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(run, range(5)))
    for answer in answers:
        np.testing.assert_allclose(answer, expected("w0"), rtol=1e-3, atol=1e-2)
    assert (
        metric(budget_gateway, "modelyard_model_loads_total", model="slow_shared", outcome="ok") - before == 1
    )
    assert metric(budget_gateway, "modelyard_load_waits_total", model="slow_shared") - waits == 5


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_a_deadline_that_passes_while_loading_is_504_and_the_load_goes_on(
    protocol: str, budget_gateway: RunningGateway
) -> None:
    name = f"slow_{protocol}"
    proto = client(protocol, budget_gateway)
    try:
        with pytest.raises(InferenceServerException) as caught:
            if proto.is_grpc:
                infer(proto, name, client_timeout=0.05)
            else:
                infer(proto, name, headers={"X-Timeout-Ms": "50"})
        assert proto.error_code(caught.value) == ("DEADLINE_EXCEEDED" if proto.is_grpc else "504")
        if not proto.is_grpc:
            assert "still loading at the request's deadline" in caught.value.message()
        for _ in range(600):  # bounded: 60 s at most
            if metric(budget_gateway, "modelyard_model_loads_total", model=name, outcome="ok") == 1:
                break
            time.sleep(0.1)
        np.testing.assert_allclose(infer(proto, name), expected("w0"), rtol=1e-3, atol=1e-2)
        # The request that gave up did not cancel the load: the next one found it done.
        assert metric(budget_gateway, "modelyard_model_loads_total", model=name) == 1
    finally:
        proto.client.close()


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_a_model_that_is_not_resident_is_loadable_not_an_error(
    protocol: str, budget_gateway: RunningGateway
) -> None:
    """In the index it is LOADABLE with a reason; it answers ready; its metadata loads it the first
    time, and once it is unloaded again comes from the signature its load left, without a load."""
    proto = client(protocol, budget_gateway)
    name = "w5" if protocol == "rest" else "w4"
    try:
        for other in MODELS:  # round robin until `name` has been unloaded for room
            if other != name:
                infer(proto, other)
        index = proto.client.get_model_repository_index(**({"as_json": True} if proto.is_grpc else {}))
        rows = index["models"] if proto.is_grpc else index
        (row,) = [r for r in rows if r["name"] == name]
        assert row["state"] == "LOADABLE", row
        assert (
            "loads again at its next request" in row["reason"]
            or "loads at its first request" in row["reason"]
        )
        assert proto.client.is_model_ready(name)
        loads = metric(budget_gateway, "modelyard_model_loads_total", model=name)
        metadata = proto.client.get_model_metadata(name, **({"as_json": True} if proto.is_grpc else {}))
        assert [i["name"] for i in metadata["inputs"]] == ["x"]
        assert [int(d) for d in metadata["inputs"][0]["shape"]] == [-1, ROWS]
        assert metric(budget_gateway, "modelyard_model_loads_total", model=name) == loads
        config = proto.client.get_model_config(name, **({"as_json": True} if proto.is_grpc else {}))
        assert (config["config"] if proto.is_grpc else config)["name"] == name
    finally:
        proto.client.close()


def test_metadata_of_a_model_never_loaded_loads_it(budget_gateway: RunningGateway) -> None:
    """Its signature is known only from a load: the metadata request waits for one."""
    with httpx.Client(base_url=budget_gateway.url, timeout=120) as http:
        assert metric(budget_gateway, "modelyard_model_loads_total", model="fresh") == 0
        metadata = http.get("/v2/models/fresh").json()
        assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, ROWS]}]
        assert metric(budget_gateway, "modelyard_model_loads_total", model="fresh", outcome="ok") == 1


def test_the_status_page_shows_the_budget_and_each_versions_figures(budget_gateway: RunningGateway) -> None:
    with (
        httpx.Client(base_url=budget_gateway.url, timeout=60) as http,
        triton_http.InferenceServerClient(budget_gateway.http, network_timeout=120) as triton,
    ):
        for name in MODELS:  # more than fit: some unload for room
            infer(Protocol("rest", triton_http, triton), name)
        memory = http.get("/status").json()["memory"]
        assert memory["load_mode"] == "on_demand"
        assert memory["budget_bytes"] == int(BUDGET_MIB * 2**20)
        assert memory["loads"] >= 1 and memory["evictions"] >= 1
        page = http.get("/").text
    assert f"resident (and {memory['retained_bytes'] / 2**20:.1f} MiB their unloads kept) of a " in page
    assert f"{BUDGET_MIB * 2**20 / 2**20:.1f} MiB budget" in page
    assert "<th>resident</th><th>loads / evictions</th>" in page


@pytest.fixture
def tight_gateway(tmp_path: Path) -> Iterator[RunningGateway]:
    """Room for one load at a time: loading a second model needs the first one gone."""
    build_weights_repo(tmp_path / "repo", ["w0", "w1"])
    running = start_gateway(
        tmp_path / "repo",
        tmp_path / "tight.log",
        "--load-mode",
        "on_demand",
        "--model-memory-budget",
        f"{2 * MODEL_MIB + 4}MiB",
    )
    yield running
    assert running.stop() == 0


def test_a_version_with_requests_in_flight_is_never_unloaded(tight_gateway: RunningGateway) -> None:
    """A long request on w0 while w1 needs w0's room: w1's load waits (LOADING) while w0's request
    runs, w0 stays READY until that request is done, and both are answered."""
    big = np.random.default_rng(3).standard_normal((3000, ROWS)).astype(np.float32)
    seen: list[tuple[str, int, str]] = []  # (w0's state, w0's requests in flight, w1's state)
    stop = threading.Event()

    def watch() -> None:
        with httpx.Client(base_url=tight_gateway.url, timeout=30) as http:
            for _ in range(5000):  # bounded: stops on the event long before this
                if stop.is_set():
                    return
                models = {m["name"]: m["versions"][0] for m in http.get("/status").json()["models"]}
                seen.append((models["w0"]["state"], models["w0"]["inflight"], models["w1"]["state"]))

    def long_run() -> np.ndarray:
        with triton_http.InferenceServerClient(tight_gateway.http, network_timeout=120) as own:
            array: np.ndarray = own.infer(
                "w0", [Protocol("rest", triton_http, own).input("x", big, "FP32")]
            ).as_numpy("y")
            return array

    with triton_http.InferenceServerClient(tight_gateway.http, network_timeout=120) as http:
        proto = Protocol("rest", triton_http, http)
        infer(proto, "w0")  # resident
        with ThreadPoolExecutor(2) as pool:
            watcher = pool.submit(watch)
            running = pool.submit(long_run)
            for _ in range(500):  # bounded: until w0's request is running
                if seen and seen[-1][1] == 1:
                    break
                time.sleep(0.01)
            np.testing.assert_allclose(infer(proto, "w1"), expected("w1"), rtol=1e-3, atol=1e-2)
            long_answer = running.result()
            stop.set()
            watcher.result()
    np.testing.assert_allclose(long_answer, big @ matmul_weights(ROWS, COLS, 0), rtol=1e-3, atol=1e-1)
    assert not [snapshot for snapshot in seen if snapshot[1] > 0 and snapshot[0] != "READY"]
    assert ("READY", 1, "LOADING") in seen  # w1's load did wait for w0's request
    assert metric(tight_gateway, "modelyard_model_evictions_total", model="w0") == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2GiB", 2 * 2**30),
        ("1500MB", 1_500_000_000),
        ("1073741824", 1073741824),
        ("512 mib", 512 * 2**20),
        ("0.5GiB", 2**29),
        ("50%", 8 * 2**30),
        ("12.5%", 2 * 2**30),
    ],
)
def test_a_budget_is_bytes_or_a_share_of_the_machine(text: str, expected: int) -> None:
    assert parse_budget(text, machine_bytes=16 * 2**30) == expected


@pytest.mark.parametrize("text", ["lots", "0", "0%", "150%", "2XB", "-1GiB", ""])
def test_a_budget_that_is_neither_is_refused(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="memory budget"):
        parse_budget(text, machine_bytes=16 * 2**30)
    monkeypatch.setenv("MODELYARD_MODEL_MEMORY_BUDGET", text)
    with pytest.raises(ValidationError, match="memory budget"):
        Settings()


def test_the_budget_and_load_mode_come_from_flags_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELYARD_MODEL_MEMORY_BUDGET", "3GiB")
    monkeypatch.setenv("MODELYARD_LOAD_MODE", "on_demand")
    settings = Settings()
    assert (settings.model_memory_budget_bytes, settings.load_mode) == (3 * 2**30, "on_demand")
    assert Settings(model_memory_budget="1GiB").model_memory_budget_bytes == 2**30
    monkeypatch.setenv("MODELYARD_LOAD_MODE", "lazy")
    with pytest.raises(ValidationError, match="load_mode"):
        Settings()


@pytest.mark.skipif(torchserve_missing() is not None, reason=str(torchserve_missing()))
def test_a_managed_torchserve_is_measured_by_its_processes(tmp_path: Path) -> None:
    """TorchServe's frontend and workers are the gateway's children: a version's figure is what
    registering it added, and unloading it gives that back."""
    from scripts import build_torch_models

    build_torch_models.build_repository(tmp_path / "repo")
    config = tmp_path / "repo" / "mlp_torch" / "config.yaml"
    config.write_text(config.read_text() + "load: on_demand\n")
    gateway = start_gateway(
        tmp_path / "repo", tmp_path / "ts.log", "--model-memory-budget", "8GiB", "--enable-repository-api"
    )
    rows = np.ones((2, 64), np.float32)
    try:
        family = psutil.Process(gateway.process.pid)

        def rss() -> int:
            return sum(p.memory_info().rss for p in [family, *family.children(recursive=True)])

        with triton_http.InferenceServerClient(gateway.http, network_timeout=300) as http:
            proto = Protocol("rest", triton_http, http)
            proto.client.infer("mlp_torch", [proto.input("input", rows, "FP32")], model_version="1")
            before = rss()
            proto.client.infer("mlp_torch", [proto.input("input", rows, "FP32")], model_version="2")
            grown = rss() - before
        (model,) = [m for m in status(gateway)["models"] if m["name"] == "mlp_torch"]
        first, second = (v["resident_bytes"] for v in model["versions"])
        assert first > second > 20 * 2**20  # the first carries TorchServe's own start
        assert 0.5 < second / grown < 2, (second, grown)
        held = rss()
        assert (
            httpx.post(f"{gateway.url}/v2/repository/models/mlp_torch/unload", timeout=120).status_code == 200
        )
        for _ in range(300):  # bounded: 30 s for TorchServe to stop the workers
            if held - rss() > second / 2:
                break
            time.sleep(0.1)
        assert held - rss() > second / 2
    finally:
        assert gateway.stop() == 0
